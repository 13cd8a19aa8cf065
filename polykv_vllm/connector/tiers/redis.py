"""The remote tier through Redis (or any server speaking its protocol: Valkey, KeyDB).

Keys are ``polykv:v1:<key>``, values the entry blobs (``docs/TIERS.md``); no TTL: bound the
server with ``maxmemory`` and ``maxmemory-policy allkeys-lru``, which evicts least recently used
entries across every engine sharing it. ``contains_many`` is one pipelined ``EXISTS`` per key.
Faults never raise: an unreachable or dying server turns reads into misses and writes into
counted errors, and the tier stops asking for ``retry_seconds`` after a fault (so a dead server
costs one timeout per interval, not one per step); the client reconnects on the next call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

from polykv_vllm.connector.tiers.base import Tier

__all__ = ["RedisTier"]

_PREFIX = "polykv:v1:"
_HELD_SECONDS = 10.0


class RedisTier(Tier):
    """Entries in the Redis at ``url`` (``redis://HOST:PORT/DB``); module docstring."""

    name = "remote"

    def __init__(self, url: str, timeout: float = 2.0, retry_seconds: float = 5.0) -> None:
        super().__init__()
        import redis

        self.url = url
        self.retry_seconds = retry_seconds
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._down_until = 0.0
        self._held: tuple[int, int] | None = None
        self._held_at = -float("inf")
        self._held_lock = threading.Lock()
        self._asking = False

    def held(self) -> tuple[int, int] | None:
        """``(keys in the DB, used_memory of the server)`` as last asked (at most every
        ``_HELD_SECONDS``, on a short-lived thread: the caller never waits for the network).
        The whole DB and server: give polykv a DB (or server) of its own."""
        now = time.monotonic()
        with self._held_lock:
            if self._asking or now - self._held_at < _HELD_SECONDS or not self._up():
                return self._held
            self._asking, self._held_at = True, now
        threading.Thread(target=self._ask_held, name="polykv-remote-gauges", daemon=True).start()
        return self._held

    def _ask_held(self) -> None:
        try:
            entries = int(self._client.dbsize())
            used = int(self._client.info("memory")["used_memory"])
            self._held = (entries, used)
        except self._errors as e:
            self._failed("DBSIZE / INFO", e)
        finally:
            self._asking = False

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, error: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_seconds
        self.fault(what, error)

    def put(self, key: str, blob: bytes) -> bool:
        if not self._up():
            self.count(errors=1)
            return False
        try:
            self._client.set(_PREFIX + key, blob)
        except self._errors as e:
            self._failed(f"SET of {len(blob)} bytes", e)
            return False
        self.count(writes=1, bytes_written=len(blob))
        return True

    def get(self, key: str) -> bytes | None:
        if not self._up():
            return None
        try:
            blob = self._client.get(_PREFIX + key)
        except self._errors as e:
            self._failed("GET", e)
            return None
        if blob is None:
            self.count(misses=1)
            return None
        self.count(bytes_read=len(blob))
        return bytes(blob)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys or not self._up():
            return [False] * len(keys)
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(_PREFIX + k)
            return [bool(n) for n in pipe.execute()]
        except self._errors as e:
            self._failed("EXISTS", e)
            return [False] * len(keys)

    def delete(self, key: str) -> None:
        if not self._up():
            return
        try:
            self._client.delete(_PREFIX + key)
        except self._errors as e:
            self._failed("DEL", e)

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._client.close()
