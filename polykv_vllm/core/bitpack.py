"""Exact little-endian packing of ``b``-bit codes (``b`` = 1..8) along the last dim.

Code ``i`` of a row occupies bits ``[b*i, b*i + b)`` of the row's bit string and byte ``j`` holds
bits ``[8j, 8j + 8)`` (least significant bit first). Rows are padded with zero codes to a multiple
of 8 codes, so 8 codes always fill exactly ``b`` bytes: a row of ``n`` codes packs into
``ceil(n / 8) * b`` bytes.
"""

from __future__ import annotations

import torch

__all__ = ["pack", "packed_len", "unpack"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width bits={bits!r} is not supported: allowed 1..8.")


def packed_len(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes at ``bits`` bits: ``ceil(n / 8) * bits``."""
    _check_bits(bits)
    return -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (integer ``[..., n]``, each in ``[0, 2**bits)``) into uint8 ``[..., L]``.

    ``L = ceil(n / 8) * bits``. Codes are not range-checked (that would cost a device sync); bits
    above ``bits`` are masked off.
    """
    _check_bits(bits)
    lead, n = codes.shape[:-1], codes.shape[-1]
    groups = -(-n // 8)
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    if groups * 8 != n:
        c = torch.nn.functional.pad(c, (0, groups * 8 - n))
    if bits == 8:
        return c.to(torch.uint8)
    c = c.reshape(*lead, groups, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    # At most 7 * 8 = 56 bits per group: fits an int64 word without touching the sign bit.
    word = (c << shifts).sum(dim=-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, groups * bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(n/8)*bits]`` -> uint8 codes ``[..., n]``."""
    _check_bits(bits)
    lead = packed.shape[:-1]
    groups = -(-n // 8)
    if packed.shape[-1] != groups * bits:
        raise ValueError(
            f"packed row length {packed.shape[-1]} does not match n={n} codes at bits={bits}: "
            f"expected ceil(n/8)*bits = {groups * bits} bytes."
        )
    if bits == 8:
        return packed.to(torch.uint8)[..., :n].contiguous()
    p = packed.to(torch.int64).reshape(*lead, groups, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, groups * 8)[..., :n].contiguous()
