"""Shared-prefix attention (Hydragen): attend to the prefix once for every agent, to each agent's
suffix separately, merge the two by log-sum-exp.

Shapes (``N`` agents, ``M`` query tokens per agent this step, ``H = Hkv * G`` query heads with
``G`` query heads per KV head, ``D`` head dim, ``P`` prefix tokens, ``S`` suffix slots):

- queries ``[N, H, M, D]`` (the model's layout after RoPE);
- prefix keys / values ``[P, Hkv, D]`` (one decoded pool layer, shared by all agents);
- suffix keys / values ``[N, Hkv, S, D]`` with a boolean mask ``[N, M, S]`` (True = attend).

Query head ``h`` reads KV head ``h // G`` (transformers' ``repeat_kv``). For the prefix, the
``G * N * M`` queries of one KV head are folded into one query axis, so the prefix attention is
one matrix-matrix product per KV head instead of ``N`` matrix-vector products: that is where the
batched speed comes from. Two backends with the same signature: :func:`prefix_attention_torch`
(reference, any device) and :func:`prefix_attention_xformers` (CUDA, ``xformers.ops.fmha``).
Outputs are float32; LSEs are float32 natural-log sums.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

__all__ = [
    "BACKENDS",
    "PrefixAttention",
    "attend_torch",
    "merge",
    "prefix_attention_torch",
    "prefix_attention_xformers",
    "resolve_backend",
    "suffix_attention",
    "suffix_attention_merged",
    "suffix_bias",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "xformers")

#: ``(queries [N, H, M, D], keys [P, Hkv, D], values [P, Hkv, D], scale)`` ->
#: ``(out float32 [N, H, M, D], lse float32 [N, H, M])``.
PrefixAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


def attend_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in float32: ``q [B, Hkv, R, D]``, ``k`` / ``v [B, Hkv, T, D]``, ``mask``
    bool broadcastable to ``[B, Hkv, R, T]`` or None. Returns ``out [B, Hkv, R, D]`` and
    ``lse [B, Hkv, R]`` (float32). Rows whose mask is all False get ``lse = -inf`` and out 0.

    One score tensor, modified in place (scale applied to the queries, max subtracted, exp): the
    elementwise passes over ``[R, T]`` cost more than the two matrix products on CPU."""
    scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all-masked rows
    probs = scores.sub_(top).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs, v.float()) / total.clamp(min=torch.finfo(torch.float32).tiny)
    return out, (top + total.log()).squeeze(-1)


def _cpu_flash() -> Callable[..., tuple[torch.Tensor, ...]] | None:
    """torch's fused CPU flash-attention kernel, which returns the LSE (torch >= 2.2), or None."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


#: Query dtypes the fused CPU kernel takes.
_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fold(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[N, H, M, D]`` -> ``[1, Hkv, G * N * M, D]`` (all agents' queries of one KV head)."""
    n, h, m, d = q.shape
    g = h // kv_heads
    return q.view(n, kv_heads, g, m, d).permute(1, 2, 0, 3, 4).reshape(1, kv_heads, g * n * m, d)


def _unfold(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`_fold` for ``[1, Hkv, G*N*M, *rest]`` -> ``[N, H, M, *rest]``."""
    kv_heads, rows = x.shape[1], x.shape[2]
    g = rows // (n * m)
    rest = x.shape[3:]
    y = x.reshape(kv_heads, g, n, m, *rest).permute(2, 0, 1, 3, *range(4, 4 + len(rest)))
    return y.reshape(n, kv_heads * g, m, *rest)


def prefix_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference prefix attention (see module docstring for shapes); any device.

    On CPU it is torch's fused flash-attention kernel, which returns the LSE and never holds the
    ``[R, P]`` score tensor (SmolLM2's shapes, 2072-token prefix, 1 thread: 9 vs 26 ms per layer
    for 64 agents' decoding step, 157 vs 791 ms for their 22-token prefill); on CUDA torch's
    memory-efficient kernel (``aten._scaled_dot_product_efficient_attention`` with the LSE, in
    the inputs' dtype with float32 accumulation: one launch instead of a dozen ops and the float32
    copies of the prefix) where it runs (:func:`_cuda_fused_problem`, probed once per device,
    dtype and head dim), :func:`attend_torch` otherwise (and on MPS)."""
    n, _, m, _ = q.shape
    kv_heads = k.shape[1]
    folded = _fold(q, kv_heads)
    keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    flash = _cpu_flash()
    if q.device.type == "cpu" and flash is not None and q.dtype in _CPU_FLASH_DTYPES:
        out, lse = flash(folded, keys, values, scale=scale)[:2]
        out = out.float()
    elif q.device.type == "cuda" and _cuda_fused_problem(q.device, q.dtype, q.shape[-1]) is None:
        out, lse = _cuda_fused(folded, keys.to(q.dtype), values.to(q.dtype), scale)
    else:
        out, lse = attend_torch(folded, keys, values, scale)
    return _unfold(out, n, m), _unfold(lse.float().unsqueeze(-1), n, m).squeeze(-1)


def _cuda_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [1, Hkv, R, D]``, ``k`` / ``v [1, Hkv, P, D]`` (one dtype) -> float32 ``out [1, Hkv,
    R, D]`` and ``lse [1, Hkv, R]`` by torch's memory-efficient CUDA kernel (its LSE is padded
    to a multiple of 32 rows)."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False, scale=scale
    )[:2]
    return out.float(), lse[..., : q.shape[2]]


_FUSED: dict[tuple[str, torch.dtype, int], str | None] = {}  # (device, dtype, head dim): problem


def _cuda_fused_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when :func:`_cuda_fused` runs and agrees with :func:`attend_torch` on a small case
    of ``dtype`` and ``head_dim`` on ``device`` (checked once per key), else why not (logged
    once; the caller then uses :func:`attend_torch`)."""
    key = (str(device), dtype, head_dim)
    if key not in _FUSED:
        _FUSED[key] = _probe_fused(device, dtype, head_dim)
        if _FUSED[key] is not None:
            logger.info("%s: prefix attention uses attend_torch on %s", _FUSED[key], device)
    return _FUSED[key]


def _probe_fused(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if not hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention"):
        return "torch has no aten._scaled_dot_product_efficient_attention"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(1, 2, rows, head_dim, generator=gen, device=device).to(dtype)
            for rows in (40, 70, 70)
        )
        out, lse = _cuda_fused(q, k, v, head_dim**-0.5)
        want_out, want_lse = attend_torch(q, k, v, head_dim**-0.5)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        if not (
            out.shape == want_out.shape
            and lse.shape == want_lse.shape
            and torch.allclose(out, want_out, atol=tol, rtol=tol)
            and torch.allclose(lse, want_lse, atol=tol, rtol=tol)
        ):
            return f"the fused CUDA attention disagrees with attend_torch ({dtype}, D={head_dim})"
    except Exception as exc:  # a kernel refusing a dtype / head dim raises RuntimeError
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        return f"the fused CUDA attention cannot run ({type(exc).__name__}: {first:.200})"
    return None


def prefix_attention_xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix attention with ``xformers.ops.fmha.memory_efficient_attention_partial`` (CUDA).

    The folded queries are ``[1, G*N*M, Hkv, D]`` (xformers' BMHK), keys ``[1, P, Hkv, D]``: one
    kernel call per layer for all agents, no mask (every query sees the whole prefix).
    """
    from xformers.ops import fmha

    n, _, m, _ = q.shape
    kv_heads = k.shape[1]
    folded = _fold(q, kv_heads)  # [1, Hkv, R, D]
    query = folded.transpose(1, 2).contiguous()  # [1, R, Hkv, D]
    out, lse = fmha.memory_efficient_attention_partial(
        query, k.unsqueeze(0), v.unsqueeze(0), scale=scale
    )
    rows = query.shape[1]
    out_f = out.float().transpose(1, 2)  # [1, Hkv, R, D]
    lse_f = lse[..., :rows].float()  # [1, Hkv, R] (some kernels pad M)
    return _unfold(out_f, n, m), _unfold(lse_f.unsqueeze(-1), n, m).squeeze(-1)


def suffix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each agent's own suffix: ``q [N, H, M, D]``, ``k`` / ``v [N, Hkv, S, D]``, ``mask`` bool
    ``[N, M, S]``. Returns float32 ``out [N, H, M, D]`` and ``lse [N, H, M]``."""
    n, h, m, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    grouped = q.reshape(n, kv_heads, g * m, d)  # heads h = kv * G + j, rows j * M + i
    full_mask = mask.unsqueeze(1).repeat(1, g, 1, 1).reshape(n, 1, g * m, -1)
    out, lse = attend_torch(grouped, k, v, scale, full_mask)
    return out.reshape(n, h, m, d), lse.reshape(n, h, m)


def suffix_bias(mask: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """The additive float32 bias of :func:`suffix_attention_merged` for a boolean ``mask``
    ``[N, M, S]``: ``[N * kv_heads, groups * M, S]``, 0 where a query may read a slot, ``-inf``
    elsewhere (rows ``j * M + i`` for query head ``kv * groups + j``, query ``i``). It depends on
    the step, not the layer: the decoder builds it once per forward pass."""
    n, m, s = mask.shape
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    bias.masked_fill_(~mask, float("-inf"))
    return bias.unsqueeze(1).expand(n, kv_heads * groups, m, s).reshape(n * kv_heads, -1, s)


def suffix_attention_merged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    out_p: torch.Tensor,
    lse_p: torch.Tensor,
) -> torch.Tensor:
    """:func:`merge` of the prefix result ``(out_p [N, H, M, D], lse_p [N, H, M])`` with
    :func:`suffix_attention`, in one pass and fewer ops: float32 ``[N, H, M, D]``.

    ``q [N, H, M, D]``, suffix ``k`` / ``v [N, Hkv, S, D]``, ``bias`` from :func:`suffix_bias`.
    The suffix scores start from the prefix's log-sum-exp as the running maximum (the online
    softmax step of flash attention): ``top = max(lse_p, max_s score)``, ``out = (exp(lse_p -
    top) * out_p + exp(score - top) @ v) / (exp(lse_p - top) + sum exp(score - top))``. ``lse_p``
    is finite (the prefix is never empty), so rows whose suffix is all masked (left padding)
    get the prefix result, without NaN. Scale and bias are applied by ``baddbmm``.
    """
    n, h, m, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = h // kv_heads
    rows = g * m
    q3 = q.reshape(n * kv_heads, rows, d).float()  # heads h = kv * G + j, rows j * M + i
    k3 = k.reshape(n * kv_heads, s, d).float()
    v3 = v.reshape(n * kv_heads, s, v.shape[-1]).float()
    scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)  # [B, R, S]
    lse3 = lse_p.reshape(n * kv_heads, rows, 1)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), lse3)
    probs = scores.sub_(top).exp_()
    w_p = (lse3 - top).exp_()
    total = probs.sum(dim=-1, keepdim=True).add_(w_p)
    out = torch.baddbmm(out_p.reshape(n * kv_heads, rows, d) * w_p, probs, v3)
    return out.div_(total).view(n, h, m, d)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over the union of two key sets from the two partial results: ``out_*``
    ``[..., D]`` float32, ``lse_*`` ``[...]``; ``lse_b`` may be ``-inf`` (empty part)."""
    top = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - top).unsqueeze(-1)
    w_b = torch.exp(lse_b - top).unsqueeze(-1)
    return (out_a * w_a + out_b * w_b) / (w_a + w_b)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"xformers"`` for ``backend`` in :data:`BACKENDS` on ``device``.

    ``auto`` picks xformers on CUDA when it is installed, torch otherwise. ``xformers`` off CUDA
    is an error; ``xformers`` (or ``auto``) on CUDA without a usable package (not installed, or
    it fails to import, or it lacks ``fmha.memory_efficient_attention_partial``) falls back to
    torch with one log line. ``SharedPool.memory_summary(n).batched_backend`` records which one ran.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {list(BACKENDS)}.")
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        if backend == "xformers":
            raise ValueError(
                f"backend='xformers' needs a CUDA model, but the pool is on device={device}: "
                "use backend='torch' or 'auto'."
            )
        return "torch"
    problem = _xformers_problem(device)
    if problem is not None:
        logger.info(
            "%s: shared-prefix attention uses the torch backend "
            "(pip install 'polykv-vllm[xformers]' for the CUDA kernels)",
            problem,
        )
        return "torch"
    return "xformers"


def _xformers_problem(device: torch.device | None = None) -> str | None:
    """Why xformers cannot serve the prefix attention (on ``device``, when given), or None when
    it can. With a device, a tiny call checks it once per device: a wheel built without CUDA
    operators (PyPI's 0.0.35 on the H200 host) imports fine and fails only when called."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    try:
        from xformers.ops import fmha
    except Exception as exc:  # a wheel built for another torch or CUDA fails in many ways
        return f"xformers failed to import ({type(exc).__name__}: {exc})"
    if not hasattr(fmha, "memory_efficient_attention_partial"):
        return "xformers has no fmha.memory_efficient_attention_partial (too old)"
    return None if device is None else _xformers_runs(fmha, device)


_RUNS: dict[tuple[int, str], str | None] = {}  # (id of the fmha module, device): the probe's answer


def _xformers_runs(fmha: object, device: torch.device) -> str | None:
    """None if ``fmha.memory_efficient_attention_partial`` runs on ``device``, else why not
    (probed once per module and device)."""
    key = (id(fmha), str(device))
    if key not in _RUNS:
        _RUNS[key] = _probe(fmha, device)
    return _RUNS[key]


def _probe(fmha: object, device: torch.device) -> str | None:
    try:
        q = torch.zeros(1, 2, 1, 64, device=device, dtype=torch.bfloat16)
        fmha.memory_efficient_attention_partial(q, q, q, scale=0.125)  # type: ignore[attr-defined]
    except Exception as exc:  # NotImplementedError: "xFormers wasn't build with CUDA support"
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        return f"xformers cannot run on {device} ({type(exc).__name__}: {first:.200})"
    return None


def prefix_backend(name: str) -> PrefixAttention:
    """The prefix-attention function of a resolved backend name."""
    return prefix_attention_xformers if name == "xformers" else prefix_attention_torch
