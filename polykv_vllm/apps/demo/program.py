"""The demo's entry point: check the plugin, run polykv on and plugin off, print the table."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from polykv_vllm.apps.demo.options import parse_args, plugin_problem, polykv_flags
from polykv_vllm.apps.demo.report import render_table, summarize
from polykv_vllm.apps.demo.run import RunResult, run_once, say
from polykv_vllm.apps.serving import ServerError

__all__ = ["main"]


def _show_harness_progress() -> None:
    """The harness reports a server's start-up and its command through logging: show those
    lines like :func:`say` (only the harness's logger; vLLM's own logging is left alone)."""
    log = logging.getLogger("polykv_vllm.apps")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m polykv_vllm.demo [options]``; exit status 0, 1 (a server failed) or 2 (the
    plugin is missing or an option is bad)."""
    cfg = parse_args(argv)
    _show_harness_progress()
    if cfg.only != "baseline":
        problem = plugin_problem()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        try:
            polykv_flags(cfg)  # validates --preset / --store-bytes before any server starts
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from polykv_vllm.embedded import embedded_model_dir

    t0 = time.perf_counter()
    model_dir = embedded_model_dir()
    say(f"model: {model_dir}")
    docs: list[str] = []
    on: RunResult | None = None
    off: RunResult | None = None
    try:
        if cfg.only in ("both", "plugin"):
            on = run_once(cfg, model_dir, True, docs)
        if cfg.only in ("both", "baseline"):
            off = run_once(cfg, model_dir, False, docs)
    except (ServerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(render_table(cfg, on, off))
    print()
    for run in (on, off):
        if run and run.records:
            r = run.records[-1]
            label = "polykv on" if run.plugin else "plugin off"
            say(f"last answer ({label}, doc {r.doc}, agent {r.agent}): {r.text!r}")
    say(f"done in {time.perf_counter() - t0:.0f} s")
    if cfg.json_out:
        payload = {
            "config": asdict(cfg),
            "command": shlex.join(
                ["python", "-m", "polykv_vllm.demo", *(sys.argv[1:] if argv is None else argv)]
            ),
            "runs": [
                {"summary": summarize(run), **asdict(run)} for run in (on, off) if run is not None
            ],
        }
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        say(f"wrote {cfg.json_out}")
    return 0
