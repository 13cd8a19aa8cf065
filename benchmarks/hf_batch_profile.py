"""Where the HF fallback's batched decode spends its time: ``pool.generate_ids`` for N agents
under ``torch.profiler``, one table per N sorted by self CPU time and one by device time.

    python benchmarks/hf_batch_profile.py --device cuda --dtype bfloat16 --model random-smollm \\
        --agents 1 16 --new-tokens 16 --out OUT_DIR

Writes ``OUT_DIR/profile_N.txt`` (both tables) and prints the wall time of each run.

``--count-ops`` profiles nothing: it counts the aten ops one decoding step dispatches (a
``TorchDispatchMode`` around two runs of different lengths, the difference divided by the
extra steps), all of them and those that are not views (roughly one kernel launch each on
CUDA), per step and per layer, with the most frequent ones; device-independent enough to
compare on CPU::

    python benchmarks/hf_batch_profile.py --device cpu --dtype float32 --model random-smollm \
        --agents 1 16 --count-ops

``--cuda-graph static`` counts the ops of the static-shape step that a CUDA graph captures
(``off``: the dynamic path; ``on`` on CUDA counts what the host still dispatches per step
outside the replayed graph).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_batch import document, load, queries  # noqa: E402

from polykv_vllm.hf import compress  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-smollm")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="torch")
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--agents", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--decode-backend", default=None, choices=["auto", "torch", "triton"])
    p.add_argument("--cuda-graph", default=None, choices=["auto", "on", "off", "static"])
    p.add_argument("--count-ops", action="store_true", help="count aten ops per step instead")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.out is None and not args.count_ops:
        p.error("--out is required unless --count-ops is given")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load(args.model, args.device, getattr(torch, args.dtype))
    pool = compress(model, tok, document(tok, args.doc_tokens))
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)

    extra: dict[str, Any] = {}
    if args.decode_backend is not None:
        extra["decode_backend"] = args.decode_backend
    if args.cuda_graph is not None:
        extra["cuda_graph"] = {"on": True, "off": False}.get(args.cuda_graph, args.cuda_graph)

    def run(n: int, new: int) -> float:
        qs = queries(pool, tok, n)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        pool.generate_ids(
            qs,
            model,
            tok,
            max_new_tokens=new,
            eos_token_id=None,
            backend=args.backend,
            progress=False,
            **extra,
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if args.count_ops:
        for n in args.agents:
            count_ops(run, n, args.new_tokens, pool.num_layers, pool)
        return
    assert args.out is not None
    for n in args.agents:
        run(n, 2)  # warm-up
        plain = run(n, args.new_tokens)
        with profile(activities=activities) as prof:
            profiled = run(n, args.new_tokens)
        avg = prof.key_averages()
        text = [
            f"agents={n} new_tokens={args.new_tokens} wall={plain:.3f}s "
            f"({n * args.new_tokens / plain:.1f} tok/s) profiled_wall={profiled:.3f}s",
            avg.table(sort_by="self_cpu_time_total", row_limit=30),
        ]
        if len(activities) > 1:
            text.append(avg.table(sort_by="self_cuda_time_total", row_limit=25))
        (args.out / f"profile_{n}.txt").write_text("\n".join(text))
        print(text[0], flush=True)


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (by overload packet name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        if torch.Tag.view_copy not in func.tags and _is_view(func):
            self.views[name] += 1
        return func(*args, **(kwargs or {}))


def _is_view(func: Any) -> bool:
    """True for ops that only make a new view of their input (no kernel launch)."""
    return bool(func._schema.returns) and any(
        r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns
    )


def count_ops(run: Any, n: int, new: int, layers: int, pool: Any) -> None:
    """Print aten ops per decoding step (and per layer) for ``n`` agents."""
    run(n, 2)  # warm-up (lazy tables, plans)
    counts = []
    for steps in (2, 2 + new):
        mode = _OpCounter()
        with mode:
            run(n, steps)
        counts.append(mode)
    ops = counts[1].ops.copy()
    ops.subtract(counts[0].ops)
    views = counts[1].views.copy()
    views.subtract(counts[0].views)
    total, nview = sum(ops.values()) / new, sum(views.values()) / new
    summary = pool.memory_summary(n)
    print(
        f"agents={n}: {total:.0f} aten ops per decoding step ({total / layers:.1f} per layer), "
        f"{total - nview:.0f} not views ({(total - nview) / layers:.1f} per layer); "
        f"attention {summary.batched_backend}, "
        f"decode {getattr(summary, 'batched_decode_backend', 'torch')}, "
        f"CUDA graph {getattr(summary, 'batched_cuda_graph', None)}",
        flush=True,
    )
    real = ops.copy()
    real.subtract(views)
    top = ", ".join(f"{k} {v / new:.0f}" for k, v in real.most_common(15) if v > 0)
    print(f"  most frequent non-view ops per step: {top}", flush=True)


if __name__ == "__main__":
    main()
