"""compressed-tensors reader: real CT 0.20.0 fixtures (bit-exact against CT's own decompress),
hand-worked layouts from the format spec (checkpoint_formats.md §3), a spec-derived packer round
trip, and broken checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_reference, open_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import FP4_E2M1, FP8_E4M3, INT, SCALE_E8M0, SCALE_FLOAT, ActivationQuant, dequantize
from npuconv.readers import open_reader
from npuconv.packing import unpack_columns, unpack_rows
from npuconv.readers.compressed_tensors import CompressedTensorsReader
from npuconv.io.safetensors_io import save_file

CT_FIXTURES = ["ct020_w4a16_g32_asym", "ct020_w8a8_int", "ct020_fp8_static", "ct020_mxfp8a16", "ct020_nvfp4a16"]


def i32(word: int) -> int:
    """An unsigned 32-bit word as the signed int32 safetensors stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


# ------------------------------------------------------------------------------------ real fixtures
@pytest.mark.parametrize("name", CT_FIXTURES)
def test_fixture_bit_exact(name):
    reader = open_fixture(name)
    assert isinstance(reader, CompressedTensorsReader)
    reference = load_reference(name)
    specs = reader.linear_specs()
    assert {spec.name + ".weight" for spec in specs} == set(reference)
    for spec in specs:
        weight = dequantize(reader.load(spec))
        assert weight.dtype == torch.float32
        assert torch.equal(weight, reference[spec.name + ".weight"]), spec.name
    assert reader.warnings == []


# name → (bits, group_size, symmetric, scheme, source_scheme, weight_format, scale_format, scale_dtype, activation)
FIXTURE_SPECS = {
    "ct020_w4a16_g32_asym": (4, 32, False, "w4a16", "pack-quantized", INT, SCALE_FLOAT, "bfloat16", None),
    "ct020_w8a8_int": (
        8, -1, True, "w8a8_dynamic", "int-quantized", INT, SCALE_FLOAT, "bfloat16",
        ActivationQuant(INT, 8, dynamic=True, strategy="token", symmetric=True),
    ),
    "ct020_fp8_static": (
        8, -1, True, "w8a8_fp8", "float-quantized", FP8_E4M3, SCALE_FLOAT, "bfloat16",
        ActivationQuant(FP8_E4M3, 8, dynamic=False, strategy="tensor", symmetric=True),
    ),
    "ct020_mxfp8a16": (8, 32, True, "w8a16_mxfp8", "mxfp8-quantized", FP8_E4M3, SCALE_E8M0, "uint8", None),
    "ct020_nvfp4a16": (
        4, 16, True, "w4a16_nvfp4", "nvfp4-pack-quantized", FP4_E2M1, SCALE_FLOAT, "float8_e4m3fn", None,
    ),
}


@pytest.mark.parametrize("name", CT_FIXTURES)
def test_fixture_specs(name):
    bits, group_size, symmetric, scheme, source, weight_format, scale_format, scale_dtype, act = FIXTURE_SPECS[name]
    reader = open_fixture(name)
    specs = reader.linear_specs()
    assert len(specs) == 7  # q k v o gate up down of the one layer
    for spec in specs:
        assert (spec.bits, spec.group_size, spec.symmetric) == (bits, group_size, symmetric)
        assert spec.scheme == scheme and spec.source_scheme == source
        assert (spec.weight_format, spec.scale_format, spec.scale_dtype) == (weight_format, scale_format, scale_dtype)
        assert spec.activation == act
        assert not spec.act_order and not spec.has_bias and spec.num_experts is None
        assert spec.has_global_scale == (source == "nvfp4-pack-quantized")
    down = next(s for s in specs if s.name.endswith("down_proj"))
    assert (down.out_features, down.in_features) == (128, 256)
    assert reader.summary() == {"ct_version": "0.20.0", "quantization_status": "compressed", "formats": [source]}
    passthrough = reader.passthrough_names()
    assert "lm_head.weight" in passthrough and "model.embed_tokens.weight" in passthrough
    consumed = {t for spec in specs for t in spec.source_tensors}
    assert all(reader.ckpt.has(t) for t in consumed)
    assert set(passthrough) | consumed == set(reader.ckpt.names())
    # nothing quantized leaks into the passthrough set
    assert not any(n.rsplit(".", 1)[-1].startswith(("weight_", "input_")) for n in passthrough)


def test_fixture_static_input_scale_is_fp32():
    reader = open_fixture("ct020_fp8_static")
    for spec in reader.linear_specs():
        layer = reader.load(spec)
        stored = reader.ckpt.get(spec.name + ".input_scale")
        assert layer.input_scale.dtype == torch.float32 and layer.input_scale.shape == (1,)
        assert torch.equal(layer.input_scale, stored.float().reshape(1))
        assert layer.scale.shape == (spec.out_features, 1)  # tensor scale [1] expanded to [N, 1]


def test_fixture_nvfp4_as_documented():
    """fp4 value * (fp8 scale in fp32 / global scale), fp32, that order (model.py) == CT's decompress."""
    reader = open_fixture("ct020_nvfp4a16")
    reference = load_reference("ct020_nvfp4a16")
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    for spec in reader.linear_specs():
        layer = reader.load(spec)
        assert layer.qweight.dtype == torch.uint8 and int(layer.qweight.max()) <= 15
        scale = layer.scale.float() / layer.global_scale
        weight = e2m1[layer.qweight.long()] * scale.repeat_interleave(16, dim=1)
        assert torch.equal(weight, reference[spec.name + ".weight"])


# ------------------------------------------------------------------------------------ tiny checkpoints
def int_args(bits, strategy="group", group_size=None, symmetric=True, **extra):
    return {"num_bits": bits, "type": "int", "strategy": strategy, "group_size": group_size,
            "symmetric": symmetric, "dynamic": False, **extra}


def group(fmt, weights, inputs=None, targets=("Linear",)):
    return {"targets": list(targets), "weights": weights, "input_activations": inputs,
            "output_activations": None, "format": fmt}


def make_ckpt(root: Path, tensors: dict, groups: dict, version="0.20.0", fmt=None, **extra) -> Path:
    qc = {"quant_method": "compressed-tensors", "version": version, "quantization_status": "compressed",
          "format": fmt or next(iter(groups.values()))["format"], "config_groups": groups, "ignore": ["lm_head"],
          "sparsity_config": {}, "transform_config": {}, "kv_cache_scheme": None, **extra}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    tensors = {"lm_head.weight": torch.zeros(2, 4, dtype=torch.bfloat16), **tensors}
    save_file(tensors, root / "model.safetensors")
    return root


def read(root: Path) -> CompressedTensorsReader:
    reader = open_reader(Checkpoint(root))
    assert isinstance(reader, CompressedTensorsReader)
    return reader


def only_layer(root: Path):
    reader = read(root)
    (spec,) = reader.linear_specs()
    return reader, spec, reader.load(spec)


def packed_module(prefix, words, n, k, scale, zero=None, g_idx=None):
    tensors = {
        f"{prefix}.weight_packed": torch.tensor(words, dtype=torch.int32),
        f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
        f"{prefix}.weight_scale": scale,
    }
    if zero is not None:
        tensors[f"{prefix}.weight_zero_point"] = zero
    if g_idx is not None:
        tensors[f"{prefix}.weight_g_idx"] = torch.tensor(g_idx, dtype=torch.int32)
    return tensors


# A 3-bit row of 12 codes (checkpoint_formats.md §3.2): c0 = 5, c10 = 7, c11 = 3, the rest 0.
CODES_3BIT = [5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 3]
# CT >= 0.18 dense bitstream: c10 sits at bits 30..32, straddling words (low bits 0b11 at 30-31 of
# word 0, its high bit at bit 0 of word 1); c11 at bits 33..35 = bits 1..3 of word 1.
DENSE_3BIT = [i32(0xC0000005), 0b0111]
# CT <= 0.17: 10 codes per word, bits 30-31 unused: word 1 = c10 | c11 << 3 = 7 | 24.
LEGACY_3BIT = [5, 31]


@pytest.mark.parametrize("version, words", [("0.20.0", DENSE_3BIT), ("0.18.0", DENSE_3BIT), ("0.17.1", LEGACY_3BIT)])
def test_3bit_row_hand_worked(tmp_path, version, words):
    tensors = packed_module("m.proj", [words], 1, 12, torch.ones(1, 1))
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(3, "channel"))}, version=version)
    reader, spec, layer = only_layer(root)
    assert (spec.bits, spec.group_size, spec.symmetric, spec.scheme) == (3, -1, True, "w3a16")
    assert layer.qweight.tolist() == [CODES_3BIT]
    assert dequantize(layer).tolist() == [[c - 4 for c in CODES_3BIT]]  # signed q = field - 2**(3-1)


def test_3bit_layout_follows_writer_version():
    """The same two words decode differently in the two layouts (same width, so the version decides)."""
    words = torch.tensor([DENSE_3BIT], dtype=torch.int32)
    assert unpack_rows(words, 3, 12, padded=False).tolist() == [CODES_3BIT]
    assert unpack_rows(words, 3, 12, padded=True).tolist() == [[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0]]


def test_asym_zero_points_packed_along_n(tmp_path):
    # 4-bit, N = 8, K = 8, group 4 → zero points [ceil(8*4/32), 2] = [1, 2] packed along N.
    # column 0 signed zp = [-8, -7, 0, 7, 1, 2, 3, -1] → fields zp + 8 = [0, 1, 8, 15, 9, 10, 11, 7],
    # nibble n of the word = field n (n = 0 lowest) → 0x7BA9F810; column 1 all zp 0 → 0x88888888.
    zero_words = torch.tensor([[i32(0x7BA9F810), i32(0x88888888)]], dtype=torch.int32)
    weight_words = [[i32(0x88888888)] for _ in range(8)]  # every q = 0 → field 8
    scale = torch.tensor([[1.0, 2.0]] * 8, dtype=torch.bfloat16)
    tensors = packed_module("m.proj", weight_words, 8, 8, scale, zero=zero_words)
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(4, "group", 4, symmetric=False))})
    reader, spec, layer = only_layer(root)
    assert not spec.symmetric and spec.group_size == 4
    assert layer.zero.dtype == torch.int16
    assert layer.zero[:, 0].tolist() == [0, 1, 8, 15, 9, 10, 11, 7]
    assert layer.zero[:, 1].tolist() == [8] * 8
    weight = dequantize(layer)
    assert weight[:, 0].tolist() == [8.0, 7.0, 0.0, -7.0, -1.0, -2.0, -3.0, 1.0]  # (8 - zero) * 1
    assert weight[:, 4:].abs().sum() == 0


@pytest.mark.parametrize("version, words", [("0.20.0", DENSE_3BIT), ("0.17.1", LEGACY_3BIT)])
def test_3bit_zero_points_straddle_along_n(tmp_path, version, words):
    # N = 12 rows, one channel zero point each; the packed column is the 3-bit row above.
    zero = torch.tensor([[w] for w in words], dtype=torch.int32)  # [2, 1]
    weight = [[i32(0x24924924)]] * 12  # 3-bit fields 4,4,...: q = 0; K = 10 fills 30 bits of one word
    tensors = packed_module("m.proj", weight, 12, 10, torch.ones(12, 1), zero=zero)
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(3, "channel", symmetric=False))},
                     version=version)
    _, _, layer = only_layer(root)
    assert layer.qweight.unique().tolist() == [4]
    assert layer.zero[:, 0].tolist() == CODES_3BIT


def test_signed_int8_to_unsigned_codes(tmp_path):
    tensors = {
        "m.proj.weight": torch.tensor([[-128, 127, 0, -1]], dtype=torch.int8),
        "m.proj.weight_scale": torch.tensor([[0.5]]),
        "m.proj.weight_zero_point": torch.tensor([[-3]], dtype=torch.int8),
        "m.proj.bias": torch.tensor([1.5], dtype=torch.bfloat16),
    }
    inputs = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
    root = make_ckpt(tmp_path, tensors, {"g": group("int-quantized", int_args(8, "channel", symmetric=False), inputs)})
    _, spec, layer = only_layer(root)
    assert spec.scheme == "w8a8_dynamic" and spec.has_bias and not spec.symmetric
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.tolist() == [[0, 255, 128, 127]]
    assert layer.zero.tolist() == [[125]]  # -3 + 128
    assert dequantize(layer).tolist() == [[-62.5, 65.0, 1.5, 1.0]]  # (q - zp) * 0.5
    assert layer.bias.tolist() == [1.5]


def test_naive_int4_codes_in_int8(tmp_path):
    tensors = {"m.proj.weight": torch.tensor([[-8, 7, 0, 3]], dtype=torch.int8), "m.proj.weight_scale": torch.ones(1)}
    root = make_ckpt(tmp_path, tensors, {"g": group("naive-quantized", int_args(4, "tensor"))})
    _, spec, layer = only_layer(root)
    assert (spec.bits, spec.group_size) == (4, -1)
    assert layer.qweight.tolist() == [[0, 15, 8, 11]] and layer.scale.shape == (1, 1)
    assert dequantize(layer).tolist() == [[-8.0, 7.0, 0.0, 3.0]]


def test_e2m1_nibble_pair_and_e8m0_scale(tmp_path):
    packed = torch.zeros(2, 16, dtype=torch.uint8)
    packed[0, 0] = 0x2F  # low nibble 0xF → k=0: -6.0 (sign bit 3, magnitude index 7); high nibble 2 → k=1: 1.0
    packed[1, 0] = 0x71  # low nibble 1 → 0.5, high nibble 7 → 6.0
    scale = torch.tensor([[128], [125]], dtype=torch.uint8)  # E8M0: 2**(128-127) = 2, 2**(125-127) = 0.25
    weights = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
               "dynamic": False, "scale_dtype": "torch.uint8"}
    root = make_ckpt(tmp_path, {"m.proj.weight_packed": packed, "m.proj.weight_scale": scale},
                     {"g": group("mxfp4-pack-quantized", weights)})
    _, spec, layer = only_layer(root)
    assert (spec.weight_format, spec.scale_format, spec.group_size, spec.in_features) == (FP4_E2M1, SCALE_E8M0, 32, 32)
    assert spec.scheme == "w4a16_mxfp4"
    assert layer.qweight[:, :2].tolist() == [[15, 2], [1, 7]]
    weight = dequantize(layer)
    assert weight[0, :2].tolist() == [-12.0, 2.0] and weight[1, :2].tolist() == [0.125, 1.5]
    assert weight[:, 2:].abs().sum() == 0


def test_fp8_block_scales_expand_rows(tmp_path):
    n, k, (bh, bw) = 3, 5, (2, 4)
    values = torch.tensor([[1.0, -2.0, 0.5, 3.0, 4.0], [0.25, 1.0, 1.0, -1.0, 2.0], [6.0, -0.5, 1.5, 2.0, -3.0]])
    grid = torch.tensor([[1.0, 2.0], [0.5, 4.0]], dtype=torch.bfloat16)  # [ceil(3/2), ceil(5/4)]
    weights = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [bh, bw],
               "symmetric": True, "dynamic": False, "group_size": None}
    inputs = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True,
              "symmetric": True}
    tensors = {"m.proj.weight": values.to(torch.float8_e4m3fn), "m.proj.weight_scale": grid}
    root = make_ckpt(tmp_path, tensors, {"g": group("float-quantized", weights, inputs)})
    _, spec, layer = only_layer(root)
    assert spec.group_size == bw and spec.num_groups == 2 and spec.scheme == "w8a8_fp8"
    assert spec.activation == ActivationQuant(FP8_E4M3, 8, dynamic=True, strategy="group")
    assert layer.scale.shape == (n, 2) and layer.scale.dtype == torch.bfloat16
    expected = torch.tensor([[values[r, c] * grid[r // bh, c // bw].float() for c in range(k)] for r in range(n)])
    assert torch.equal(dequantize(layer), expected)


def test_g_idx_act_order_legacy(tmp_path):
    # 4-bit codes 9, 10, 11, 12 → one word 0xCBA9; g_idx puts columns 0 and 3 in group 1.
    tensors = packed_module("m.proj", [[0xCBA9]], 1, 4, torch.tensor([[1.0, 2.0]]), g_idx=[1, 0, 0, 1])
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(4, "group", 2, actorder="group"))},
                     version="0.17.1")
    _, spec, layer = only_layer(root)
    assert spec.act_order and layer.g_idx.tolist() == [1, 0, 0, 1]
    assert dequantize(layer).tolist() == [[2.0, 2.0, 3.0, 8.0]]


def test_g_idx_all_minus_one_is_column_order(tmp_path):
    tensors = packed_module("m.proj", [[0xCBA9]], 1, 4, torch.tensor([[1.0, 2.0]]), g_idx=[-1] * 4)
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(4, "group", 2))}, version="0.17.1")
    reader, spec, layer = only_layer(root)
    assert not spec.act_order and layer.g_idx is None
    assert "m.proj.weight_g_idx" in spec.source_tensors
    assert dequantize(layer).tolist() == [[1.0, 2.0, 6.0, 8.0]]
    assert any("m.proj.weight_g_idx" in w for w in reader.warnings)


def test_target_precedence_and_ignore(tmp_path):
    def module(prefix, bits):  # all fields = the signed zero, K = 8
        fields = [1 << (bits - 1)] * 8
        word = sum(f << (i * bits) for i, f in enumerate(fields))
        words = [i32((word >> (32 * j)) & 0xFFFFFFFF) for j in range(math.ceil(8 * bits / 32))]
        return packed_module(prefix, [words, words], 2, 8, torch.ones(2, 1))

    tensors = {**module("m.a_proj", 4), **module("m.c_proj", 2), **module("m.other", 8),
               "m.skip.weight": torch.zeros(2, 2), "m.norm.weight": torch.ones(2)}
    groups = {
        "by_class": group("pack-quantized", int_args(8, "channel"), targets=["Linear"]),
        "by_regex": group("pack-quantized", int_args(4, "channel"), targets=["re:.*proj$"]),
        "by_name": group("pack-quantized", int_args(2, "channel"), targets=["m.c_proj"]),
    }
    root = make_ckpt(tmp_path, tensors, groups, ignore=["lm_head", "re:.*skip$"])
    reader = read(root)
    assert {s.name: s.bits for s in reader.linear_specs()} == {"m.a_proj": 4, "m.c_proj": 2, "m.other": 8}
    for spec in reader.linear_specs():
        assert dequantize(reader.load(spec)).abs().sum() == 0
    assert reader.passthrough_names() == ["lm_head.weight", "m.skip.weight", "m.norm.weight"]
    assert reader.warnings == []


def test_frozen_is_float(tmp_path):
    tensors = {"m.proj.weight": torch.zeros(2, 4, dtype=torch.bfloat16), "m.proj.weight_scale": torch.ones(1)}
    root = make_ckpt(tmp_path, tensors, {"g": group("float-quantized", int_args(8, "tensor"))},
                     quantization_status="frozen")
    reader = read(root)
    assert reader.linear_specs() == []
    assert set(reader.passthrough_names()) == {"lm_head.weight", "m.proj.weight", "m.proj.weight_scale"}
    assert any("frozen" in w for w in reader.warnings)


def test_static_int_activation_with_zero_point(tmp_path):
    tensors = {
        "m.proj.weight": torch.tensor([[1, -1]], dtype=torch.int8),
        "m.proj.weight_scale": torch.tensor([[0.25]], dtype=torch.float16),
        "m.proj.input_scale": torch.tensor([0.125], dtype=torch.bfloat16),
        "m.proj.input_zero_point": torch.tensor([-5], dtype=torch.int8),
    }
    inputs = {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False, "symmetric": False}
    root = make_ckpt(tmp_path, tensors, {"g": group("int-quantized", int_args(8, "channel"), inputs)})
    _, spec, layer = only_layer(root)
    assert spec.scheme == "w8a8_static"
    assert spec.activation == ActivationQuant(INT, 8, dynamic=False, strategy="tensor", symmetric=False)
    assert layer.input_scale.tolist() == [0.125] and layer.input_zero.tolist() == [-5.0]
    assert layer.input_scale.dtype == torch.float32 and layer.input_zero.dtype == torch.float32
    assert spec.scale_dtype == "float16" and layer.scale.dtype == torch.float16


def test_zero_or_negative_scales_warn(tmp_path):
    scale = torch.tensor([[1.0], [0.0], [-2.0]], dtype=torch.bfloat16)
    tensors = {"m.proj.weight": torch.zeros(3, 2, dtype=torch.int8), "m.proj.weight_scale": scale}
    root = make_ckpt(tmp_path, tensors, {"g": group("int-quantized", int_args(8, "channel"))})
    reader, _, _ = only_layer(root)
    assert len(reader.warnings) == 1 and "m.proj.weight_scale" in reader.warnings[0]


def test_non_finite_scales_are_an_error(tmp_path):
    scale = torch.tensor([[1.0], [0.0], [float("nan")]], dtype=torch.bfloat16)
    tensors = {"m.proj.weight": torch.zeros(3, 2, dtype=torch.int8), "m.proj.weight_scale": scale}
    root = make_ckpt(tmp_path, tensors, {"g": group("int-quantized", int_args(8, "channel"))})
    with pytest.raises(InputError, match=r"tensor 'm.proj.weight_scale': 1 scale value\(s\) are NaN or infinite"):
        only_layer(root)


# ------------------------------------------------------------------------------------ spec packer round trip
def spec_pack(codes: list[list[int]], bits: int, legacy: bool) -> torch.Tensor:
    """Pack rows as checkpoint_formats.md §3.2 describes, with Python integers (no shared code)."""
    rows = []
    for row in codes:
        if legacy:  # 32 // bits codes per word, code j at bits [j*b, j*b+b)
            per = 32 // bits
            words = [sum(c << (j * bits) for j, c in enumerate(row[w * per:(w + 1) * per]))
                     for w in range(math.ceil(len(row) / per))]
        else:  # one bitstream per row: code i at bits [i*b, i*b+b), cut into 32-bit words
            stream = sum(c << (i * bits) for i, c in enumerate(row))
            words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(math.ceil(len(row) * bits / 32))]
        rows.append([i32(w) for w in words])
    return torch.tensor(rows, dtype=torch.int32).reshape(len(codes), -1)


@settings(max_examples=120, deadline=None)
@given(
    bits=st.integers(2, 8), legacy=st.booleans(), n=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 2**31)
)
def test_spec_packer_round_trip(bits, legacy, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    along_k = spec_pack(codes.tolist(), bits, legacy)
    assert along_k.shape == (n, math.ceil(k / (32 // bits)) if legacy else math.ceil(k * bits / 32))
    assert torch.equal(unpack_rows(along_k, bits, k, padded=legacy), codes.to(torch.uint8))
    # zero points: the same packing along N (dim 0)
    along_n = spec_pack(codes.t().tolist(), bits, legacy).t()
    assert torch.equal(unpack_columns(along_n, bits, n, padded=legacy), codes.to(torch.uint8))


# ------------------------------------------------------------------------------------ broken checkpoints
def w3_channel(tmp_path, tensors, symmetric=True, **kw):
    groups = {"g": group("pack-quantized", int_args(3, "channel", symmetric=symmetric))}
    return make_ckpt(tmp_path, tensors, groups, **kw)


def failure(root: Path, error: type[Exception]) -> str:
    with pytest.raises(error) as info:
        reader = read(root)
        for spec in reader.linear_specs():
            reader.load(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_scale(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    del tensors["m.proj.weight_scale"]
    assert "'m.proj.weight_scale'" in failure(w3_channel(tmp_path, tensors), InputError)


def test_missing_zero_point_for_asym(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    assert "'m.proj.weight_zero_point'" in failure(w3_channel(tmp_path, tensors, symmetric=False), InputError)


def test_unsupported_bits(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(9, "channel"))})
    assert "num_bits 9" in failure(root, UnsupportedError)


def test_group_size_not_dividing_k(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 2))
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(3, "group", 8))})
    message = failure(root, InputError)
    assert "'m.proj.weight_packed'" in message and "group_size 8" in message


def test_packed_width_inconsistent(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT + [0]], 1, 12, torch.ones(1, 1))
    assert "'m.proj.weight_packed'" in failure(w3_channel(tmp_path, tensors), InputError)


def test_weight_shape_inconsistent(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    tensors["m.proj.weight_shape"] = torch.tensor([2, 12])
    assert "'m.proj.weight_shape'" in failure(w3_channel(tmp_path, tensors), InputError)


def test_zero_point_shape_inconsistent(tmp_path):
    zero = torch.zeros(2, 1, dtype=torch.int32)  # 1 row of 3-bit zero points needs 1 word, not 2
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1), zero=zero)
    assert "'m.proj.weight_zero_point'" in failure(w3_channel(tmp_path, tensors, symmetric=False), InputError)


def test_scale_shape_inconsistent(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 3))
    assert "'m.proj.weight_scale'" in failure(w3_channel(tmp_path, tensors), InputError)


@pytest.mark.parametrize("g_idx", [[0, 1, 1], [0, 2, 1, 0], [0, -1, 1, 1]])
def test_bad_g_idx(tmp_path, g_idx):
    tensors = packed_module("m.proj", [[0xCBA9]], 1, 4, torch.tensor([[1.0, 2.0]]), g_idx=g_idx)
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(4, "group", 2))}, version="0.17.1")
    assert "'m.proj.weight_g_idx'" in failure(root, InputError)


def test_int_codes_out_of_range(tmp_path):
    tensors = {"m.proj.weight": torch.tensor([[8, 0]], dtype=torch.int8), "m.proj.weight_scale": torch.ones(1)}
    root = make_ckpt(tmp_path, tensors, {"g": group("naive-quantized", int_args(4, "tensor"))})
    assert "'m.proj.weight'" in failure(root, InputError)


def test_quantized_module_without_group(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    root = make_ckpt(tmp_path, tensors, {"g": group("pack-quantized", int_args(3, "channel"), targets=["re:.*other$"])})
    assert "'m.proj.weight_packed'" in failure(root, InputError)


def test_ignored_module_with_quantized_tensors(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    assert "ignore" in failure(w3_channel(tmp_path, tensors, ignore=["m.proj"]), InputError)


def test_stacked_experts_refused(tmp_path):
    tensors = {"m.experts.weight": torch.zeros(2, 2, 4, dtype=torch.int8),
               "m.experts.weight_scale": torch.ones(2, 2, 1)}
    root = make_ckpt(tmp_path, tensors, {"g": group("int-quantized", int_args(8, "channel"))})
    assert "'m.experts.weight'" in failure(root, UnsupportedError)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"sparsity_config": {"format": "sparse-24-bitmask", "targets": ["Linear"]}}, "sparsity_config"),
        ({"transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "transform_config"),
        ({"quantization_status": "initialized"}, "quantization_status"),
    ],
)
def test_refused_configs(tmp_path, extra, needle):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    assert needle in failure(w3_channel(tmp_path, tensors, **extra), UnsupportedError)


def test_unknown_format(tmp_path):
    tensors = packed_module("m.proj", [DENSE_3BIT], 1, 12, torch.ones(1, 1))
    root = make_ckpt(tmp_path, tensors, {"g": group("marlin-24", int_args(3, "channel"))})
    assert "'marlin-24'" in failure(root, UnsupportedError)
