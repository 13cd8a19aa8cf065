"""The two quantizers of the codec, as pure functions on ``[T, H, D]`` tensors.

- :func:`int8_encode` / :func:`int8_decode`: symmetric int8 with one fp16 scale per (token, head),
  used for keys at 8 bits.
- :func:`rotated_encode` / :func:`rotated_decode`: norm + seeded random-sign Hadamard rotation +
  Lloyd-Max centroids of N(0, 1), bit-packed; used for values and for low-bit (rotated) keys.

All arithmetic is float32 whatever the input dtype; see ``docs/FORMAT.md`` for the byte layout.
"""

from __future__ import annotations

import math

import torch

from polykv_vllm.core import bitpack
from polykv_vllm.core.hadamard import rotate, unrotate

__all__ = ["int8_decode", "int8_encode", "rotated_decode", "rotated_encode"]


def int8_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (token, head).

    ``x``: float ``[T, H, D]``. Returns ``(codes int8 [T, H, D], scale float16 [T, H])`` with
    ``scale = fp16(max_i |x_i| / 127)`` and ``codes = clamp(round(x / scale), -127, 127)``; the
    codes are computed from the fp16-rounded scale so decode is consistent with it. A row whose
    scale is 0 (all zeros, or below fp16's smallest subnormal) stores codes 0.
    """
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1) / 127.0).to(torch.float16)
    s = scale.to(torch.float32).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(xf / safe).clamp_(-127, 127)
    codes = torch.where(s > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scale


def int8_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes`` int8 ``[T, H, D]``, ``scale`` fp16 ``[T, H]`` -> float32 ``[T, H, D]``."""
    return codes.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)


def rotated_encode(
    x: torch.Tensor, bits: int, signs: torch.Tensor, boundaries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm + rotation + Lloyd-Max codes.

    ``x``: float ``[T, H, D]``; ``signs``: ±1 ``[D]``; ``boundaries``: fp32 ``[2**bits - 1]``
    ascending decision thresholds of the centroids. Returns
    ``(codes uint8 [T, H, ceil(D/8)*bits], norm float16 [T, H])``. A zero row gets norm 0 and
    the codes of a zero coordinate; it decodes to zeros.
    """
    d = x.shape[-1]
    xf = x.to(torch.float32)
    norm = torch.linalg.vector_norm(xf, dim=-1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(-1)
    z = rotate(xf / safe, signs) * math.sqrt(d)
    return bitpack.pack(_bucket(z, boundaries), bits), norm.to(torch.float16)


def _bucket(z: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """The code of each value: how many thresholds lie strictly below it (a value equal to a
    threshold takes the lower code, like argmin |z - c|) — ``torch.bucketize(z, boundaries)``.

    Up to 15 thresholds (4 bits) it is one compare-and-add pass per threshold instead of
    bucketize's per-element binary search (the largest item of the CPU encode profile); the
    codes are identical.
    """
    bounds = boundaries.to(dtype=torch.float32)
    if bounds.numel() > 15:
        return torch.bucketize(z, bounds.to(z.device))
    # thresholds as Python floats when they live on the CPU (no device sync), else 0-d tensors
    values = bounds.tolist() if bounds.device.type == "cpu" else list(bounds.to(z.device))
    codes = torch.zeros(z.shape, dtype=torch.uint8, device=z.device)
    for b in values:
        codes += z > b
    return codes


def rotated_decode(
    packed: torch.Tensor,
    norm: torch.Tensor,
    bits: int,
    signs: torch.Tensor,
    centroids: torch.Tensor,
    norm_correction: bool,
) -> torch.Tensor:
    """Inverse of :func:`rotated_encode`: -> float32 ``[T, H, D]`` with ``D = signs.numel()``.

    ``u' = R^T (centroids[code] / sqrt(D))`` and ``x' = norm * u'``; with ``norm_correction``,
    ``x' = norm * u' / ||u'||`` so the decoded vector has exactly the stored norm.
    """
    d = signs.numel()
    codes = bitpack.unpack(packed, bits, d).to(torch.int64)
    table = centroids.to(device=packed.device, dtype=torch.float32)
    y = table[codes] * (1.0 / math.sqrt(d))
    n = norm.to(torch.float32).unsqueeze(-1)
    if norm_correction:
        # ||R^T y|| == ||y||: correct before rotating back.
        length = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        n = n / torch.where(length > 0, length, torch.ones_like(length))
    return unrotate(y, signs) * n
