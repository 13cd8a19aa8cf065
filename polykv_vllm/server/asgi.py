"""Plain ASGI plumbing for the documents middleware: read a request body, answer JSON, and call
the rest of vLLM's app in-process with a JSON body (how the middleware uses vLLM's own public
routes, ``/v1/models``, ``/tokenize``, ``/v1/completions``, on every vLLM version alike).

Standard library only: scopes, messages and callables are those of the ASGI 3 spec.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Receive", "Scope", "Send", "call_json", "read_body", "send_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DROPPED_HEADERS = {b"content-length", b"content-type", b"transfer-encoding"}


async def read_body(receive: Receive) -> bytes:
    """The whole request body (``http.request`` messages until ``more_body`` is false)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_json(
    send: Send, status: int, payload: Any, headers: list[Any] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def json_scope(scope: Scope, method: str, path: str, body: bytes) -> Scope:
    """A copy of ``scope`` for ``method path`` with a JSON body of ``len(body)`` bytes: the same
    app, state, client and headers (so authentication sees the caller's credentials)."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _DROPPED_HEADERS]
    headers += [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    inner = dict(scope)
    inner.update(
        method=method, path=path, raw_path=path.encode(), query_string=b"", headers=headers
    )
    return inner


def replay(body: bytes, after: Receive | None = None) -> tuple[Receive, asyncio.Event]:
    """A ``receive`` that yields ``body`` once, then waits: for ``after`` (the client's real
    ``receive``, which reports its disconnect) or, without one, until the returned event is set
    (vLLM watches ``receive`` for a disconnect and would cancel a request that got one early)."""
    done = asyncio.Event()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if after is not None:
            return await after()
        await done.wait()
        return {"type": "http.disconnect"}

    return receive, done


async def call_json(
    app: ASGIApp, scope: Scope, method: str, path: str, payload: Any | None = None
) -> tuple[int, Any]:
    """Call ``app`` with ``method path`` and a JSON ``payload``; ``(status, parsed JSON body)``
    (the raw text where the body is not JSON)."""
    body = json.dumps(payload).encode() if payload is not None else b""
    receive, done = replay(body)
    status = 500
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(json_scope(scope, method, path, body), receive, send)
    finally:
        done.set()
    text = b"".join(chunks).decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
