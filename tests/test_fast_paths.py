"""The fused 4-bit paths (codes kept packed, only nibbles move) against the unpack-then-pack rules.

Rules exercised: GPTQ ``qweight [K/8, N]`` holds code ``(n, 8r+i)`` in bits ``4i..4i+3`` of word
``[r, n]`` (checkpoint_formats.md §1); AWQ GEMM nibble ``p`` holds logical column
``8c + AWQ_ORDER[p]``, ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (AutoAWQ ``packing_utils.py``,
§2.2); compressed-tensors ``weight_packed [N, K/8]`` is the LSB-first bitstream along K (§3);
Ascend int4pack ``[K, N/8]`` holds signed ``q - 8`` of column ``8j+t`` in bits ``4t..4t+3`` of
word ``[k, j]`` (torch_npu_ops.md §0.1). And the end-to-end rule that matters: every fixture
converts to identical bytes with and without the fast path, for every target.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import FIXTURES, open_fixture
from npuconv import model, packing
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import NpuconvError
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.packing import (
    NIBBLE_HIGH_BITS,
    awq_pack,
    awq_words_to_bitstream,
    int4_words_k_to_n,
    int4_words_nk_to_kn,
    pack_bitstream,
    transpose_nibble_blocks,
)
from npuconv.registry import target_names

CHECKPOINTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def words(*values: int) -> torch.Tensor:
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


def test_nibble_block_transpose_hand_worked():
    # word t = 0x{t}{t}{t}{t}{t}{t}{t}{t} (row t all t) transposes to every word 0x76543210 (column = index)
    rows = words(*(int(f"{t:x}" * 8, 16) for t in range(8)))
    block = transpose_nibble_blocks(rows, 0)
    assert block.tolist() == words(*[0x76543210] * 8).tolist()
    assert transpose_nibble_blocks(block, 0).tolist() == rows.tolist()  # an involution
    assert rows.tolist() == words(*(int(f"{t:x}" * 8, 16) for t in range(8))).tolist()  # input untouched


def test_nibble_block_transpose_into_other_dim():
    # two matrices side by side, words along the last dim, written with the words along dim 0;
    # word t of matrix m = nibbles (16m + 2t + i) % 16 → nibble i of word t of the result = (16m + 2i + t) % 16
    def word(m, t, swap):
        return sum(((16 * m + (2 * t + i if not swap else 2 * i + t)) % 16) << (4 * i) for i in range(8))
    source = torch.stack([words(*(word(m, t, False) for t in range(8))) for m in range(2)])  # [2, 8]
    out = torch.empty(8, 2, dtype=torch.int32)
    assert transpose_nibble_blocks(source, 1, out, 0) is out
    assert out.t().tolist() == [words(*(word(m, t, True) for t in range(8))).tolist() for m in range(2)]


def test_awq_word_to_bitstream_hand_worked():
    # AWQ stores logical columns 0..7 as nibbles 0,2,4,6,1,3,5,7: the word 0x75316420 holds 0..7 in order
    assert awq_words_to_bitstream(words(0x75316420)).tolist() == words(0x76543210).tolist()


@pytest.mark.parametrize("chunk_words", [1 << 19, 7])  # one chunk; chunks of 7 words, the last partial
@pytest.mark.parametrize("n, k", [(8, 8), (24, 64), (64, 40)])
def test_repacks_match_unpack_then_pack(n, k, chunk_words, monkeypatch):
    monkeypatch.setattr(packing, "CACHE_CHUNK_WORDS", chunk_words)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    expected = pack_bitstream(codes.t().contiguous(), 4)  # [K, N/8], LSB-first along N
    along_k = pack_bitstream(codes, 4)  # [N, K/8]: CT weight_packed, or GPTQ qweight transposed
    gptq = along_k.t().contiguous()
    assert torch.equal(int4_words_k_to_n(gptq), expected)
    assert torch.equal(int4_words_nk_to_kn(along_k), expected)
    assert torch.equal(awq_words_to_bitstream(awq_pack(codes.t())), expected)
    assert torch.equal(gptq, along_k.t())  # inputs untouched
    signed = pack_bitstream(codes.t().contiguous() ^ 8, 4)  # the flip: q - 8 as two's-complement nibbles
    assert torch.equal(int4_words_k_to_n(gptq, NIBBLE_HIGH_BITS), signed)
    assert torch.equal(int4_words_nk_to_kn(along_k, NIBBLE_HIGH_BITS), signed)
    assert torch.equal(awq_words_to_bitstream(awq_pack(codes.t()), NIBBLE_HIGH_BITS), signed)


def test_high_bits_constant_is_signed_offset():
    # two's-complement nibble of q - 8 is q ^ 8, in all 8 nibbles of a word
    assert (words(0x76543210) ^ NIBBLE_HIGH_BITS).tolist() == words(0xFEDCBA98).tolist()


def test_packed_layer_unpacks_on_first_read():
    codes = torch.randint(0, 16, (16, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    spec = LinearSpec("m", out_features=16, in_features=32, bits=4, group_size=-1, symmetric=True)
    signed_words = pack_bitstream(codes.t().contiguous() ^ 8, 4)  # q - 8 as two's-complement nibbles
    layer = QuantizedLinear(spec, None, torch.ones(16, 1), packed_kn=signed_words)
    assert torch.equal(layer.qweight, codes)
    assert torch.equal(model.dequantize(layer), codes.float() - 8)


def test_signed_layer_makes_codes_on_first_read():
    signed = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    spec = LinearSpec("m", out_features=1, in_features=4, bits=8, group_size=-1, symmetric=True)
    layer = QuantizedLinear(spec, None, torch.ones(1, 1), signed=signed)
    assert layer.signed_codes() is signed  # the stored bytes, untouched
    assert layer.qweight.tolist() == [[0, 127, 128, 255]]  # q = s + 128
    assert torch.equal(QuantizedLinear(spec, layer.qweight, torch.ones(1, 1)).signed_codes(), signed)
    assert torch.equal(model.dequantize(layer), signed.float())


@pytest.mark.parametrize("name", ["ct020_w8a8_int", "ms_w8a8_static_fp16", "ct020_moe_mixtral_w8a8_int"])
def test_int8_readers_hand_over_the_stored_bytes(name):
    reader = open_fixture(name)
    specs = [spec for spec in reader.linear_specs() if spec.bits == 8]
    assert specs
    for spec in specs:
        layer = reader.load(spec)
        assert layer.signed is not None and layer.signed.dtype == torch.int8, spec.name
        assert torch.equal(layer.signed_codes().view(torch.uint8) ^ 0x80, layer.qweight), spec.name


def _tree(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _convert(name: str, target: str, out) -> dict[str, str] | str:
    try:
        convert(FIXTURES / name, out, ConvertOptions(target=target, workers=0))
    except NpuconvError as e:
        return f"{type(e).__name__}: {e}"
    return _tree(out)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fixture_bytes_identical_with_and_without_packed_codes(name, tmp_path, monkeypatch):
    for target in target_names():
        fast = _convert(name, target, tmp_path / f"{target}-fast")
        monkeypatch.setattr(model, "PACKED_CODES", False)
        slow = _convert(name, target, tmp_path / f"{target}-slow")
        monkeypatch.setattr(model, "PACKED_CODES", True)
        assert fast == slow, f"{name} → {target}"
