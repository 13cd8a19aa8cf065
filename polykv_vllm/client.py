"""Client helpers for documents by reference (``docs/DOCUMENTS.md``); standard library only.

Register a document once, then let every agent send only its own question::

    from openai import OpenAI
    from polykv_vllm import client

    client.register("http://127.0.0.1:8000", "contract-42", text=contract, pin=True)
    oai = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    oai.completions.create(model="m", prompt="\\n\\nQ: Who pays?\\nA:",
                           extra_body=client.reference("contract-42"))

Chat: register ``messages=[{"role": "user", "content": contract}]`` and send
``messages=[{"role": "user", "content": "Who pays?"}]`` with the same ``extra_body``; the server
puts the document's messages in front.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["DocumentsError", "delete", "documents", "reference", "register", "status"]

PATH = "/v1/polykv/documents"
SALT_HEADER = "X-PolyKV-Cache-Salt"


class DocumentsError(RuntimeError):
    """The server refused (4xx) or failed (5xx); ``status`` and the server's ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _call(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    salt: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if salt is not None:
        headers[SALT_HEADER] = salt
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return dict(json.loads(resp.read().decode()))
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text
        raise DocumentsError(exc.code, str(message)) from None


def _url(base_url: str, doc_id: str | None = None) -> str:
    base = base_url.rstrip("/").removesuffix("/v1")
    return base + PATH + ("" if doc_id is None else "/" + urllib.parse.quote(doc_id, safe=""))


def register(
    base_url: str,
    doc_id: str,
    *,
    text: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    salt: str | None = None,
    pin: bool | None = None,
    pin_token: str | None = None,
    replace: bool = False,
    api_key: str | None = None,
) -> dict[str, Any]:
    """``PUT`` the document (``text`` or chat ``messages``) under ``doc_id`` for the tenant
    ``salt``; returns ``{"doc_id", "kind", "tokens", "stored_blocks", "total_blocks",
    "stored_bytes", "pinned", ...}``. Raises :class:`DocumentsError` (e.g. 409: the id holds
    other content and ``replace`` is False)."""
    body: dict[str, Any] = {"replace": replace}
    if text is not None:
        body["text"] = text
    if messages is not None:
        body["messages"] = messages
    if salt is not None:
        body["cache_salt"] = salt
    if pin is not None:
        body["pin"] = pin
    if pin_token is not None:
        body["pin_token"] = pin_token
    return _call("PUT", _url(base_url, doc_id), body, api_key=api_key)


def status(
    base_url: str, doc_id: str, salt: str | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """``GET`` one document: ``stored_blocks``, ``total_blocks``, ``stored_bytes``, ``pinned``."""
    return _call("GET", _url(base_url, doc_id), salt=salt, api_key=api_key)


def documents(
    base_url: str, salt: str | None = None, api_key: str | None = None
) -> list[dict[str, Any]]:
    """The tenant's registered documents (``doc_id``, ``kind``, ``tokens``)."""
    return list(_call("GET", _url(base_url), salt=salt, api_key=api_key)["data"])


def delete(
    base_url: str, doc_id: str, salt: str | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """``DELETE`` the document: unpinned, forgotten, its blocks evicted."""
    return _call("DELETE", _url(base_url, doc_id), salt=salt, api_key=api_key)


def reference(doc_id: str, salt: str | None = None) -> dict[str, Any]:
    """The ``extra_body`` of an ``openai`` request that references ``doc_id`` (and the tenant's
    ``cache_salt``)."""
    extra: dict[str, Any] = {
        "kv_transfer_params": {"polykv": {"doc_id": doc_id, "by_reference": True}}
    }
    if salt is not None:
        extra["cache_salt"] = salt
    return extra
