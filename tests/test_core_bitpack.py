"""Exact b-bit packing: round trips and the documented little-endian layout."""

from __future__ import annotations

import pytest
import torch

from polykv_vllm.core.bitpack import pack, packed_len, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 59, 64, 80, 1025])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_round_trip_exact(bits: int, n: int, lead: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(bits * 10_000 + n)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=gen).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_len(n, bits))
    assert packed_len(n, bits) == -(-n // 8) * bits
    assert torch.equal(unpack(packed, bits, n), codes)


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """Bit-string definition from docs/FORMAT.md, one bit at a time."""
    n = -(-len(codes) // 8) * 8
    stream = []
    for i in range(n):
        c = codes[i] if i < len(codes) else 0
        stream += [(c >> j) & 1 for j in range(bits)]
    return [sum(stream[8 * j + t] << t for t in range(8)) for j in range(len(stream) // 8)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 8, 13])
def test_layout_matches_bit_string_definition(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    assert pack(codes, bits).tolist() == _reference_pack(codes.tolist(), bits)


def test_three_bit_example() -> None:
    # codes 0..7: bit string 000 100 010 110 001 101 011 111 (LSB first) -> 0x88, 0xC6, 0xFA
    assert pack(torch.arange(8), 3).tolist() == [0x88, 0xC6, 0xFA]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="allowed 1..8"):
        pack(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match=r"expected ceil\(n/8\)\*bits = 6"):
        unpack(torch.zeros(5, dtype=torch.uint8), 3, 16)
