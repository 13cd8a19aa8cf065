"""Documents: names for the blocks of a prompt, their pins, and the tenants they belong to.

- A document is named by a request's ``polykv.doc_id`` **within its tenant**: the tenant is the
  request's ``cache_salt`` (no salt is a tenant of its own), so the key is ``(tenant, doc_id)``.
  Two tenants using the same doc id have two unrelated documents; a request can neither see nor
  change another tenant's documents (lookups go by chained block hashes, which include the salt,
  so their blocks are distinct too). Untagged prompts are named ``#<hash prefix>`` for logs.
- A document names the full blocks of one prompt (``keys``); a request naming it with another
  prompt re-points it (its pin is released and asked for again, under the same rules).
- **Pins**: a pinned document holds a pin on each of its stored entries (``Entry.pins``), so
  they are never evicted. A pin is granted only if the :class:`~.pin_policy.PinPolicy` allows
  the request, the whole document fits in the store, and the tenant stays within its quota:
  bytes of its pinned entries plus the blocks its pinned documents still have to store. A pinned
  document whose blocks do not all fit in the store loses its pin (:meth:`Documents.unpin`; the
  index says why in the receipt): a pin covers the whole document or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from polykv_vllm.connector.scheduler.entries import DocKey, Entry
from polykv_vllm.connector.scheduler.params import DocParams
from polykv_vllm.connector.scheduler.pin_policy import PinPolicy

__all__ = ["Document", "Documents"]


@dataclass(eq=False)
class Document:
    """``keys``: the block hashes of the prompt it names; ``entries``: those of them in the store
    (pending or ready); ``pinned``: the pin is held."""

    tenant: str | None
    name: str
    keys: tuple[Hashable, ...]
    entries: dict[Hashable, Entry] = field(default_factory=dict)
    pinned: bool = False

    @property
    def key(self) -> DocKey:
        return (self.tenant, self.name)

    @property
    def stored_blocks(self) -> int:
        return len(self.entries)

    @property
    def total_blocks(self) -> int:
        return len(self.keys)


class Documents:
    """All documents of all tenants, and each tenant's pinned bytes (module docstring)."""

    def __init__(self, policy: PinPolicy, block_bytes: int, budget_bytes: int) -> None:
        self.policy = policy
        self.block_bytes = block_bytes
        self.budget_bytes = budget_bytes
        self._docs: dict[DocKey, Document] = {}
        self._pinned: dict[str | None, set[DocKey]] = {}  # tenant -> its pinned documents
        self._pinned_bytes: dict[str | None, int] = {}  # tenant -> bytes of its pinned entries
        #: entries that became pinned (True) or unpinned (False), for the tiers below the
        #: store (``scheduler/tiers.py`` takes them each step); None: not recorded
        self.pin_changes: list[tuple[Entry, bool]] | None = None
        self.num_present = 0  # documents with at least one stored block

    def get(self, tenant: str | None, name: str) -> Document | None:
        return self._docs.get((tenant, name))

    def pinned_bytes(self, tenant: str | None) -> int:
        return self._pinned_bytes.get(tenant, 0)

    # --- naming ----------------------------------------------------------------------------

    def bind(
        self,
        tenant: str | None,
        name: str,
        keys: tuple[Hashable, ...],
        lookup: Callable[[Hashable], Entry | None],
    ) -> tuple[Document, bool]:
        """The document ``(tenant, name)`` naming ``keys``, created or re-pointed, with its stored
        entries joined; and whether a pin was released by re-pointing it."""
        doc = self._docs.get((tenant, name))
        released = False
        if doc is None:
            doc = Document(tenant=tenant, name=name, keys=keys)
            self._docs[doc.key] = doc
        elif doc.keys != keys:
            released = doc.pinned
            self.unpin(doc)
            for entry in list(doc.entries.values()):
                self._leave(entry, doc)
            doc.keys = keys
        for k in keys:
            found = lookup(k)
            if found is not None:
                self.join(found, doc)
        return doc, released

    def join(self, entry: Entry, doc: Document) -> None:
        """``entry`` (one of ``doc.keys``) is in the store; a pinned document pins it."""
        if entry.key in doc.entries:
            return
        if not doc.entries:
            self.num_present += 1
        doc.entries[entry.key] = entry
        entry.docs.add(doc.key)
        if doc.pinned:
            self._pin_entry(entry, doc.tenant)

    def forget(self, doc: Document) -> list[Entry]:
        """Remove ``doc``: release its pin, drop its name; returns its entries that no other
        document names and that may be evicted (the caller evicts them)."""
        self.unpin(doc)
        orphans = []
        for entry in list(doc.entries.values()):
            self._leave(entry, doc)
            if not entry.docs and entry.evictable:
                orphans.append(entry)
        self._docs.pop(doc.key, None)
        return orphans

    def forget_if_empty(self, doc: Document) -> None:
        """Drop ``doc`` when nothing of it is stored and it holds no pin."""
        if not doc.entries and not doc.pinned and self._docs.get(doc.key) is doc:
            del self._docs[doc.key]

    def on_drop(self, entry: Entry) -> None:
        """``entry`` left the store (evicted or failed): take it out of its documents."""
        if entry.pins:
            tenant = next(iter(entry.docs))[0]
            self._pinned_bytes[tenant] -= entry.nbytes
            entry.pins = 0
            self._changed(entry, False)
        for key in entry.docs:
            doc = self._docs.get(key)
            if doc is None or doc.entries.pop(entry.key, None) is None:
                continue
            if not doc.entries:
                self.num_present -= 1
            self.forget_if_empty(doc)
        entry.docs.clear()

    # --- pins ------------------------------------------------------------------------------

    def apply(self, doc: Document, params: DocParams, repin: bool = False) -> str | None:
        """Pin or unpin ``doc`` as ``params.pin`` asks (or pin it again when ``repin`` and the
        request says nothing); returns why a pin was refused, or None."""
        want = params.pin if params.pin is not None else (True if repin else None)
        if want is None:
            return None
        if not want:
            self.unpin(doc)
            return None
        if doc.pinned:
            return None
        refused = self.policy.refusal(params)
        return refused if refused is not None else self.pin(doc)

    def pin(self, doc: Document) -> str | None:
        """Pin ``doc`` if it fits the store and its tenant's quota; why not, or None."""
        if doc.pinned:
            return None
        total = doc.total_blocks * self.block_bytes
        if total > self.budget_bytes:
            return (
                f"store: the document's {doc.total_blocks} blocks take {total} bytes, more than "
                f"the whole store ({self.budget_bytes} bytes, --polykv-store-bytes)"
            )
        need = sum(e.nbytes for e in doc.entries.values() if e.pins == 0)
        need += (doc.total_blocks - doc.stored_blocks) * self.block_bytes
        have = self._committed(doc.tenant)
        quota = self.policy.quota_bytes
        if have + need > quota:
            return (
                f"quota: pinning this document needs {need} more bytes and this tenant has "
                f"{have} of {quota} bytes pinned (--polykv-pin-quota)"
            )
        doc.pinned = True
        self._pinned.setdefault(doc.tenant, set()).add(doc.key)
        for entry in doc.entries.values():
            self._pin_entry(entry, doc.tenant)
        return None

    def unpin(self, doc: Document) -> None:
        if not doc.pinned:
            return
        doc.pinned = False
        self._pinned[doc.tenant].discard(doc.key)
        for entry in doc.entries.values():
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned_bytes[doc.tenant] -= entry.nbytes
                self._changed(entry, False)

    def _pin_entry(self, entry: Entry, tenant: str | None) -> None:
        entry.pins += 1
        if entry.pins == 1:
            self._pinned_bytes[tenant] = self._pinned_bytes.get(tenant, 0) + entry.nbytes
            self._changed(entry, True)

    def _changed(self, entry: Entry, pinned: bool) -> None:
        if self.pin_changes is not None:
            self.pin_changes.append((entry, pinned))

    def _committed(self, tenant: str | None) -> int:
        """Bytes the tenant's pins hold or will hold: its pinned entries, plus the blocks its
        pinned documents have yet to store."""
        missing = sum(
            d.total_blocks - d.stored_blocks
            for key in self._pinned.get(tenant, ())
            if (d := self._docs.get(key)) is not None
        )
        return self.pinned_bytes(tenant) + missing * self.block_bytes

    def _leave(self, entry: Entry, doc: Document) -> None:
        del doc.entries[entry.key]
        entry.docs.discard(doc.key)
        if not doc.entries:
            self.num_present -= 1
