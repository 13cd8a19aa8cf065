"""CPU speed of the codec's torch path: encode and decode of one layer, with the Hadamard
transform as butterflies (the definition) and as one matrix product (what ``fwht`` uses on CPU).

``python benchmarks/codec_cpu_speed.py --out benchmarks/results/codec_cpu_speed.json``

Shapes are SmolLM2-135M's (3 KV heads, head dim 64, 30 layers); times are medians of
``--repeat`` calls in milliseconds per layer, with torch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

import polykv_vllm.core.hadamard as hadamard
from polykv_vllm.core import KVCodec


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1536, 782])
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--preset", default="polykv")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    codec = KVCodec(args.preset, num_layers=30, head_dim=args.head_dim)
    rows = []
    matmul_fwht = hadamard.fwht
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(tokens)
        k = torch.randn(tokens, args.heads, args.head_dim, generator=g)
        v = torch.randn(tokens, args.heads, args.head_dim, generator=g)
        for name, fn in (("butterfly", hadamard.fwht_butterfly), ("matmul", matmul_fwht)):
            hadamard.fwht = fn  # rotate/unrotate look it up at call time
            try:
                packed = codec.encode(k, v, 3)
                rows.append(
                    {
                        "tokens": tokens,
                        "hadamard": name,
                        "encode_ms": _median_ms(partial(codec.encode, k, v, 3), args.repeat),
                        "decode_ms": _median_ms(
                            partial(codec.decode, packed, dtype=torch.float32), args.repeat
                        ),
                    }
                )
            finally:
                hadamard.fwht = matmul_fwht
            print(rows[-1], flush=True)
    result = {
        "config": vars(args),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
