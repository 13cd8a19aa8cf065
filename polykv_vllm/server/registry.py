"""The document registry of the OpenAI server: canonical token prefixes by ``(tenant, doc_id)``.

Pure Python (standard library only). One :class:`DocumentRecord` per registered document holds
what a by-reference request needs without the client resending anything: the canonical token ids
(the tokenization the server did once, at registration), and for a document registered as chat
messages those messages (a chat request by reference is rendered with them in front). Records are
scoped like doc ids in the connector: the tenant is the ``cache_salt`` the document was
registered with, no salt being a tenant of its own; nothing here lets one tenant read, list or
replace another's records.

Persistence: with a ``path`` (``--polykv-registry-path FILE``) every change rewrites the whole
file atomically (a temporary file in the same folder, ``fsync``, ``os.replace``), so a crash leaves
either the old or the new registry, never a torn one; the constructor loads it back. Format:
``{"version": 1, "documents": [{"tenant", "doc_id", "kind", "tokens", "messages", "source_sha256",
"pin", "model"}]}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["DocumentRecord", "Registry", "RegistryError", "source_digest"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
Kind = Literal["text", "messages"]


class RegistryError(ValueError):
    """A registry file that cannot be read back; says which file and why."""


def source_digest(kind: Kind, source: Any, options: dict[str, Any] | None = None) -> str:
    """SHA-256 of a document's source (text or messages) and the options that shape its tokens:
    the same id registered again with another digest is a different document."""
    blob = json.dumps([kind, source, options or {}], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class DocumentRecord:
    """One registered document.

    - ``tenant``: the ``cache_salt`` it was registered with (None: the unsalted tenant).
    - ``kind``: ``"text"`` (tokenized as a completion prompt, special tokens included) or
      ``"messages"`` (chat messages rendered by the server's chat template, no generation prompt).
    - ``tokens``: the canonical token ids every reference starts with.
    - ``messages``: the chat messages (``kind == "messages"``), put in front of a chat request's
      own messages; None for text.
    - ``pin``: the document was registered with ``pin: true`` and the pin was granted.
    - ``model``: the served model name the tokens belong to.
    """

    tenant: str | None
    doc_id: str
    kind: Kind
    tokens: tuple[int, ...]
    source_sha256: str
    messages: list[dict[str, Any]] | None = None
    pin: bool = False
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens"] = list(self.tokens)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DocumentRecord:
        return cls(**{**data, "tokens": tuple(int(t) for t in data["tokens"])})


class Registry:
    """Records by ``(tenant, doc_id)``, optionally persisted to ``path`` (module docstring)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[tuple[str | None, str], DocumentRecord] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, tenant: str | None, doc_id: str) -> DocumentRecord | None:
        return self._records.get((tenant, doc_id))

    def of_tenant(self, tenant: str | None) -> Iterator[DocumentRecord]:
        """The tenant's records, by doc id."""
        for (t, _), record in sorted(self._records.items(), key=lambda kv: kv[0][1]):
            if t == tenant:
                yield record

    def put(self, record: DocumentRecord) -> None:
        """Add or replace ``record`` (the caller decided that replacing is allowed)."""
        self._records[(record.tenant, record.doc_id)] = record
        self._save()

    def delete(self, tenant: str | None, doc_id: str) -> bool:
        """Remove the record; False if the tenant has none of that id."""
        if self._records.pop((tenant, doc_id), None) is None:
            return False
        self._save()
        return True

    # --- persistence -----------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise RegistryError(f"a JSON {type(data).__name__}, expected an object")
            if data.get("version") != FORMAT_VERSION:
                raise RegistryError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
            records = [DocumentRecord.from_json(d) for d in data["documents"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(
                f"cannot read the polykv document registry {path}: {exc}. Fix or remove the file "
                "(--polykv-registry-path), or point the option at another one."
            ) from exc
        self._records = {(r.tenant, r.doc_id): r for r in records}
        logger.info("polykv: loaded %d registered documents from %s", len(records), path)

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "version": FORMAT_VERSION,
            "documents": [r.to_json() for r in self._records.values()],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
