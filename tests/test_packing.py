"""Bit-packing primitives: hand-worked vectors from the format specs and round trips."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from npuconv.packing import (
    awq_pack,
    awq_unpack,
    pack_bitstream,
    pack_nibbles,
    pack_padded_words,
    signed_nibbles,
    unpack_bitstream,
    unpack_nibbles,
    unpack_padded_words,
)


def words(*values: int) -> torch.Tensor:
    return torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32)


def test_4bit_word_lsb_first():
    # checkpoint_formats.md §1.3: element j at bits [4j, 4j+4): 0x76543210 holds 0,1,...,7
    assert unpack_bitstream(words(0x76543210), 4, 8).tolist() == list(range(8))


def test_3bit_stream_straddles_words():
    # §1.3: value 10 has its low 2 bits at bits 30-31 of word0 and bit 2 at bit 0 of word1;
    # value 21 has bit 0 at bit 31 of word1 and bits 1-2 at bits 0-1 of word2.
    codes = [0] * 32
    codes[10] = 0b101
    codes[21] = 0b011
    packed = words(0b01 << 30, (1 << 0) | (1 << 31), 0b01)
    assert unpack_bitstream(packed, 3, 32).tolist() == codes
    assert torch.equal(pack_bitstream(torch.tensor(codes), 3), packed)


def test_legacy_padded_3bit_ten_per_word():
    # compressed-tensors <= 0.17: 10 codes per word at bits 3j, bits 30-31 unused
    packed = words((7 << 27) | (5 << 0), 3 << 0)
    expected = [5] + [0] * 8 + [7] + [3] + [0] * 9
    assert unpack_padded_words(packed, 3, 20).tolist() == expected


def test_awq_interleaved_order():
    # §2.2: nibble i holds logical column AWQ_ORDER[i] = [0,2,4,6,1,3,5,7]
    # word 0x73625140: nibbles (low→high) 0,4,1,5,2,6,3,7 → logical columns 0..7 = 0,1,...,7
    assert awq_unpack(words(0x75316420), 8).tolist() == list(range(8))


def test_nibble_pairs_even_in_low_nibble():
    # torch_npu_ops.md §0.1: byte = (odd << 4) | (even & 0xF)
    assert pack_nibbles(torch.tensor([1, -1, 7, -8], dtype=torch.int8)).tolist() == [0xF1, 0x87]
    assert signed_nibbles(unpack_nibbles(torch.tensor([0x8F], dtype=torch.uint8))).tolist() == [-1, -8]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 70), st.integers(1, 3), st.randoms())
def test_bitstream_round_trip(bits, n, rows, rnd):
    codes = torch.tensor([[rnd.randrange(2**bits) for _ in range(n)] for _ in range(rows)], dtype=torch.uint8)
    assert torch.equal(unpack_bitstream(pack_bitstream(codes, bits), bits, n), codes)
    assert torch.equal(unpack_padded_words(pack_padded_words(codes, bits), bits, n), codes)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.randoms())
def test_awq_round_trip(groups, rnd):
    codes = torch.tensor([rnd.randrange(16) for _ in range(8 * groups)], dtype=torch.uint8)
    assert torch.equal(awq_unpack(awq_pack(codes), 8 * groups), codes)
