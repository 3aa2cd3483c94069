"""AWQ reader: the AutoAWQ GEMM fixture bit-exact, hand-worked GEMM/GEMV vectors, round trips, errors.

Rules under test: checkpoint_formats.md §2 (AutoAWQ 0.2.9 ``WQLinear_GEMM`` interleaved nibbles
``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; ``WQLinear_GEMV`` sequential nibbles, padded zeros/scales).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import load_reference, open_fixture
from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import dequantize
from npuconv.readers import open_reader
from npuconv.readers.awq import AWQReader, unpack_gemm, unpack_gemv
from npuconv.io.safetensors_io import save_file

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a GEMM word holds logical column 8c + ORDER[i] (§2.2)
P = "model.layers.0.mlp.up_proj"


def words(*values: int) -> torch.Tensor:
    return torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32)


# ------------------------------------------------------------------------------------------ fixture
def test_gemm_fixture_matches_autoawq_dequant_bit_exactly():
    reader = open_fixture("awq_gemm_g128")
    assert isinstance(reader, AWQReader)
    assert reader.summary() == {"version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}
    reference = load_reference("awq_gemm_g128")
    specs = reader.linear_specs()
    assert sorted(f"{spec.name}.weight" for spec in specs) == sorted(reference)
    for spec in specs:
        assert (spec.bits, spec.group_size, spec.symmetric, spec.act_order) == (4, 128, False, False)
        assert spec.scheme == "w4a16" and spec.source_scheme == "awq_gemm"
        layer = reader.load(spec)
        assert layer.qweight.shape == (spec.out_features, spec.in_features) and layer.qweight.dtype == torch.uint8
        assert layer.zero.dtype == torch.int16 and layer.zero.shape == layer.scale.shape == (spec.out_features, spec.num_groups)
        assert layer.g_idx is None
        assert torch.equal(dequantize(layer), reference[f"{spec.name}.weight"]), spec.name
    passthrough = reader.passthrough_names()
    assert "lm_head.weight" in passthrough and not [n for n in passthrough if n.endswith((".qweight", ".qzeros", ".scales"))]
    assert reader.warnings == []
    assert reader.consumed_files() == []


# ---------------------------------------------------------------------------- hand-worked vectors
def test_gemm_word_nibbles_to_logical_order():
    # nibble i holds value i → logical column ORDER[i] gets i: columns 0..7 read 0, 4, 1, 5, 2, 6, 3, 7
    qweight = words(0x76543210).reshape(1, 1)  # K = 1, N = 8
    assert unpack_gemm(qweight, 8).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpack_gemm(qweight, 8).shape == (8, 1)  # canonical [N, K]


def test_gemm_word_with_known_logical_values():
    # logical columns 0..7 = 1, 2, 3, 4, 5, 6, 7, 8 → nibbles (ORDER) 1, 3, 5, 7, 2, 4, 6, 8 → 0x86427531
    assert unpack_gemm(words(0x86427531).reshape(1, 1), 8).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_gemv_layout_is_sequential_along_k():
    # GEMV qweight [N, K/8]: nibble i of word c holds k = 8c + i; qzeros along groups, same order
    qweight = words(0x76543210, 0xFEDCBA98).reshape(1, 2)
    assert unpack_gemv(qweight, 16).tolist() == [list(range(16))]
    assert unpack_gemv(words(0x00000021).reshape(1, 1), 2).tolist() == [[1, 2]]


# ------------------------------------------------------------------- test-local packers (from the spec)
def to_int32(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[v - 2**32 if v >= 2**31 else v for v in row] for row in rows], dtype=torch.int64).to(torch.int32)


def pack_gemm(values: torch.Tensor) -> torch.Tensor:
    """[R, 8m] logical nibbles → int32 [R, m], word c = sum_i values[8c + ORDER[i]] << 4i."""
    rows = []
    for row in values.tolist():
        rows.append([sum(row[8 * c + ORDER[i]] << (4 * i) for i in range(8)) for c in range(len(row) // 8)])
    return to_int32(rows)


def pack_sequential(values: torch.Tensor, nwords: int) -> torch.Tensor:
    """[R, n] nibbles → int32 [R, nwords], value j at bits [4j, 4j+4) of the row's stream, zero padded."""
    rows = []
    for row in values.tolist():
        stream = sum(v << (4 * j) for j, v in enumerate(row))
        rows.append([(stream >> (32 * w)) & 0xFFFFFFFF for w in range(nwords)])
    return to_int32(rows)


def zeros_width(k: int, group_size: int) -> int:
    """AutoAWQ calculate_zeros_width: ceil(ceil(G/8) / m) * m, m = 1 (g >= 128), 2 (64), 4 (32)."""
    multiple = 1 if group_size >= 128 else {64: 2, 32: 4}[group_size]
    base = -(-(k // group_size) // 8)
    return -(-base // multiple) * multiple


def awq_checkpoint(root: Path, tensors: dict, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, root / "model.safetensors")
    quant = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": None, **config}
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    return root


def random_layer(gen, n, k, group_size):
    groups = k // group_size
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zero = torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.int16)
    scale = (torch.rand(n, groups, generator=gen) * 0.1 + 1e-3).half()
    return codes, zero, scale


def expected_weight(codes, zero, scale, group_size):
    index = torch.arange(codes.shape[1]) // group_size
    return (codes.float() - zero.float()[:, index]) * scale.float()[:, index]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n_blocks=st.integers(1, 6), k_groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       version=st.sampled_from(["gemm", "gemv"]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_through_a_checkpoint(tmp_path_factory, n_blocks, k_groups, group_size, version, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = 8 * n_blocks, group_size * k_groups
    codes, zero, scale = random_layer(gen, n, k, group_size)
    if version == "gemm":
        tensors = {f"{P}.qweight": pack_gemm(codes.t()), f"{P}.qzeros": pack_gemm(zero.t()), f"{P}.scales": scale.t().contiguous()}
    else:
        width = zeros_width(k, group_size)
        padded = torch.zeros(n, width * 8, dtype=torch.float16)
        padded[:, :k_groups] = scale
        tensors = {f"{P}.qweight": pack_sequential(codes, k // 8), f"{P}.qzeros": pack_sequential(zero, width), f"{P}.scales": padded}
    if bias:
        tensors[f"{P}.bias"] = torch.randn(n, generator=gen).half()
    root = awq_checkpoint(tmp_path_factory.mktemp("awq"), tensors, group_size=group_size, version=version)
    reader = open_reader(Checkpoint(root))
    (spec,) = reader.linear_specs()
    assert (spec.out_features, spec.in_features, spec.group_size, spec.has_bias) == (n, k, group_size, bias)
    assert spec.bias_dtype == ("float16" if bias else None)
    assert spec.source_scheme == f"awq_{version}"
    layer = reader.load(spec)
    assert torch.equal(layer.qweight, codes)
    assert torch.equal(layer.zero, zero)
    assert torch.equal(layer.scale, scale)
    assert (layer.bias is not None) == bias
    assert torch.equal(dequantize(layer), expected_weight(codes, zero, scale, group_size))


def test_gemv_padded_zero_points_and_scales(tmp_path):
    # K = 64, g = 32: G = 2, zeros width ceil(ceil(2/8)/4)*4 = 4 words, scales [N, 32]
    gen = torch.Generator().manual_seed(5)
    codes, zero, scale = random_layer(gen, 8, 64, 32)
    assert zeros_width(64, 32) == 4
    padded = torch.zeros(8, 32, dtype=torch.float16)
    padded[:, :2] = scale
    tensors = {f"{P}.qweight": pack_sequential(codes, 8), f"{P}.qzeros": pack_sequential(zero, 4), f"{P}.scales": padded}
    reader = open_reader(Checkpoint(awq_checkpoint(tmp_path / "m", tensors, version="gemv")))
    (spec,) = reader.linear_specs()
    layer = reader.load(spec)
    assert layer.scale.shape == (8, 2) and layer.zero.shape == (8, 2)
    assert torch.equal(dequantize(layer), expected_weight(codes, zero, scale, 32))


def test_per_channel_group_size_minus_one(tmp_path):
    gen = torch.Generator().manual_seed(6)
    codes, zero, scale = random_layer(gen, 16, 64, 64)
    tensors = {f"{P}.qweight": pack_gemm(codes.t()), f"{P}.qzeros": pack_gemm(zero.t()), f"{P}.scales": scale.t().contiguous()}
    reader = open_reader(Checkpoint(awq_checkpoint(tmp_path / "m", tensors, group_size=-1)))
    (spec,) = reader.linear_specs()
    assert spec.group_size == -1 and spec.num_groups == 1
    assert torch.equal(dequantize(reader.load(spec)), expected_weight(codes, zero, scale, 64))


# ------------------------------------------------------------------------------------ failure cases
def tiny_awq(tmp_path: Path, *, drop=(), edit=None, extra_tensors=None, **config) -> Path:
    gen = torch.Generator().manual_seed(7)
    codes, zero, scale = random_layer(gen, 16, 64, 32)
    tensors = {f"{P}.qweight": pack_gemm(codes.t()), f"{P}.qzeros": pack_gemm(zero.t()), f"{P}.scales": scale.t().contiguous()}
    tensors.update(extra_tensors or {})
    if edit:
        edit(tensors)
    for suffix in drop:
        del tensors[f"{P}.{suffix}"]
    return awq_checkpoint(tmp_path / "m", tensors, **config)


def test_tiny_checkpoint_is_valid(tmp_path):
    reader = open_reader(Checkpoint(tiny_awq(tmp_path)))
    (spec,) = reader.linear_specs()
    assert (spec.out_features, spec.in_features) == (16, 64)


@pytest.mark.parametrize(
    "config, error, pattern",
    [
        ({"version": "gemv_fast"}, UnsupportedError, "gemv_fast"),
        ({"version": "marlin"}, UnsupportedError, "marlin"),
        ({"version": "exllama"}, UnsupportedError, "exllama"),
        ({"bits": 8}, UnsupportedError, "bits 8"),
        ({"zero_point": False}, UnsupportedError, "zero_point"),
        ({"group_size": 0}, InputError, "group_size"),
        ({"modules_to_not_convert": "lm_head"}, InputError, "modules_to_not_convert"),
    ],
)
def test_config_errors(tmp_path, config, error, pattern):
    with pytest.raises(error, match=pattern):
        open_reader(Checkpoint(tiny_awq(tmp_path, **config))).linear_specs()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"drop": ("qzeros",)}, rf"tensor '{P}\.qzeros' is missing"),
        ({"drop": ("scales",)}, rf"tensor '{P}\.scales' is missing"),
        ({"edit": lambda t: t.update({f"{P}.scales": torch.zeros(2, 8, dtype=torch.float16)})}, rf"'{P}\.scales'.*\[2, 8\]"),
        ({"edit": lambda t: t.update({f"{P}.qzeros": torch.zeros(1, 2, dtype=torch.int32)})}, rf"'{P}\.qzeros'.*\[1, 2\]"),
        ({"group_size": 48}, rf"'{P}\.qweight'.*group_size 48 does not divide in_features K = 64"),
        ({"edit": lambda t: t.update({f"{P}.qweight": t[f"{P}.qweight"].to(torch.int64)})}, rf"'{P}\.qweight'.*int32"),
        ({"modules_to_not_convert": ["up_proj"]}, rf"'{P}\.qweight'.*modules_to_not_convert entry 'up_proj'"),
        # GEMM tensors read as GEMV: qweight [64, 2] → N = 64, K = 16, but qzeros is [2, 2]
        ({"version": "gemv", "group_size": 8}, rf"'{P}\.qzeros': shape \[2, 2\] cannot hold \[N, G\] = \[64, 2\]"),
    ],
)
def test_tensor_errors_name_the_tensor(tmp_path, kwargs, pattern):
    with pytest.raises((InputError, UnsupportedError), match=pattern):
        open_reader(Checkpoint(tiny_awq(tmp_path, **kwargs))).linear_specs()


def test_modules_to_not_convert_pass_through(tmp_path):
    head = torch.randn(8, 16).half()
    root = tiny_awq(tmp_path, extra_tensors={"lm_head.weight": head}, modules_to_not_convert=["lm_head"])
    reader = open_reader(Checkpoint(root))
    assert [spec.name for spec in reader.linear_specs()] == [P]
    assert reader.passthrough_names() == ["lm_head.weight"]


def test_detected_from_quantize_config_json(tmp_path):
    root = tiny_awq(tmp_path)
    config = json.loads((root / "config.json").read_text())
    (root / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (root / "config.json").write_text(json.dumps(config))
    reader = open_reader(Checkpoint(root))
    assert isinstance(reader, AWQReader) and len(reader.linear_specs()) == 1
    assert reader.consumed_files() == ["quantize_config.json"]
