"""The document registry (pure Python): tenancy of records, atomic persistence, bad files; and
``--kv-cache-plugin polykv`` installing the documents middleware."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from polykv_vllm.server import MIDDLEWARE, DocumentRecord, Registry, RegistryError
from polykv_vllm.server.registry import source_digest


def record(tenant: str | None, doc_id: str, tokens: tuple[int, ...] = (1, 2, 3)) -> DocumentRecord:
    return DocumentRecord(
        tenant=tenant,
        doc_id=doc_id,
        kind="text",
        tokens=tokens,
        source_sha256=source_digest("text", str(tokens)),
    )


def test_records_are_scoped_by_tenant() -> None:
    reg = Registry()
    reg.put(record("A", "d", (1, 2)))
    reg.put(record(None, "d", (3, 4)))
    assert reg.get("A", "d").tokens == (1, 2)  # type: ignore[union-attr]
    assert reg.get(None, "d").tokens == (3, 4)  # type: ignore[union-attr]
    assert reg.get("B", "d") is None
    assert [r.doc_id for r in reg.of_tenant("B")] == []
    assert reg.delete("B", "d") is False and reg.delete("A", "d") is True
    assert reg.get(None, "d") is not None


def test_persists_atomically_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "registry.json"
    reg = Registry(path)
    reg.put(record("A", "x", tuple(range(1000))))
    reg.put(record(None, "y"))
    reg.delete(None, "y")
    assert [p.name for p in path.parent.iterdir()] == ["registry.json"], "no temporary left"
    again = Registry(path)
    assert len(again) == 1 and again.get("A", "x") == reg.get("A", "x")
    assert json.loads(path.read_text())["documents"][0]["tokens"][:3] == [0, 1, 2]


@pytest.mark.parametrize("content", ["{not json", '{"version": 9, "documents": []}', "[]"])
def test_a_bad_file_names_itself_and_the_fix(tmp_path: Path, content: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(content)
    with pytest.raises(RegistryError, match="--polykv-registry-path"):
        Registry(path)


def test_digest_tells_content_and_options_apart() -> None:
    assert source_digest("text", "a") == source_digest("text", "a")
    assert source_digest("text", "a") != source_digest("text", "b")
    assert source_digest("text", "a") != source_digest("messages", "a")
    assert source_digest("messages", [], {"chat_template": "t"}) != source_digest("messages", [])


def test_the_plugin_adds_the_documents_middleware_once() -> None:
    from polykv_vllm.connector.plugin import apply_polykv_args

    default: list[str] = []
    ns = argparse.Namespace(kv_cache_plugin="polykv", kv_transfer_config=None, middleware=default)
    apply_polykv_args(ns)
    assert ns.middleware == [MIDDLEWARE] and default == [], "the parser's default is untouched"
    ns.kv_transfer_config = None
    apply_polykv_args(ns)
    assert ns.middleware == [MIDDLEWARE]
    off = argparse.Namespace(kv_cache_plugin=None, kv_transfer_config=None, middleware=[])
    apply_polykv_args(off)
    assert off.middleware == []


def test_the_server_package_and_the_client_import_neither_vllm_nor_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, polykv_vllm.server.documents_api, polykv_vllm.client; "
        "print([m for m in ('vllm', 'torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
