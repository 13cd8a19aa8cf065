"""Benchmark of the paged kernels on a GPU: decompress a document into vLLM's paged cache, and
compress it back, against a measured device-to-device copy roofline.

Default shape: a 4096-token Llama-3-8B document (32 layers, 8 KV heads, head dim 128), bf16 cache
with block size 16 (537 MB of bf16 K/V), preset ``polykv`` (K8 int8, V3).

    python3 benchmarks/kernel_bench.py --out OUT_DIR [--sweep]

Writes ``OUT_DIR/kernels.json`` (resolved config, every timing, the device) and
``OUT_DIR/kernels.csv`` (one row per timed variant), and prints a short table. Times are medians
of ``triton.testing.do_bench`` (CUDA events) over inputs rotated between ``--docs`` documents, so
repeated runs do not read the compressed bytes from L2.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polykv_vllm.core import KVCodec, LayerSpec, PackedKV
from polykv_vllm.kernels import paged_ref, split_kv_cache

if TYPE_CHECKING:
    from polykv_vllm.kernels.triton_plan import Launch, PagedPlan

logger = logging.getLogger("kernel_bench")


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@dataclass(frozen=True)
class SideStreamPlan:
    """Key launches on a side stream, concurrently with the value launches on the current one
    (fork/join, which CUDA-graph capture records as such). A benchmark variant, not the
    library's: on the H100 it was ~2% faster than one stream (``KERNELS.md``, v5)."""

    keys: tuple[Launch, ...]
    values: tuple[Launch, ...]
    keepalive: tuple[PagedPlan, ...]

    def __call__(self) -> None:
        main = torch.cuda.current_stream()
        side = _side_stream(main.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for launch in self.keys:
                launch()
        for launch in self.values:
            launch()
        main.wait_stream(side)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder for JSON and CSV")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layout", choices=("NHD", "HND"), default="NHD", help="vLLM cache layout")
    p.add_argument("--preset", default="polykv")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--docs", type=int, default=2, help="documents to rotate between")
    p.add_argument("--rep-ms", type=int, default=300, help="do_bench repetition time (ms)")
    p.add_argument("--sweep", action="store_true", help="also time several KernelConfigs")
    p.add_argument("--skip-torch", action="store_true", help="do not time the torch reference")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="write registers, spills and instruction counts of the compiled kernels, and the "
        "value-decode kernel's TTGIR and SASS, to OUT",
    )
    return p.parse_args(argv)


def bench(fn: Callable[[], object], rep_ms: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events), after warm-up."""
    import triton

    ms = triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")
    return float(ms)


def make_caches(
    args: argparse.Namespace, num_blocks: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer vLLM FlashAttention caches (logical [B, H, N, 2D]) and their K/V views."""
    h, d, bs = args.heads, args.head_dim, args.block_size
    keys, values = [], []
    for _ in range(args.layers):
        if args.layout == "NHD":
            phys = torch.empty(num_blocks, bs, h, 2 * d, dtype=dtype, device="cuda")
            logical = phys.transpose(1, 2)
        else:
            logical = torch.empty(num_blocks, h, bs, 2 * d, dtype=dtype, device="cuda")
        logical.normal_()
        k, v = split_kv_cache(logical, d)
        keys.append(k)
        values.append(v)
    return keys, values


def make_docs(
    args: argparse.Namespace, codec: KVCodec, specs: list[LayerSpec]
) -> list[list[PackedKV]]:
    docs = []
    t, h, d = args.tokens, args.heads, args.head_dim
    for _ in range(args.docs):
        layers = []
        for layer in range(args.layers):
            k = torch.randn(t, h, d, device="cuda") * (1.0 + torch.rand(1, 1, d, device="cuda"))
            v = torch.randn(t, h, d, device="cuda")
            layers.append(codec.encode(k, v, layer))
        docs.append(layers)
    return docs


def diagnose(out: Path, plan: Any, name: str, result: dict[str, Any]) -> None:
    """Compile and run ``plan``'s launches once; record the compiler's resource report."""
    import re
    import subprocess

    for stream, launch in zip(("k", "v"), plan.launches, strict=False):
        compiled = launch.kernel[launch.grid](*launch.args, **launch.meta)
        ptx = compiled.asm.get("ptx", "")
        info: dict[str, Any] = {
            "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None),
            "shared": getattr(compiled.metadata, "shared", None),
        }
        for pat in ("wgmma", "mma.sync", "ld.local", "st.local", "ld.global.v4", "st.global.v4"):
            info[f"ptx_{pat}"] = len(re.findall(re.escape(pat), ptx))
        info["ptx_ld.global_total"] = len(re.findall(r"ld\.global", ptx))
        info["ptx_st.global_total"] = len(re.findall(r"st\.global", ptx))
        cubin = compiled.asm.get("cubin")
        if cubin is not None:
            path = out / f"{name}_{stream}.cubin"
            path.write_bytes(cubin)
            try:
                sass = subprocess.run(
                    ["cuobjdump", "-sass", str(path)], capture_output=True, text=True, timeout=60
                ).stdout
                for op in ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "LDG", "STG", "SHFL", "BAR"):
                    info[f"sass_{op}"] = len(re.findall(rf"\b{op}\b", sass))
                if stream == "v":
                    (out / f"{name}_v.sass").write_text(sass)
            except (OSError, subprocess.SubprocessError) as exc:
                info["sass_error"] = str(exc)
            path.unlink()
        if stream == "v":
            (out / f"{name}_v.ttgir").write_text(compiled.asm.get("ttgir", ""))
        result[f"diagnose_{name}_{stream}"] = info
        logger.info("diagnose %s %s: %s", name, stream, info)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        logger.error("kernel_bench needs a CUDA GPU")
        return 2
    from polykv_vllm.kernels import paged_triton
    from polykv_vllm.kernels.triton_plan import (
        DEFAULT_DECODE_CONFIG,
        DEFAULT_ENCODE_CONFIG,
        KernelConfig,
        PagedPlan,
        plan_compress_layers,
        plan_decompress_layers,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    codec = KVCodec(args.preset, num_layers=args.layers)
    specs = [codec.layer_spec(i, args.head_dim) for i in range(args.layers)]
    needed = -(-args.tokens // args.block_size)
    num_blocks = 2 * needed + 7
    keys, values = make_caches(args, num_blocks, dtype)
    block_ids = torch.randperm(num_blocks, device="cuda")[:needed].to(torch.int32)
    docs = make_docs(args, codec, specs)
    compressed_bytes = sum(p.nbytes for p in docs[0])
    elem = torch.empty((), dtype=dtype).element_size()
    dense_bytes = 2 * args.layers * args.tokens * args.heads * args.head_dim * elem
    moved = compressed_bytes + dense_bytes
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": dev.name,
        "sms": dev.multi_processor_count,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "compressed_bytes": compressed_bytes,
        "dense_bytes": dense_bytes,
        "ratio": dense_bytes / compressed_bytes,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }

    def record(name: str, ms: float, nbytes: int, note: str = "") -> None:
        row = {"name": name, "ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6, "note": note}
        rows.append(row)
        logger.info("%-44s %9.4f ms %9.1f GB/s %s", name, ms, row["GBps"], note)

    # --- copy roofline: one device-to-device copy of the dense bytes (read + write counted) ---
    src = torch.empty(dense_bytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    copy_ms = bench(copy, args.rep_ms)
    record("copy_roofline_d2d", copy_ms, 2 * dense_bytes, "dst.copy_(src), read+write")
    roofline = 2 * dense_bytes / copy_ms / 1e6

    counter = [0]

    def rotating(fn: Callable[[list[PackedKV]], object]) -> Callable[[], object]:
        def run() -> object:
            counter[0] += 1
            return fn(docs[counter[0] % len(docs)])

        return run

    def graphed(plans: Sequence[Callable[[], None]]) -> Callable[[], None]:
        """CUDA graphs of ``plans`` (one per document), replayed in rotation."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for plan in plans:  # compile and warm up outside the capture
                plan()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = []
        for plan in plans:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                plan()
            graphs.append(g)
        turn = [0]

        def run() -> None:
            turn[0] += 1
            graphs[turn[0] % len(graphs)].replay()

        return run

    def decode_triton(config: KernelConfig) -> Callable[[list[PackedKV]], object]:
        def run(doc: list[PackedKV]) -> None:
            plan_decompress_layers(doc, specs, keys, values, block_ids, config=config)()

        return run

    # --- parity spot check on this shape (layer 0 and the last layer) ---
    def parity_check(run: Callable[[list[PackedKV]], object], label: str) -> None:
        for c in (*keys, *values):
            c.fill_(float("nan"))
        run(docs[0])
        torch.cuda.synchronize()
        got_k = [keys[i][block_ids.long()].clone() for i in (0, args.layers - 1)]
        got_v = [values[i][block_ids.long()].clone() for i in (0, args.layers - 1)]
        parity = {}
        for j, i in enumerate((0, args.layers - 1)):
            paged_ref.decompress_into_paged(docs[0][i], specs[i], keys[i], values[i], block_ids)
            ref_k = keys[i][block_ids.long()]
            ref_v = values[i][block_ids.long()]
            parity[f"layer{i}"] = {
                "k_max_abs": (got_k[j].float() - ref_k.float()).abs().max().item(),
                "v_max_abs": (got_v[j].float() - ref_v.float()).abs().max().item(),
                "v_ref_max": ref_v.float().abs().max().item(),
                "nan_in_output": bool(got_k[j].isnan().any() or got_v[j].isnan().any()),
            }
        result[f"parity_vs_torch_ref_{label}"] = parity
        logger.info("parity vs torch reference (%s): %s", label, parity)

    parity_check(decode_triton(KernelConfig()), "default")

    # a decode variant: document -> its plan (a callable that enqueues the launches)
    Variant = Callable[[list[PackedKV]], Callable[[], None]]

    def with_config(config: KernelConfig) -> Variant:
        return lambda doc: plan_decompress_layers(
            doc, specs, keys, values, block_ids, config=config
        )

    def keys_beside_values(value_config: KernelConfig) -> Variant:
        """Keys (a memory-bound copy) on a side stream, concurrently with the values (bound by
        arithmetic and latency), the values with their own launch shape."""

        def plan(doc: list[PackedKV]) -> Callable[[], None]:
            k_plan = plan_decompress_layers(doc, specs, keys, values, block_ids, config=default)
            v_plan = plan_decompress_layers(
                doc, specs, keys, values, block_ids, config=value_config
            )
            return SideStreamPlan(
                tuple(la for la in k_plan.launches if la.stream == "k"),
                tuple(la for la in v_plan.launches if la.stream == "v"),
                (k_plan, v_plan),
            )

        return plan

    def decode_plans(variant: Variant) -> list[Callable[[], None]]:
        return [variant(doc) for doc in docs]

    if args.diagnose:
        diagnose(
            args.out,
            plan_decompress_layers(docs[0], specs, keys, values, block_ids),
            "decode",
            result,
        )
        diagnose(
            args.out,
            plan_compress_layers(specs, keys, values, block_ids, args.tokens)[0],
            "encode",
            result,
        )

    # --- decompress ---
    default = DEFAULT_DECODE_CONFIG
    # API call: validation, address tables and launches on every call (what a caller pays)
    ms = bench(rotating(decode_triton(default)), args.rep_ms)
    record("decompress_api_default", ms, moved, f"{default}")
    result["decompress_api_ms"] = ms
    # GPU time: the same launches replayed from a CUDA graph (no Python, no launch gaps)
    ms = bench(graphed(decode_plans(with_config(default))), args.rep_ms)
    record("decompress_gpu_default", ms, moved, f"{default}, CUDA graph")
    result["decompress_gpu_ms"] = ms

    # host-side costs, measured with a host clock
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        plans = decode_plans(with_config(default))
    result["host_plan_ms"] = (time.perf_counter() - t0) / 20 / len(docs) * 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        plans[0]()
    result["host_enqueue_ms"] = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    logger.info(
        "host: plan (checks + address tables) %.3f ms, enqueue of the launches %.3f ms",
        result["host_plan_ms"],
        result["host_enqueue_ms"],
    )

    # streams alone: keys only / values only (one launch each), CUDA graph
    for j, stream in enumerate(("k", "v")):
        nbytes = sum(
            (p.k_codes.nbytes + p.k_scale.nbytes)
            if stream == "k"
            else (p.v_codes.nbytes + p.v_norm.nbytes)
            for p in docs[0]
        )
        full = [plan_decompress_layers(d, specs, keys, values, block_ids) for d in docs]
        single = [PagedPlan((pl.launches[j],), pl.keepalive) for pl in full]
        ms = bench(graphed(single), args.rep_ms)
        record(f"decompress_gpu_{stream}_only", ms, nbytes + dense_bytes // 2, "CUDA graph")

    best: tuple[float, str, Variant] = (
        result["decompress_gpu_ms"],
        f"config={default}",
        with_config(default),
    )
    candidates: list[tuple[str, str, Variant]] = []
    if args.sweep:
        for rows_, warps, pps, st in (
            (64, 4, 8, 3),
            (64, 4, 4, 1),
            (64, 4, 8, 1),
            (64, 8, 4, 1),
            (128, 8, 4, 1),
        ):
            cfg = KernelConfig(rows=rows_, num_warps=warps, programs_per_sm=pps, num_stages=st)
            label = f"sweep_decompress_r{rows_}_w{warps}_p{pps}_s{st}"
            candidates.append((label, f"config={cfg}", with_config(cfg)))
    # keys (memory-bound copy) on a side stream, concurrently with values (arithmetic-bound)
    for vpps, vst in ((4, 3), (2, 3)):
        vcfg = KernelConfig(rows=64, num_warps=4, programs_per_sm=vpps, num_stages=vst)
        candidates.append(
            (
                f"decompress_concurrent_v_p{vpps}_s{vst}",
                f"config={default}, value_config={vcfg}, keys on a side stream",
                keys_beside_values(vcfg),
            )
        )
    for label, note, variant in candidates:
        try:
            ms = bench(graphed(decode_plans(variant)), max(100, args.rep_ms // 2))
        except Exception as exc:  # a config may not compile (registers); report it
            logger.info("variant %s failed: %s", label, exc)
            continue
        record(label, ms, moved, note + ", CUDA graph")
        if ms < best[0]:
            best = (ms, note, variant)
    best_variant = best[2]
    result["decompress_best_gpu_ms"] = best[0]
    result["decompress_best_variant"] = best[1]
    result["decompress_TBps"] = moved / best[0] / 1e9
    result["decompress_fraction_of_copy_roofline"] = (moved / best[0] / 1e6) / roofline

    def decode_best(doc: list[PackedKV]) -> None:
        best_variant(doc)()

    parity_check(decode_best, "best")
    ms = bench(rotating(decode_best), args.rep_ms)
    record("decompress_api_best", ms, moved, str(result["decompress_best_variant"]))
    result["decompress_api_best_ms"] = ms

    if not args.skip_torch:
        ms = bench(
            rotating(
                lambda doc: paged_ref.decompress_layers_into_paged(
                    doc, specs, keys, values, block_ids
                )
            ),
            args.rep_ms,
        )
        record("decompress_torch_ref", ms, moved)

    # --- pinned-CPU placement: H2D of the compressed bytes, then decompress ---
    pinned = [
        [p.with_tensors([t.cpu().pin_memory() for t in p.tensors()]) for p in doc] for doc in docs
    ]
    staging = [[torch.empty_like(t) for t in p.tensors()] for p in docs[0]]
    staged = [p.with_tensors(ts) for ts, p in zip(staging, docs[0], strict=True)]
    pcount = [0]

    def h2d() -> None:
        pcount[0] += 1
        doc = pinned[pcount[0] % len(pinned)]
        for ts, p in zip(staging, doc, strict=True):
            for dst_t, src_t in zip(ts, p.tensors(), strict=True):
                dst_t.copy_(src_t, non_blocking=True)

    ms = bench(h2d, args.rep_ms)
    record("pinned_h2d_compressed", ms, compressed_bytes, "pinned host -> device")
    result["pinned_h2d_ms"] = ms

    def h2d_and_decode() -> None:
        h2d()
        best_variant(staged)()

    ms = bench(h2d_and_decode, args.rep_ms)
    record("pinned_h2d_plus_decompress", ms, moved)
    result["pinned_h2d_plus_decompress_ms"] = ms
    dense_h2d_src = torch.empty(dense_bytes // 2, dtype=torch.int16).pin_memory()
    dense_h2d_dst = torch.empty(dense_bytes // 2, dtype=torch.int16, device="cuda")

    def dense_h2d() -> None:
        dense_h2d_dst.copy_(dense_h2d_src, non_blocking=True)

    ms = bench(dense_h2d, args.rep_ms)
    record("pinned_h2d_dense_bf16_for_comparison", ms, dense_bytes, "native CPU offload cost")
    result["pinned_h2d_dense_ms"] = ms

    # --- compress ---
    def encode_plans(cfg: KernelConfig) -> list[PagedPlan]:
        return [
            plan_compress_layers(specs, keys, values, block_ids, args.tokens, config=cfg)[0]
            for _ in docs
        ]

    out = paged_triton.compress_layers_from_paged(specs, keys, values, block_ids, args.tokens)
    ref = paged_ref.compress_layers_from_paged(specs, keys, values, block_ids, args.tokens)
    pairs = list(zip(out, ref, strict=True))
    mism = {
        "k_codes_equal": all(torch.equal(a.k_codes, b.k_codes) for a, b in pairs),
        "k_scale_equal": all(torch.equal(a.k_scale, b.k_scale) for a, b in pairs),
        "v_codes_byte_mismatch_fraction": sum(
            (a.v_codes != b.v_codes).sum().item() for a, b in pairs
        )
        / sum(a.v_codes.numel() for a in out),
        "v_norm_max_abs": max(
            (a.v_norm.float() - b.v_norm.float()).abs().max().item() for a, b in pairs
        ),
    }
    result["encode_parity_vs_torch_ref"] = mism
    logger.info("encode parity vs torch reference: %s", mism)

    def encode_api() -> None:
        paged_triton.compress_layers_from_paged(specs, keys, values, block_ids, args.tokens)

    ms = bench(encode_api, args.rep_ms)
    record("compress_api_default", ms, moved)
    result["compress_api_ms"] = ms
    ms = bench(graphed(encode_plans(DEFAULT_ENCODE_CONFIG)), args.rep_ms)
    record("compress_gpu_default", ms, moved, "CUDA graph")
    cbest = (ms, DEFAULT_ENCODE_CONFIG)
    if args.sweep:
        for rows_, warps, pps in ((32, 8, 4), (32, 8, 0), (32, 8, 8), (64, 4, 4)):
            cfg = KernelConfig(rows=rows_, num_warps=warps, programs_per_sm=pps)
            try:
                ms = bench(graphed(encode_plans(cfg)), max(100, args.rep_ms // 2))
            except Exception as exc:
                logger.info("config %s failed: %s", cfg, exc)
                continue
            record(f"sweep_compress_r{rows_}_w{warps}_p{pps}", ms, moved, str(cfg))
            if ms < cbest[0]:
                cbest = (ms, cfg)
    result["compress_best_gpu_ms"] = cbest[0]
    result["compress_best_config"] = str(cbest[1])
    best_enc = cbest[1]

    def encode_api_best() -> None:
        plan_compress_layers(specs, keys, values, block_ids, args.tokens, config=best_enc)[0]()

    ms = bench(encode_api_best, args.rep_ms)
    record("compress_api_best", ms, moved, str(best_enc))
    result["compress_api_best_ms"] = ms
    result["compress_fraction_of_copy_roofline"] = (moved / cbest[0] / 1e6) / roofline
    result["prefill_reference_ms"] = 99.6
    result["prefill_reference_note"] = (
        "cold prefill of 4096 tokens, dummy Llama-3-8B, vLLM 0.26 on an H100, from the project's "
        "design notes (not in this repository): a reference figure, not measured by this "
        "benchmark; benchmarks/results/gpu_serve_h100_kv4.json measured 102 ms (bf16 cold TTFT)"
    )
    result["compress_api_fraction_of_prefill_reference"] = result["compress_api_best_ms"] / 99.6
    if not args.skip_torch:
        ms = bench(
            lambda: paged_ref.compress_layers_from_paged(
                specs, keys, values, block_ids, args.tokens
            ),
            args.rep_ms,
        )
        record("compress_torch_ref", ms, moved)

    result["rows"] = rows
    (args.out / "kernels.json").write_text(json.dumps(result, indent=2))
    with open(args.out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "ms", "bytes", "GBps", "note"])
        w.writeheader()
        w.writerows(rows)
    logger.info(
        "SUMMARY %s: decompress GPU %.4f ms (%.2f TB/s, %.0f%% of copy roofline %.2f TB/s), "
        "API call %.4f ms; compress GPU %.4f ms, API call %.4f ms (%.2f%% of the 99.6 ms "
        "prefill reference); pinned h2d + decompress %.4f ms",
        dev.name,
        result["decompress_best_gpu_ms"],
        result["decompress_TBps"],
        100 * result["decompress_fraction_of_copy_roofline"],
        roofline / 1e3,
        result.get("decompress_api_best_ms", result["decompress_api_ms"]),
        result["compress_best_gpu_ms"],
        result["compress_api_best_ms"],
        100 * result["compress_api_fraction_of_prefill_reference"],
        result["pinned_h2d_plus_decompress_ms"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
