"""Documents by reference on vLLM's OpenAI server: the ``--middleware`` that ``--kv-cache-plugin
polykv`` installs (``docs/DOCUMENTS.md``).

Routes (tenant: the ``cache_salt`` of the body, or the ``X-PolyKV-Cache-Salt`` header)::

    PUT    /v1/polykv/documents/{doc_id}   {"text": ...} or {"messages": [...]}, "pin", "replace"
    GET    /v1/polykv/documents/{doc_id}   status from the store: stored/total blocks, pinned,
                                           blocks held per tier (memory, disk, remote)
    DELETE /v1/polykv/documents/{doc_id}   unpin, forget, evict
    GET    /v1/polykv/documents            the tenant's documents

and a ``/v1/completions`` or ``/v1/chat/completions`` request whose
``kv_transfer_params.polykv`` says ``{"doc_id": ..., "by_reference": true}`` is rewritten before
vLLM sees it: completions get ``prompt = canonical document tokens + the request's own tokens``;
chat gets ``messages = the document's messages + the request's messages`` after checking that the
server's chat template renders them with the canonical tokens as a prefix. The response's
``kv_transfer_params.polykv`` gains ``by_reference``, ``doc_id`` and ``document_tokens``.

Why a middleware: ``--middleware`` (an ASGI class, added by ``app.add_middleware``) exists with
the same meaning in vLLM 0.26 (``api_server.build_app``) and 0.32
(``serve/middleware/register.py``); it is the one extension point that can also *rewrite* the
body of vLLM's own completion routes, which a by-reference request needs. vLLM 0.32's
``vllm.endpoint_plugins`` entry points only add routes. Everything the middleware asks of vLLM
goes through vLLM's public HTTP routes called in-process (``/v1/models``, ``/tokenize``,
``/v1/completions``), with the caller's headers, so it tokenizes and renders exactly as the
server does, the ``--api-key`` check applies to the document routes as well, and no internal
engine API is touched. It adds no work to requests that are not by reference beyond one scan of
the body for ``"by_reference"``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from typing import Any

from polykv_vllm.server.asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    call_json,
    json_scope,
    read_body,
    replay,
    send_json,
)
from polykv_vllm.server.registry import DocumentRecord, Registry, source_digest

__all__ = ["DocumentError", "DocumentsMiddleware", "PREFIX", "SALT_HEADER"]

logger = logging.getLogger(__name__)

PREFIX = "/v1/polykv/documents"
SALT_HEADER = "x-polykv-cache-salt"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MAX_DOC_ID_CHARS = 256  # as the connector's polykv.doc_id (scheduler/params.py)
PIN_TOKEN_ENV = "POLYKV_PIN_TOKEN"  # as connector/config.py (not imported: it pulls the codec)
# chat request keys that shape the rendering, passed on to /tokenize
_CHAT_RENDER_KEYS = (
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "tools",
)
# polykv request keys that belong to the document, not to the agent's request
_DOCUMENT_KEYS = ("by_reference", "doc_id", "pin", "pin_token", "forget", "tier_status")


class DocumentError(Exception):
    """A 4xx answer: ``status`` and a message saying what was wrong and how to fix it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    """vLLM's / OpenAI's error shape (the ``openai`` client shows ``message``)."""
    return {"error": {"message": message, "type": "polykv_document_error", "code": status}}


def _upstream_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))
    return str(body)[:500]


def check_doc_id(doc_id: Any) -> str:
    if not isinstance(doc_id, str) or not doc_id or "/" in doc_id:
        raise DocumentError(400, f"doc_id={doc_id!r:.80}: expected a non-empty string without '/'")
    if len(doc_id) > MAX_DOC_ID_CHARS:
        raise DocumentError(
            400, f"doc_id of {len(doc_id)} characters is too long: at most {MAX_DOC_ID_CHARS}"
        )
    return doc_id


def _flag(body: dict[str, Any], key: str, default: bool | None) -> bool | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise DocumentError(400, f"{key}={value!r:.80}: expected true or false")
    return value


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise DocumentError(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise DocumentError(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


class _Service:
    """The middleware's state for one app: the registry, the model name, a lock for changes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.lock = asyncio.Lock()
        self.warm: set[tuple[str | None, str]] = set()  # stored by this server process
        self.model: str | None = None

    @classmethod
    def of_app(cls, app: Any) -> _Service:
        state = getattr(app, "state", None)
        extra: dict[str, Any] = {}
        for holder in (getattr(state, "vllm_config", None), getattr(state, "args", None)):
            kv = getattr(holder, "kv_transfer_config", None)
            if kv is not None:
                extra = dict(getattr(kv, "kv_connector_extra_config", None) or {})
                break
        path = extra.get("registry_path")
        logger.info(
            "polykv documents: registry %s", path or "in memory (no --polykv-registry-path)"
        )
        return cls(Registry(path))


class DocumentsMiddleware:
    """ASGI middleware: the document routes and the by-reference rewrite (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._service: _Service | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            if path == PREFIX or path.startswith(PREFIX + "/"):
                return await self._route(scope, receive, send)
            if scope["method"] == "POST" and path in (COMPLETIONS, CHAT):
                raw = await read_body(receive)
                if b'"by_reference"' in raw:
                    return await self._by_reference(scope, raw, receive, send)
                replayed, _ = replay(raw, after=receive)
                return await self.app(scope, replayed, send)
        except DocumentError as exc:
            return await send_json(send, exc.status, error_body(exc.status, exc.message))
        return await self.app(scope, receive, send)

    def service(self, scope: Scope) -> _Service:
        if self._service is None:
            self._service = _Service.of_app(scope.get("app"))
        return self._service

    # --- calls into vLLM's own routes ------------------------------------------------------

    async def _model(self, scope: Scope) -> str:
        """The served model (and the caller's authentication: vLLM answers 401 here)."""
        status, body = await call_json(self.app, scope, "GET", "/v1/models")
        if status != 200:
            raise DocumentError(status if 400 <= status < 500 else 502, _upstream_message(body))
        model = str(body["data"][0]["id"])
        self.service(scope).model = model
        return model

    async def _tokenize(self, scope: Scope, payload: dict[str, Any]) -> dict[str, Any]:
        status, body = await call_json(self.app, scope, "POST", "/tokenize", payload)
        if status != 200:
            raise DocumentError(400, f"tokenizing failed: {_upstream_message(body)}")
        return dict(body)

    async def _complete(
        self, scope: Scope, record: DocumentRecord, tokens: list[int], **polykv: Any
    ) -> dict[str, Any]:
        """One internal 1-token completion of ``tokens`` naming ``record``; its receipt."""
        payload: dict[str, Any] = {
            "model": record.model or await self._model(scope),
            "prompt": tokens,
            "max_tokens": 1,
            "temperature": 0.0,
            "kv_transfer_params": {"polykv": {"doc_id": record.doc_id, **polykv}},
        }
        if record.tenant is not None:
            payload["cache_salt"] = record.tenant
        status, body = await call_json(self.app, scope, "POST", COMPLETIONS, payload)
        if status != 200:
            raise DocumentError(
                status if 400 <= status < 500 else 502,
                f"storing the document failed: {_upstream_message(body)}",
            )
        return dict((body.get("kv_transfer_params") or {}).get("polykv") or {})

    async def _warm(
        self, scope: Scope, record: DocumentRecord, pin: bool | None, pin_token: str | None
    ) -> dict[str, Any]:
        """Store (and name, and pin) the document's blocks: one 1-token completion."""
        polykv: dict[str, Any] = {}
        if pin is not None:
            polykv["pin"] = pin
        if pin:
            token = pin_token if pin_token is not None else os.environ.get(PIN_TOKEN_ENV)
            if token is not None:
                polykv["pin_token"] = token
        receipt = await self._complete(scope, record, list(record.tokens), **polykv)
        self.service(scope).warm.add((record.tenant, record.doc_id))
        return receipt

    async def _probe(self, scope: Scope, record: DocumentRecord, **polykv: Any) -> dict[str, Any]:
        """The scheduler's receipt for the document without storing anything: a one-token
        prompt (shorter than a block) naming it."""
        return await self._complete(scope, record, list(record.tokens[:1]), **polykv)

    # --- the routes ------------------------------------------------------------------------

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        raw = await read_body(receive)
        rest = scope["path"][len(PREFIX) :].lstrip("/")
        await self._model(scope)  # authentication first, as for vLLM's own /v1 routes
        if not rest:
            if method != "GET":
                raise DocumentError(405, f"{method} {PREFIX}: only GET lists documents")
            tenant = _tenant(scope, {})
            data = [_summary(r) for r in self.service(scope).registry.of_tenant(tenant)]
            return await send_json(send, 200, {"object": "list", "data": data})
        doc_id = check_doc_id(rest)
        if method == "PUT":
            status, payload = await self._put(scope, doc_id, _json_object(raw))
            return await send_json(send, status, payload)
        tenant = _tenant(scope, {})
        record = self._known(scope, tenant, doc_id)
        if method == "GET":
            receipt = await self._probe(scope, record, tier_status=list(record.tokens))
            return await send_json(send, 200, {**_summary(record), **_status(receipt)})
        if method == "DELETE":
            async with self.service(scope).lock:
                await self._probe(scope, record, pin=False, forget=True)
                self.service(scope).registry.delete(tenant, doc_id)
                self.service(scope).warm.discard((tenant, doc_id))
            return await send_json(send, 200, {"doc_id": doc_id, "deleted": True})
        raise DocumentError(405, f"{method} {PREFIX}/{{doc_id}}: use PUT, GET or DELETE")

    def _known(self, scope: Scope, tenant: str | None, doc_id: str) -> DocumentRecord:
        record = self.service(scope).registry.get(tenant, doc_id)
        if record is None:  # also another tenant's id: it answers like an id nobody uses
            raise DocumentError(
                404,
                f"no document {doc_id!r} is registered for this tenant (cache_salt); register it "
                f"with PUT {PREFIX}/{doc_id}",
            )
        return record

    async def _put(
        self, scope: Scope, doc_id: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        known = {"text", "messages", "cache_salt", "pin", "pin_token", "replace", "chat_template"}
        unknown = sorted(set(body) - known - {"chat_template_kwargs"})
        if unknown:
            raise DocumentError(400, f"unknown keys {unknown}: allowed are {sorted(known)}")
        tenant = _tenant(scope, body)
        replace = _flag(body, "replace", False)
        pin = _flag(body, "pin", None)
        pin_token = body.get("pin_token")
        if pin_token is not None and not isinstance(pin_token, str):
            raise DocumentError(400, "pin_token: expected a string")
        model = await self._model(scope)
        payload, kind, source = _tokenize_payload(body, model)
        tok = await self._tokenize(scope, payload)
        tokens, max_len = [int(t) for t in tok["tokens"]], int(tok["max_model_len"])
        if not tokens:
            raise DocumentError(400, "the document is empty: it has no tokens")
        if len(tokens) >= max_len:
            raise DocumentError(
                400,
                f"the document has {len(tokens)} tokens; the model's context is {max_len} "
                "(--max-model-len) and a reference needs at least one more token",
            )
        options: dict[str, Any] = {
            k: body[k] for k in ("chat_template", "chat_template_kwargs") if k in body
        }
        record = DocumentRecord(
            tenant=tenant,
            doc_id=doc_id,
            kind=kind,
            tokens=tuple(tokens),
            source_sha256=source_digest(kind, source, options),
            messages=source if kind == "messages" else None,
            model=model,
        )
        service = self.service(scope)
        async with service.lock:
            old = service.registry.get(tenant, doc_id)
            same = old is not None and old.source_sha256 == record.source_sha256
            if old is not None and not same:
                if not replace:
                    raise DocumentError(
                        409,
                        f"document {doc_id!r} is already registered with other content: send "
                        '"replace": true to replace it, or use another doc_id',
                    )
                await self._probe(scope, old, pin=False, forget=True)
            if pin is None and old is not None and same:
                pin = old.pin or None
            receipt = await self._warm(scope, record, pin, pin_token)
            record = dataclasses.replace(record, pin=bool(pin and receipt.get("pinned")))
            service.registry.put(record)
        out = {**_summary(record), **_status(receipt), "max_model_len": max_len}
        out["replaced"] = old is not None and not same
        if "pin_refused" in receipt:
            out["pin_refused"] = receipt["pin_refused"]
        return (201 if old is None else 200), out

    # --- by reference ----------------------------------------------------------------------

    async def _by_reference(self, scope: Scope, raw: bytes, receive: Receive, send: Send) -> None:
        try:
            payload = json.loads(raw)
            polykv = payload["kv_transfer_params"]["polykv"]
        except (ValueError, KeyError, TypeError):  # not ours after all: vLLM judges it
            polykv = None
        if polykv is not None and not isinstance(polykv, dict):  # the connector would ignore it
            raise DocumentError(
                400,
                f"kv_transfer_params.polykv={polykv!r:.80}: expected an object like "
                '{"doc_id": "contract-42", "by_reference": true}',
            )
        if polykv is None or "by_reference" not in polykv:
            replayed, _ = replay(raw, after=receive)
            return await self.app(scope, replayed, send)
        by_ref = polykv["by_reference"]
        if not isinstance(by_ref, bool):
            raise DocumentError(400, f"polykv.by_reference={by_ref!r:.80}: expected true or false")
        if not by_ref:
            replayed, _ = replay(raw, after=receive)
            return await self.app(scope, replayed, send)
        doc_id = check_doc_id(polykv.get("doc_id"))
        tenant = payload.get("cache_salt")
        if tenant is not None and not isinstance(tenant, str):
            raise DocumentError(400, "cache_salt: expected a string")
        record = self._known(scope, tenant, doc_id)
        service = self.service(scope)
        if (tenant, doc_id) not in service.warm:  # registered before a restart: store it again
            async with service.lock:
                if (tenant, doc_id) not in service.warm:
                    await self._warm(scope, record, True if record.pin else None, None)
        if scope["path"] == COMPLETIONS:
            payload["prompt"] = await self._completion_prompt(scope, record, payload)
        else:
            payload["messages"] = await self._chat_messages(scope, record, payload)
        payload["kv_transfer_params"]["polykv"] = {
            **{k: v for k, v in polykv.items() if k not in _DOCUMENT_KEYS},
            "doc_tokens": len(record.tokens),  # the agent's own question is not stored
        }
        body = json.dumps(payload).encode()
        inner = json_scope(scope, "POST", scope["path"], body)
        replayed, _ = replay(body, after=receive)
        mark = {"by_reference": True, "doc_id": doc_id, "document_tokens": len(record.tokens)}
        await self.app(inner, replayed, _ReceiptSend(send, mark, bool(payload.get("stream"))))

    async def _completion_prompt(
        self, scope: Scope, record: DocumentRecord, payload: dict[str, Any]
    ) -> Any:
        prompt = payload.get("prompt", "")
        doc = list(record.tokens)

        async def own(p: Any) -> list[int]:
            if isinstance(p, str):
                if not p:
                    return []
                tok = await self._tokenize(
                    scope, {"model": record.model, "prompt": p, "add_special_tokens": False}
                )
                return [int(t) for t in tok["tokens"]]
            if isinstance(p, list) and all(isinstance(t, int) for t in p):
                return list(p)
            raise DocumentError(400, "prompt: expected a string, token ids, or a list of those")

        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return [doc + await own(p) for p in prompt]
        return doc + await own(prompt)

    async def _chat_messages(
        self, scope: Scope, record: DocumentRecord, payload: dict[str, Any]
    ) -> list[Any]:
        if record.kind != "messages" or record.messages is None:
            raise DocumentError(
                400,
                f"document {record.doc_id!r} was registered as text: a chat request references "
                'a document registered with "messages" (or use /v1/completions)',
            )
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise DocumentError(400, "messages: expected a list of chat messages")
        full = [*record.messages, *messages]
        render = {k: payload[k] for k in _CHAT_RENDER_KEYS if k in payload}
        tok = await self._tokenize(scope, {"model": record.model, "messages": full, **render})
        n = len(record.tokens)
        if tuple(tok["tokens"][:n]) != record.tokens:
            raise DocumentError(
                400,
                f"with this request's chat options the template does not render document "
                f"{record.doc_id!r} as its registered {n}-token prefix (a chat_template or "
                "system prompt that changes what comes before the document): send the same "
                "template options as at registration, or put the system prompt into the "
                "registered messages",
            )
        return full


class _ReceiptSend:
    """Wraps ``send``: adds ``mark`` to the JSON response's ``kv_transfer_params.polykv`` (a
    streamed response passes unchanged, with the ``x-polykv-by-reference`` header only)."""

    def __init__(self, send: Send, mark: dict[str, Any], stream: bool) -> None:
        self.send, self.mark, self.stream = send, mark, stream
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        header = (b"x-polykv-by-reference", str(self.mark["doc_id"]).encode())
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), header]
            if self.stream or message["status"] != 200:
                return await self.send(message)
            self.start = message
            return None
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        body = b"".join(self.chunks)
        try:
            data = json.loads(body)
            kvp = data.get("kv_transfer_params") or {}
            kvp["polykv"] = {**(kvp.get("polykv") or {}), **self.mark}
            data["kv_transfer_params"] = kvp
            body = json.dumps(data).encode()
        except (ValueError, AttributeError):
            pass
        start = self.start
        start["headers"] = [
            (k, v) for k, v in start["headers"] if k.lower() != b"content-length"
        ] + [(b"content-length", str(len(body)).encode())]
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body})


def _tenant(scope: Scope, body: dict[str, Any]) -> str | None:
    """The body's ``cache_salt`` or the ``X-PolyKV-Cache-Salt`` header (they must agree)."""
    headers = {k.decode("latin-1").lower(): v.decode() for k, v in scope.get("headers", [])}
    header = headers.get(SALT_HEADER)
    salt = body.get("cache_salt", header)
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise DocumentError(400, f"cache_salt={salt!r:.80}: expected a non-empty string")
    if header is not None and salt != header:
        raise DocumentError(400, f"cache_salt in the body and the {SALT_HEADER} header differ")
    return salt


def _tokenize_payload(body: dict[str, Any], model: str) -> tuple[dict[str, Any], Any, Any]:
    """The ``/tokenize`` request for a PUT body, its kind and its source."""
    text, messages = body.get("text"), body.get("messages")
    if (text is None) == (messages is None):
        raise DocumentError(400, 'send exactly one of "text" (a string) and "messages" (a list)')
    if text is not None:
        if not isinstance(text, str):
            raise DocumentError(400, "text: expected a string")
        return {"model": model, "prompt": text, "add_special_tokens": True}, "text", text
    if not isinstance(messages, list) or not messages:
        raise DocumentError(400, "messages: expected a non-empty list of chat messages")
    if not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DocumentError(400, 'messages: each message is an object with a "role"')
    payload = {"model": model, "messages": messages, "add_generation_prompt": False}
    payload.update({k: body[k] for k in ("chat_template", "chat_template_kwargs") if k in body})
    return payload, "messages", messages


def _summary(record: DocumentRecord) -> dict[str, Any]:
    return {"doc_id": record.doc_id, "kind": record.kind, "tokens": len(record.tokens)}


def _status(receipt: dict[str, Any]) -> dict[str, Any]:
    keys = ("stored_blocks", "total_blocks", "stored_bytes", "pinned", "tiers")
    return {k: receipt.get(k) for k in keys}
