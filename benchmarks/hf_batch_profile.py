"""Where the HF fallback's batched decode spends its time: ``pool.generate_ids`` for N agents
under ``torch.profiler``, one table per N sorted by self CPU time and one by device time.

    python benchmarks/hf_batch_profile.py --device cuda --dtype bfloat16 --model random-smollm \\
        --agents 1 16 --new-tokens 16 --out OUT_DIR

Writes ``OUT_DIR/profile_N.txt`` (both tables) and prints the wall time of each run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load(args.model, args.device, getattr(torch, args.dtype))
    pool = compress(model, tok, document(tok, args.doc_tokens))
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)

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
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

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


if __name__ == "__main__":
    main()
