"""``polykv-vllm warm MODEL --docs FILE_OR_DIR [engine args] [--polykv-... options]``: fill the
persistent tiers (``--polykv-disk-path``, ``--polykv-remote``) before traffic arrives.

Every document runs once through an in-process engine with the plugin (a one-token completion
of its tokens): its blocks are compressed into the store and written through to the tiers
(``docs/TIERS.md``); a document the tiers already hold is read from them instead (and counted
as such). At the end the tiers' writers are flushed, so every entry is complete on disk or in
Redis when the command exits. A server started later with the same model, preset and tier
options serves the documents from the tiers on their first request.

Documents: a ``.txt`` / ``.md`` file is one document (its text as a completion prompt, special
tokens included, like ``PUT /v1/polykv/documents``); a ``.jsonl`` file holds one per line (a
JSON string, or an object with ``"text"``); a directory holds such files (sorted by name, not
recursive). Ends with a summary: documents, tokens, tokens stored and read from a tier,
compressed bytes against the same tokens in the KV cache dtype, and the ratio.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "read_documents"]

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".md")


def read_documents(path: Path) -> list[tuple[str, str]]:
    """``(name, text)`` of every document under ``path`` (module docstring)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    docs = []
    for f in files:
        if f.suffix in _TEXT_SUFFIXES:
            docs.append((f.name, f.read_text()))
        elif f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text().splitlines()):
                if not line.strip():
                    continue
                item = json.loads(line)
                text = item if isinstance(item, str) else item.get("text")
                if not isinstance(text, str):
                    raise SystemExit(
                        f"{f}:{i + 1}: expected a JSON string or an object with a string 'text'"
                    )
                docs.append((f"{f.name}:{i + 1}", text))
        elif not path.is_dir():
            raise SystemExit(f"--docs {f}: use a .txt, .md or .jsonl file, or a directory")
    if not docs:
        raise SystemExit(f"--docs {path}: no documents (.txt, .md or .jsonl files)")
    return docs


def _parser() -> Any:
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM 0.26
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]
    from vllm.engine.arg_utils import EngineArgs

    from polykv_vllm.connector.plugin import add_polykv_cli_args

    parser = FlexibleArgumentParser(
        prog="polykv-vllm warm", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("model_tag", metavar="MODEL", help="the model, as for `serve`")
    parser.add_argument("--docs", type=Path, required=True, help="a file or a directory")
    EngineArgs.add_cli_args(parser)
    add_polykv_cli_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command; returns the summary (also printed)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the tiers' writers: in here
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.kv_transfer_config is None:
        raise SystemExit("polykv-vllm warm needs --kv-cache-plugin polykv (and a tier option)")
    extra = args.kv_transfer_config.kv_connector_extra_config
    if not (extra.get("disk_path") or extra.get("remote")):
        raise SystemExit(
            "polykv-vllm warm fills the persistent tiers: give --polykv-disk-path DIR and/or "
            "--polykv-remote redis://HOST:PORT/DB"
        )
    docs = read_documents(args.docs)
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    args.model = args.model_tag
    engine_args = EngineArgs.from_cli_args(args)
    defaults = EngineArgs(model=args.model)
    kwargs = {
        k: v for k, v in vars(engine_args).items() if k != "model" and v != getattr(defaults, k)
    }
    llm = LLM(args.model, **kwargs)
    tokenizer = llm.get_tokenizer()
    one = SamplingParams(max_tokens=1, temperature=0.0)
    totals = {"documents": 0, "tokens": 0, "tokens_stored": 0, "tokens_from_tiers": 0}
    start = time.perf_counter()
    for _, text in tqdm(docs, desc="polykv warm", unit="doc"):
        ids = list(tokenizer(text)["input_ids"])
        prompt: Any = {"prompt_token_ids": ids}
        (out,) = llm.generate([prompt], one, use_tqdm=False)
        receipt = (out.kv_transfer_params or {}).get("polykv") or {}
        totals["documents"] += 1
        totals["tokens"] += len(ids)
        totals["tokens_stored"] += int(receipt.get("tokens_stored", 0))
        totals["tokens_from_tiers"] += int(receipt.get("tokens_from_store", 0))
    summary = {
        **totals,
        **_flush_and_measure(llm),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"polykv warm: {summary['documents']} documents, {summary['tokens']} tokens "
        f"({summary['tokens_stored']} stored, {summary['tokens_from_tiers']} already in a tier); "
        f"{summary['stored_bytes']} bytes compressed vs {summary['cache_dtype_bytes']} "
        f"({summary['ratio']:.2f}x) in {summary['seconds']} s"
    )
    llm.llm_engine.engine_core.shutdown()
    return summary


def _flush_and_measure(llm: Any) -> dict[str, Any]:
    """Flush the tiers' writers (every entry complete when the command exits); the store's
    bytes (measured, ready entries) against the same tokens in the KV cache dtype."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from polykv_vllm.connector.connector import PolyKVConnector

    core = llm.llm_engine.engine_core.engine_core
    index = core.scheduler.connector.index
    worker = get_kv_transfer_group()
    assert isinstance(worker, PolyKVConnector) and worker.worker is not None
    if worker.worker.tiers is not None:
        worker.worker.tiers.put_pending()
        if not worker.worker.tiers.flush(600):
            logger.warning("polykv warm: the tier writes did not finish within 600 s")
    real, raw = index.real_bytes, index.raw_bytes
    return {"stored_bytes": real, "cache_dtype_bytes": raw, "ratio": raw / real if real else 0.0}
