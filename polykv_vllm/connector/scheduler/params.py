"""The per-request ``polykv`` parameters, read leniently (a client's bad value must not stop the
engine: it is logged and ignored, and the receipt says what was refused).

``kv_transfer_params = {"polykv": {"doc_id": str, "pin": bool, "pin_token": str, "forget": bool,
"doc_tokens": int, "tier_status": [int]}}``; all keys optional (``docs/CONNECTOR.md``).
``forget`` (sent by the document routes' ``DELETE``, :mod:`polykv_vllm.server`) unpins the
tenant's document, drops its name and evicts its blocks that no other document names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_DOC_ID_CHARS", "PARAMS_KEY", "DocParams", "parse_doc_params"]

logger = logging.getLogger(__name__)

PARAMS_KEY = "polykv"
#: longer doc ids are refused (warning; the request is served unnamed)
MAX_DOC_ID_CHARS = 256


@dataclass(frozen=True)
class DocParams:
    """One request's ``polykv`` parameters after parsing.

    - ``doc_id``: the document name within the request's tenant, or None (untagged).
    - ``pin``: True / False to pin / unpin the document, None to leave its pin as it is.
    - ``pin_token``: the secret a ``pin="token"`` server asks for (never printed: not in repr).
    - ``doc_id_refused``: why a given doc id was not used (for the receipt), or None.
    - ``forget``: remove the tenant's document ``doc_id`` (unpin, unname, evict what only it
      names); needs a ``doc_id``.
    - ``doc_tokens``: the first ``doc_tokens`` prompt tokens are the shared document; only its
      whole blocks are stored, not the agent's own question after it (None: the whole prompt).
      The document routes set it on every by-reference request.
    - ``tier_status``: the document's token ids (sent by the document routes' ``GET``): the
      receipt says how many of their full blocks each tier holds (``docs/TIERS.md``).
    """

    doc_id: str | None = None
    pin: bool | None = None
    pin_token: str | None = field(default=None, repr=False)
    doc_id_refused: str | None = None
    forget: bool = False
    doc_tokens: int | None = None
    tier_status: tuple[int, ...] | None = field(default=None, repr=False)


def parse_doc_params(kv_transfer_params: Mapping[str, Any] | None) -> DocParams:
    """Read ``{"polykv": {...}}``; malformed values are logged (never the token) and ignored."""
    raw = (kv_transfer_params or {}).get(PARAMS_KEY)
    if raw is None:
        return DocParams()
    if not isinstance(raw, Mapping):
        logger.warning(
            "ignoring kv_transfer_params.polykv of type %s: expected an object like "
            '{"doc_id": "contract-42", "pin": true}',
            type(raw).__name__,
        )
        return DocParams()
    doc_id = raw.get("doc_id")
    pin = raw.get("pin")
    token = raw.get("pin_token")
    refused = None
    if doc_id is not None and (not isinstance(doc_id, str) or not doc_id):
        logger.warning("ignoring polykv.doc_id=%.80r: expected a non-empty string", doc_id)
        doc_id = None
    if doc_id is not None and len(doc_id) > MAX_DOC_ID_CHARS:
        refused = f"too long: {len(doc_id)} characters, at most {MAX_DOC_ID_CHARS}"
        logger.warning(
            "ignoring polykv.doc_id %.40r... of %d characters (at most %d): the request is "
            "served unnamed",
            doc_id,
            len(doc_id),
            MAX_DOC_ID_CHARS,
        )
        doc_id = None
    if pin is not None and not isinstance(pin, bool):
        logger.warning("ignoring polykv.pin=%.80r: expected true or false", pin)
        pin = None
    if pin is not None and doc_id is None:
        logger.warning("ignoring polykv.pin=%r: pinning needs a polykv.doc_id", pin)
        pin = None
    if token is not None and not isinstance(token, str):
        logger.warning("ignoring polykv.pin_token of type %s: expected a string", type(token))
        token = None
    forget = raw.get("forget", False)
    if not isinstance(forget, bool) or (forget and doc_id is None):
        logger.warning("ignoring polykv.forget=%.80r: expected true with a polykv.doc_id", forget)
        forget = False
    doc_tokens = raw.get("doc_tokens")
    if doc_tokens is not None and (
        isinstance(doc_tokens, bool) or not isinstance(doc_tokens, int) or doc_tokens < 1
    ):
        logger.warning(
            "ignoring polykv.doc_tokens=%.80r: expected a positive integer (the document's "
            "length in prompt tokens)",
            doc_tokens,
        )
        doc_tokens = None
    status = raw.get("tier_status")
    if status is not None and (
        not isinstance(status, list) or not all(type(t) is int for t in status)
    ):
        logger.warning("ignoring polykv.tier_status: expected a list of token ids")
        status = None
    return DocParams(
        doc_id=doc_id,
        pin=pin,
        pin_token=token,
        doc_id_refused=refused,
        forget=forget,
        doc_tokens=doc_tokens,
        tier_status=tuple(status) if status is not None else None,
    )
