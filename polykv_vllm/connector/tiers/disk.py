"""The local disk tier: one file per entry, written then renamed, LRU under a byte budget.

Layout (``docs/TIERS.md``): ``DIR/polykv-v1/<first 2 hex digits>/<key>.pkv``; a write goes to
``DIR/polykv-v1/tmp/<key>.<pid>.<n>.tmp`` and becomes visible with ``os.replace`` once complete,
so a reader (this or another process, after a crash too) never sees a partial entry. The byte
budget is kept by this process's LRU index of the files it may evict (``owned``: the files
whose name ends with its suffix, e.g. its rank's), rebuilt at start by scanning the directory
in modification-time order; a read touches the file's place in the index. Several processes
may share one directory: each one's budget covers its own files. A full disk (``ENOSPC``) or
any other I/O error fails the write (counted, logged); reads that fail are misses.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from polykv_vllm.connector.tiers.base import Tier

__all__ = ["DiskTier"]

_SUFFIX = ".pkv"
_STALE_TMP_SECONDS = 3600


class DiskTier(Tier):
    """Entries as files under ``path`` (module docstring). ``budget_bytes``: the bytes this
    process keeps there at most; ``owned``: the ending of the keys it evicts (None: all);
    ``scan``: build the index (the scheduler side, which only asks ``contains_many``, skips)."""

    name = "disk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        budget_bytes: int,
        owned: str | None = None,
        scan: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(path) / "polykv-v1"
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.owned = owned
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> bytes, oldest first
        self._pinned: set[str] = set()  # never evicted (pinned documents' blocks)
        self._bytes = 0
        self._seq = itertools.count()
        if scan:
            self._scan()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def held(self) -> tuple[int, int]:
        """This process's files (its rank's; files other servers wrote since its start are
        not counted)."""
        with self._lock:
            return len(self._index), self._bytes

    def path_of(self, key: str) -> Path:
        return self.root / key[:2] / (key + _SUFFIX)

    def put(self, key: str, blob: bytes) -> bool:
        if len(blob) > self.budget_bytes:
            return False
        dst = self.path_of(key)
        tmp = self.tmp / f"{key}.{os.getpid()}.{next(self._seq)}.tmp"
        try:
            dst.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, dst)
        except OSError as e:
            self.fault(f"write of {len(blob)} bytes", e)
            tmp.unlink(missing_ok=True)
            return False
        self.count(writes=1, bytes_written=len(blob))
        with self._lock:
            self._account(key, len(blob))
            victims = self._over_budget()
        for victim in victims:
            self.path_of(victim).unlink(missing_ok=True)
        if victims:
            self.count(evictions=len(victims))
        return True

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.path_of(key), "rb", buffering=0) as f:
                blob = f.read()  # one large sequential read of the whole file
        except FileNotFoundError:
            self.count(misses=1)
            return None
        except OSError as e:
            self.fault("read", e)
            return None
        self.count(bytes_read=len(blob))
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return blob

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.path_of(k).is_file() for k in keys]

    def delete(self, key: str) -> None:
        self.path_of(key).unlink(missing_ok=True)
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size

    # --- the index -------------------------------------------------------------------------

    def _owns(self, key: str) -> bool:
        return self.owned is None or key.endswith(self.owned)

    def _account(self, key: str, size: int) -> None:
        if not self._owns(key):
            return
        old = self._index.pop(key, None)
        self._bytes += size - (old or 0)
        self._index[key] = size

    def pin(self, key: str, pinned: bool) -> None:
        """Keep ``key`` out of (or back in) the eviction order: a pinned document's blocks are
        pinned here too (docs/TIERS.md). Held in memory: a restart forgets it until the
        document is pinned again."""
        with self._lock:
            if pinned:
                self._pinned.add(key)
            else:
                self._pinned.discard(key)

    def _over_budget(self) -> list[str]:
        """LRU victims until the budget holds, never a pinned entry (if only pinned entries
        are left, the tier stays over its budget)."""
        if self._bytes <= self.budget_bytes:
            return []
        victims = []
        for key in list(self._index):
            if self._bytes <= self.budget_bytes:
                break
            if key in self._pinned:
                continue
            self._bytes -= self._index.pop(key)
            victims.append(key)
        return victims

    def _scan(self) -> None:
        """The index from the directory (oldest modification first); stale temp files of
        crashed writers are removed; the budget is applied at once."""
        now = time.time()
        for tmp in self.tmp.iterdir():
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink(missing_ok=True)
            except OSError:
                pass
        found = []
        for sub in self.root.iterdir():
            if sub == self.tmp or not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.suffix != _SUFFIX or not self._owns(f.stem):
                    continue
                try:
                    st = f.stat()
                except OSError:
                    continue
                found.append((st.st_mtime, f.stem, st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._account(key, size)
            victims = self._over_budget()
        for victim in victims:
            self.path_of(victim).unlink(missing_ok=True)
