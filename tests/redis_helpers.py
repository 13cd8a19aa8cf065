"""A real ``redis-server`` for tests (Debian's package), started on a free port without
persistence. Absent: the test is skipped, except on CI (``CI`` set), where it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from polykv_vllm.apps.serving import free_port

__all__ = ["redis_server", "require_redis", "start_redis", "stop_redis"]


def _binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing on CI: .ci/run must install it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


def require_redis() -> str:
    """The redis-server binary, with the client importable (else skip; on CI, fail)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the redis client is missing on CI: setup-env.sh installs .[tiers]")
        pytest.skip("the redis client is not installed (pip install 'polykv-vllm[tiers]')")
    return _binary()


def start_redis(port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A started server and its URL (``redis://127.0.0.1:PORT/0``)."""
    binary = require_redis()
    import redis

    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    client.close()
    return proc, url


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def redis_server() -> Iterator[str]:
    proc, url = start_redis()
    try:
        yield url
    finally:
        stop_redis(proc)
