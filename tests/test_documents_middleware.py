"""The documents middleware against a fake vLLM app (pure ASGI, no vLLM): the rewrite of
completions and chat requests, the chat prefix check, streamed responses, errors as 4xx."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from polykv_vllm.server.asgi import read_body
from polykv_vllm.server.documents_api import CHAT, COMPLETIONS, PREFIX, DocumentsMiddleware

BOS = 1


def render(messages: list[dict[str, str]], generation: bool) -> list[int]:
    """A toy chat template that hoists system messages to the front (as some templates do)."""
    ordered = [m for m in messages if m["role"] == "system"] + [
        m for m in messages if m["role"] != "system"
    ]
    text = "".join(f"<{m['role']}>{m['content']}" for m in ordered) + (
        "<gen>" if generation else ""
    )
    return [ord(c) for c in text]


class FakeVLLM:
    """Answers /v1/models, /tokenize and /v1/completions (+ chat) like vLLM, and records the
    bodies it was sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = await read_body(receive)
        body = json.loads(raw) if raw else {}
        path = scope["path"]
        self.seen.append((path, body))
        chunks: list[bytes]
        if path == "/v1/models":
            chunks = [json.dumps({"data": [{"id": "m"}]}).encode()]
        elif path == "/tokenize":
            if "prompt" in body:
                special = [BOS] if body.get("add_special_tokens", True) else []
                tokens = special + [ord(c) for c in body["prompt"]]
            else:
                tokens = render(body["messages"], body.get("add_generation_prompt", True))
            chunks = [json.dumps({"tokens": tokens, "count": len(tokens), "max_model_len": 64})]
            chunks = [c.encode() if isinstance(c, str) else c for c in chunks]
        else:
            receipt = {"doc_id": body.get("kv_transfer_params", {}).get("polykv", {}).get("doc_id")}
            receipt.update(stored_blocks=1, total_blocks=1, stored_bytes=10, pinned=False)
            answer = {"choices": [{"text": "ok"}], "kv_transfer_params": {"polykv": receipt}}
            if body.get("stream"):
                chunks = [b"data: {}\n\n", b"data: [DONE]\n\n"]
            else:
                chunks = [json.dumps(answer).encode()]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i, chunk in enumerate(chunks):
            await send(
                {"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1}
            )


def call(mw: DocumentsMiddleware, method: str, path: str, body: Any = None, **headers: str):
    raw = (
        body
        if isinstance(body, bytes)
        else (json.dumps(body).encode() if body is not None else b"")
    )
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        "app": SimpleNamespace(state=SimpleNamespace()),
    }
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], dict(message["headers"])
        else:
            out["body"] += message.get("body", b"")

    asyncio.run(mw(scope, receive, send))
    try:
        out["json"] = json.loads(out["body"])
    except ValueError:
        out["json"] = None
    return out


def ref(doc_id: str = "d", **more: Any) -> dict[str, Any]:
    return {"kv_transfer_params": {"polykv": {"doc_id": doc_id, "by_reference": True, **more}}}


def test_completions_get_the_canonical_tokens_in_front() -> None:
    app = FakeVLLM()
    mw = DocumentsMiddleware(app)
    put = call(mw, "PUT", f"{PREFIX}/d", {"text": "DOC", "cache_salt": "A"})
    assert put["status"] == 201 and put["json"]["tokens"] == 4  # BOS + 3
    r = call(mw, "POST", "/v1/completions", {"prompt": "?!", "cache_salt": "A", **ref()})
    assert r["status"] == 200
    path, sent = app.seen[-1]
    assert path == "/v1/completions"
    assert sent["prompt"] == [BOS, *map(ord, "DOC"), *map(ord, "?!")]
    # no doc id for the connector; where the document ends, so the question is not stored
    assert sent["kv_transfer_params"] == {"polykv": {"doc_tokens": 4}}
    receipt = r["json"]["kv_transfer_params"]["polykv"]
    assert receipt["by_reference"] is True and receipt["doc_id"] == "d"
    assert receipt["document_tokens"] == 4
    assert int(r["headers"][b"content-length"]) == len(r["body"])
    other = call(mw, "POST", "/v1/completions", {"prompt": "?", "cache_salt": "B", **ref()})
    assert other["status"] == 404 and "no document 'd'" in other["json"]["error"]["message"]


def test_chat_prefix_check_and_streaming() -> None:
    app = FakeVLLM()
    mw = DocumentsMiddleware(app)
    doc = [{"role": "user", "content": "DOC"}]
    assert call(mw, "PUT", f"{PREFIX}/c", {"messages": doc})["status"] == 201
    question = [{"role": "user", "content": "Q"}]
    ok = call(mw, "POST", "/v1/chat/completions", {"messages": question, **ref("c")})
    assert ok["status"] == 200 and app.seen[-1][1]["messages"] == doc + question
    # the toy template hoists a system message in front of the document: refused, not a miss
    system = [{"role": "system", "content": "S"}, *question]
    bad = call(mw, "POST", "/v1/chat/completions", {"messages": system, **ref("c")})
    assert bad["status"] == 400 and "prefix" in bad["json"]["error"]["message"]
    streamed = call(
        mw, "POST", "/v1/chat/completions", {"messages": question, "stream": True, **ref("c")}
    )
    assert streamed["status"] == 200 and streamed["body"].endswith(b"data: [DONE]\n\n")
    assert streamed["headers"][b"x-polykv-by-reference"] == b"c"


def test_errors_are_4xx() -> None:
    mw = DocumentsMiddleware(FakeVLLM())
    assert call(mw, "PUT", f"{PREFIX}/x", b"{oops")["status"] == 400
    assert call(mw, "PUT", f"{PREFIX}/x", {"text": "y" * 100})["status"] == 400  # > 64 tokens
    assert call(mw, "PUT", f"{PREFIX}/x", {"text": "a", "colour": 1})["status"] == 400
    assert call(mw, "PUT", f"{PREFIX}/" + "z" * 300, {"text": "a"})["status"] == 400
    assert call(mw, "PUT", f"{PREFIX}/x", {"text": "a"})["status"] == 201
    assert call(mw, "PUT", f"{PREFIX}/x", {"text": "b"})["status"] == 409
    assert call(mw, "PUT", f"{PREFIX}/x", {"text": "a"})["status"] == 200
    assert call(mw, "POST", f"{PREFIX}", {})["status"] == 405
    assert call(mw, "GET", f"{PREFIX}/x", x_polykv_cache_salt="B")["status"] == 404
    bad_flag = {"prompt": "q", "kv_transfer_params": {"polykv": {"by_reference": 1}}}
    assert call(mw, "POST", "/v1/completions", bad_flag)["status"] == 400
    text_in_chat = {"messages": [{"role": "user", "content": "q"}], **ref("x")}
    assert call(mw, "POST", "/v1/chat/completions", text_in_chat)["status"] == 400
    listed = call(mw, "GET", PREFIX)["json"]["data"]
    assert listed == [{"doc_id": "x", "kind": "text", "tokens": 2}]
    assert call(mw, "DELETE", f"{PREFIX}/x")["json"] == {"doc_id": "x", "deleted": True}
    assert call(mw, "GET", PREFIX)["json"]["data"] == []


def test_malformed_reference_requests_are_4xx_and_reach_no_model() -> None:
    app = FakeVLLM()
    mw = DocumentsMiddleware(app)
    assert call(mw, "PUT", f"{PREFIX}/t", {"text": "DOC"})["status"] == 201
    assert (
        call(mw, "PUT", f"{PREFIX}/c", {"messages": [{"role": "user", "content": "D"}]})["status"]
        == 201
    )
    sent = len(app.seen)
    bad = [
        (COMPLETIONS, {"prompt": "q", "kv_transfer_params": {"polykv": ["by_reference"]}}),
        (COMPLETIONS, {"prompt": "q", "kv_transfer_params": {"polykv": "by_reference"}}),
        (COMPLETIONS, {"prompt": 3, **ref("t")}),
        (COMPLETIONS, {"prompt": [{"x": 1}], **ref("t")}),
        (COMPLETIONS, {"prompt": [1.5], **ref("t")}),
        (COMPLETIONS, {"prompt": "q", **ref("")}),
        (COMPLETIONS, {"prompt": "q", **ref("a/b")}),
        (COMPLETIONS, {"prompt": "q", "cache_salt": 7, **ref("t")}),
        (CHAT, {"messages": "q", **ref("c")}),
        (CHAT, {**ref("c")}),
    ]
    for path, body in bad:
        r = call(mw, "POST", path, body)
        assert r["status"] == 400 and r["json"]["error"]["message"], body
        assert r["json"]["error"]["type"] == "polykv_document_error"
    # only /tokenize calls (none here: every case is refused before) reached the fake vLLM
    assert [p for p, _ in app.seen[sent:] if p in (COMPLETIONS, CHAT)] == []
    # a body that only mentions "by_reference" as text is not a reference: vLLM gets it as sent
    plain = {"prompt": "by_reference", "max_tokens": 1}
    assert call(mw, "POST", COMPLETIONS, plain)["status"] == 200
    assert app.seen[-1] == (COMPLETIONS, plain)
