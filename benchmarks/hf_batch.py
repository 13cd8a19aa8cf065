"""Tokens/s of N agents over one document with the HF fallback: batched (``pool.generate``,
shared prefix attended once per layer for all agents) vs N agents one after another (``Agent``,
today's path) vs N private ``DynamicCache`` copies batched in one ``model.generate``.

CPU (the embedded SmolLM2-135M; ``--threads 1`` on a box shared with other jobs, see the
README)::

    python benchmarks/hf_batch.py --agents 1 4 16 64 --new-tokens 64 --repeats 3 \\
        --repeats-at 64=1 --threads 1 --out benchmarks/results/hf_batch_cpu

H200 (random SmolLM2-shaped and 1B-shaped Llamas, bf16; xformers and torch backends; without
xformers the ``batched-xformers`` rows run the torch backend, logged, and record
``backend_ran: ["torch"]``, so pick the backends first)::

    B=torch; python -c "import xformers.ops.fmha" 2>/dev/null && B="xformers torch"
    for m in random-smollm random-1b; do
      python benchmarks/hf_batch.py --device cuda --dtype bfloat16 --model $m --backend $B \\
          --agents 1 4 16 64 --new-tokens 64 --repeats 2 --sequential-max-agents 1 \\
          --out benchmarks/results/hf_batch_h200_$m
    done

Methods run alternately inside each repeat (the box may be shared), so every ratio compares
runs made under the same load; ``ratios`` are per-repeat paired ratios (median, min, max).
On CUDA every run also records ``cuda_peak_bytes`` (``torch.cuda.max_memory_allocated`` during
the run) and ``cuda_peak_above_start_bytes`` (that minus what was allocated before it: the
method's own working memory incl. activations). A method that raises records ``error`` and the
run goes on. Every method generates exactly ``--new-tokens`` per agent (no early stop). Memory
per method is measured from tensors: the pool plus the batched run's metered peak (all
suffixes + one decoded layer), the pool plus one agent's metered peak (sequential), the
private caches' bytes.
Writes ``OUT.json`` (arguments, environment, every run) and ``OUT.png`` (tokens/s against N).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from polykv_vllm.apps.workload import corpus_text
from polykv_vllm.embedded import EmbeddedModelError, embedded_model_dir, load_embedded_model
from polykv_vllm.hf import compress, create_agents

VOCAB = 49152  # SmolLM2's vocabulary size (the random models' embedding shape)

RANDOM_SHAPES = {
    # Llama-3.2-1B's body with SmolLM2's 49152-token vocabulary (the embedded tokenizer).
    "random-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    # Two small layers: the benchmark's own smoke test (tests/test_hf_batch_bench.py).
    "random-tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # SmolLM2-135M's shape with random weights.
    "random-smollm": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    ),
}


def load(name: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if name == "embedded":
        return load_embedded_model(dtype=dtype, device=device)
    tok = random_model_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **RANDOM_SHAPES[name],
    )
    with torch.device(device):  # random init on the device (seconds for 1B on a GPU)
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval(), tok


def random_model_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer when its converted folder exists (no install, no network),
    else a byte-level tokenizer built here (ids 0..259), so a machine without the package runs."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(embedded_model_dir(install=False))
    except EmbeddedModelError:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        for special in ("<s>", "</s>"):
            vocab[special] = len(vocab)
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        core.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>"
        )


def document(tok: Any, tokens: int) -> str:
    ids = tok(corpus_text()[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    return str(tok.decode(ids))


def queries(pool: Any, tok: Any, n: int) -> list[str]:
    """``n`` different questions with the same token count (the private baseline needs one)."""
    out = [f"Question {i + 10}: summarize section {i + 10} of the document." for i in range(n)]
    lengths = {len(pool.prompt.suffix_ids(tok, q)) for q in out}
    if len(lengths) != 1:
        raise SystemExit(f"benchmark queries tokenize to different lengths {sorted(lengths)}")
    return out


def run_sequential(pool: Any, model: Any, tok: Any, qs: list[str], new: int) -> dict[str, Any]:
    agents = create_agents(pool, model, tok, len(qs))
    ids = [
        a.generate_ids(q, max_new_tokens=new, eos_token_id=None)
        for a, q in zip(agents, qs, strict=True)
    ]
    peak = max(a.peak_bytes for a in agents)
    return {"ids": ids, "kv_bytes": pool.nbytes + peak}


def run_batched(
    pool: Any,
    model: Any,
    tok: Any,
    qs: list[str],
    new: int,
    method: str,
    decode_backend: str = "auto",
    cuda_graph: bool | str = "auto",
) -> dict[str, Any]:
    """``method`` is ``batched-BACKEND`` or ``batched-BACKEND-kept`` (``keep_decoded=True``);
    ``decode_backend`` how the prefix is decoded (``auto`` / ``torch`` / ``triton``),
    ``cuda_graph`` whether the decoding step is a CUDA graph (``pool.generate``'s option)."""
    parts = method.split("-")
    ids = pool.generate_ids(
        qs,
        model,
        tok,
        max_new_tokens=new,
        eos_token_id=None,
        backend=parts[1],
        progress=False,
        keep_decoded=parts[-1] == "kept",
        decode_backend=decode_backend,
        cuda_graph=cuda_graph,
    )
    summary = pool.memory_summary(len(qs))
    return {
        "ids": ids,
        "kv_bytes": pool.nbytes + summary.batched_peak_bytes,
        "document_working_bytes": summary.batched_document_bytes,
        "backend_ran": summary.batched_backend,
        "decode_ran": summary.batched_decode_backend,
        "cuda_graph_ran": summary.batched_cuda_graph,
    }


def run_private(
    pool: Any, model: Any, tok: Any, qs: list[str], new: int, prefix_cache: DynamicCache
) -> dict[str, Any]:
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(prefix_cache.layers):
        n = len(qs)
        cache.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), i)
    suffix = torch.tensor([pool.prompt.suffix_ids(tok, q) for q in qs])
    prefix = pool.token_ids.unsqueeze(0).expand(len(qs), -1)
    ids = torch.cat([prefix, suffix], dim=1).to(pool.layout.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    kv = sum(t.numel() * t.element_size() for la in cache.layers for t in (la.keys, la.values))
    return {"ids": out[:, ids.shape[1] :].tolist(), "kv_bytes": kv}


def timed(
    method: str,
    pool: Any,
    model: Any,
    tok: Any,
    qs: list[str],
    args: argparse.Namespace,
    prefix_cache: DynamicCache | None,
) -> dict[str, Any]:
    """One run of ``method``: wall time, tokens/s, its memory (and on CUDA the allocator's peak
    during the run, above what was allocated before it); ``error`` instead when it raised."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        if method == "sequential":
            res = run_sequential(pool, model, tok, qs, args.new_tokens)
        elif method == "private":
            assert prefix_cache is not None
            res = run_private(pool, model, tok, qs, args.new_tokens, prefix_cache)
        else:
            res = run_batched(
                pool, model, tok, qs, args.new_tokens, method, args.decode_backend, graph_arg(args)
            )
    except Exception as exc:  # e.g. out of memory, or a kernel the GPU refuses: keep going
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    generated = sum(len(i) for i in res.pop("ids"))
    row = {"wall_s": wall, "tokens": generated, "tokens_per_s": generated / wall, **res}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        row |= {"cuda_peak_bytes": peak, "cuda_peak_above_start_bytes": peak - before}
    return row


def graph_arg(args: argparse.Namespace) -> bool | str:
    """``pool.generate``'s ``cuda_graph`` for ``--cuda-graph``."""
    return {"on": True, "off": False}.get(args.cuda_graph, "auto")


def xformers_version() -> str | None:
    """The installed xformers' version, or why it cannot be used (the batched runs then record
    ``backend_ran: torch``)."""
    from polykv_vllm.hf.hydragen import _xformers_problem

    problem = _xformers_problem()
    if problem is not None:
        return f"unavailable: {problem}"
    import xformers

    return str(xformers.__version__)


def parse_repeats_at(text: str) -> tuple[int, int]:
    agents, _, repeats = text.partition("=")
    try:
        return int(agents), int(repeats)
    except ValueError:
        raise SystemExit(
            f"--repeats-at {text!r} is invalid: use AGENTS=REPEATS, e.g. 64=1"
        ) from None


def prefill_prefix(model: Any, pool: Any) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=pool.token_ids.unsqueeze(0).to(pool.layout.device), past_key_values=cache)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["embedded", *RANDOM_SHAPES], default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "xformers"])
    ap.add_argument(
        "--decode-backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="how batched runs decode the prefix (rows record decode_ran)",
    )
    ap.add_argument(
        "--cuda-graph",
        choices=["auto", "on", "off"],
        default="auto",
        help="batched runs: pool.generate(cuda_graph=...) (auto: on for CUDA; rows record "
        "cuda_graph_ran)",
    )
    ap.add_argument("--preset", default="polykv")
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["sequential", "private", "batched"])
    ap.add_argument("--sequential-max-agents", type=int, default=16, help="skip larger N")
    ap.add_argument(
        "--repeats-at",
        nargs="*",
        default=[],
        metavar="N=R",
        help="fewer repeats for some agent counts, e.g. 64=1 (default: --repeats for all)",
    )
    ap.add_argument(
        "--keep-decoded",
        action="store_true",
        help="also run batched-BACKEND-kept: pool.generate(keep_decoded=True)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", required=True, help="path prefix for OUT.json and OUT.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tok = load(args.model, args.device, dtype)
    pool = compress(model, tok, document(tok, args.doc_tokens), preset=args.preset)
    prefix_cache = prefill_prefix(model, pool) if "private" in args.methods else None
    methods = [m for m in args.methods if m != "batched"]
    if "batched" in args.methods:
        methods += [f"batched-{b}" for b in args.backend]
        if args.keep_decoded:
            methods += [f"batched-{b}-kept" for b in args.backend]
    warm = queries(pool, tok, 1)
    for method in methods:  # first calls pay one-off costs (allocator, kernels): not timed
        if method == "sequential":
            run_sequential(pool, model, tok, warm, 2)
        elif method == "private":
            assert prefix_cache is not None
            run_private(pool, model, tok, warm, 2, prefix_cache)
        else:
            run_batched(pool, model, tok, warm, 2, method, args.decode_backend, graph_arg(args))
    repeats_at = dict(parse_repeats_at(x) for x in args.repeats_at)
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for n in args.agents:
            if repeat >= repeats_at.get(n, args.repeats):
                continue
            qs = queries(pool, tok, n)
            for method in methods:
                if method == "sequential" and n > args.sequential_max_agents:
                    continue
                row = {"repeat": repeat, "agents": n, "method": method}
                row |= timed(method, pool, model, tok, qs, args, prefix_cache)
                runs.append(row)
                print(json.dumps(row), flush=True)
                write(args, pool, methods, runs, final=False)  # a killed run keeps its rows
    write(args, pool, methods, runs, final=True)


def write(
    args: argparse.Namespace, pool: Any, methods: list[str], runs: list[dict], final: bool
) -> None:
    result = {
        "args": vars(args),
        "complete": final,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "device_name": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else "cpu",
            "transformers": transformers.__version__,
            "xformers": xformers_version(),
        },
        "document_tokens": pool.num_tokens,
        "pool_bytes": pool.nbytes,
        "bf16_copy_bytes": pool.bf16_bytes,
        "runs": runs,
        "summary": summarize(runs, methods, args.agents),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    if final:
        plot(result, out.with_suffix(".png"))
        print(json.dumps(result["summary"], indent=2))


def summarize(runs: list[dict[str, Any]], methods: list[str], agents: list[int]) -> list[dict]:
    rows = []
    for n in agents:
        ok = [r for r in runs if "error" not in r]
        by = {
            m: {r["repeat"]: r for r in ok if r["agents"] == n and r["method"] == m}
            for m in methods
        }
        row: dict[str, Any] = {"agents": n}
        for m, reps in by.items():
            if reps:
                tps = [r["tokens_per_s"] for r in reps.values()]
                row[m] = {
                    "tokens_per_s_median": statistics.median(tps),
                    "repeats": len(tps),
                    "kv_bytes": max(r["kv_bytes"] for r in reps.values()),
                }
                for key in ("cuda_peak_bytes", "cuda_peak_above_start_bytes"):
                    if all(key in r for r in reps.values()):
                        row[m][key] = max(r[key] for r in reps.values())
                for key in ("backend_ran", "decode_ran"):
                    ran = sorted({r[key] for r in reps.values() if key in r})
                    if ran:
                        row[m][key] = ran
        for m in methods:
            if not m.startswith("batched"):
                continue
            for base in ("sequential", "private"):
                pairs = [
                    by[m][k]["tokens_per_s"] / by[base][k]["tokens_per_s"]
                    for k in by[m]
                    if base in by and k in by[base]
                ]
                if pairs:
                    row[f"{m}/{base}"] = {
                        "median": statistics.median(pairs),
                        "min": min(pairs),
                        "max": max(pairs),
                    }
        errors = [f"{r['method']}: {r['error']}" for r in runs if r["agents"] == n and "error" in r]
        if errors:
            row["errors"] = errors
        rows.append(row)
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the JSON is written already; the PNG can be drawn elsewhere
        print(f"matplotlib is not installed: {path} not drawn")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in result["runs"]})
    for m in methods:
        pts = [
            (row["agents"], row[m]["tokens_per_s_median"]) for row in result["summary"] if m in row
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    args = result["args"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("agents on one document")
    ax.set_ylabel("generated tokens/s (median of repeats)")
    ax.set_title(
        f"{args['model']} {args['dtype']} on {result['environment']['device_name']}, "
        f"{result['document_tokens']}-token doc, {args['new_tokens']} new tokens",
        fontsize=8,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
