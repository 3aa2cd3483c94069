"""msModelSlim reader: real msModelSlim 26.1.0 fixtures (bit-exact against msModelSlim's own
readers), hand-worked vectors for every supported type string, packing round trips, failures.

Rules under test (checkpoint_formats.md §4, npu_loaders.md §2–3): signed codes ``q`` with
``w = (q - offset) * scale`` (msModelSlim ``FakeLinearQuantizerOfW8A16OrW4A16``); int4 pairs along
N ``[N/2, K]`` (``w4a8_pack_int4``: row 2i low nibble, 2i+1 high) or along K ``[N, K/2]``
(``_w4a16_pack_int4`` per-channel: even k low); static W8A8 scale = ``deq_scale / input_scale``
with int64 deq_scale = float32 bits in the low 32 bits (``deqscale2int64``); MX E8M0 = 2**(b-127).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES as FIXTURES_DIR, load_reference, open_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import FP4_E2M1, FP8_E4M3, INT, SCALE_E8M0, SCALE_FLOAT, dequantize
from npuconv.readers import open_reader
from npuconv.readers.modelslim import ModelSlimReader, decode_deq_scale
from npuconv.io.safetensors_io import save_file

P = "model.layers.0.mlp.down_proj"

# ------------------------------------------------------------------------------------------ fixtures
# fixture → (bits, group_size, weight symmetric, scheme, source type, weight format, activation
#            (kind, bits, dynamic, strategy) or None)
FIXTURES = {
    "ms_w4a8_dynamic": (4, -1, True, "w4a8_dynamic", "W4A8_DYNAMIC", INT, (INT, 8, True, "token")),
    "ms_w8a16_per_group32_asym": (8, 32, False, "w8a16", "W8A16", INT, None),
    "ms_w8a8_mxfp8": (8, 32, True, "w8a8_mxfp8", "W8A8_MXFP8", FP8_E4M3, (FP8_E4M3, 8, True, "group")),
    "ms_w8a8_static_fp16": (8, -1, True, "w8a8_static", "W8A8", INT, (INT, 8, False, "tensor")),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_bit_exact(name):
    reader = open_fixture(name)
    assert isinstance(reader, ModelSlimReader)
    reference = load_reference(name)
    specs = reader.linear_specs()
    assert sorted(f"{s.name}.weight" for s in specs) == sorted(reference)
    for spec in specs:
        got = dequantize(reader.load(spec))
        assert got.dtype == torch.float32
        assert torch.equal(got, reference[f"{spec.name}.weight"]), spec.name


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES_DIR.glob("ms_*")))
def test_offsets_read_with_or_without_torch_give_the_same_layers(name, monkeypatch):
    # per-channel offsets are read without torch (inspect), large per-group ones with it: same specs
    without_torch = open_fixture(name).linear_specs()
    monkeypatch.setattr("npuconv.io.safetensors_io.TORCH_FREE_VALUES", 0)
    assert open_fixture(name).linear_specs() == without_torch


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_passthrough(name):
    reader = open_fixture(name)
    description = json.loads((Path(reader.ckpt.root) / "quant_model_description.json").read_text())
    floats = {k for k, v in description.items() if v == "FLOAT" and k != "model_quant_type"}
    consumed = {t for s in reader.linear_specs() for t in s.source_tensors}
    passthrough = set(reader.passthrough_names())
    assert floats <= passthrough
    assert not passthrough & consumed
    assert passthrough | consumed == set(reader.ckpt.names())
    for spec in reader.linear_specs():  # every quantized tensor of the layer is consumed
        assert {k for k in description if k.startswith(spec.name + ".")} == set(spec.source_tensors)
    assert floats == passthrough


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_spec_fields(name):
    bits, group, symmetric, scheme, source, weight_format, act = FIXTURES[name]
    reader = open_fixture(name)
    for spec in reader.linear_specs():
        assert (spec.bits, spec.group_size, spec.symmetric) == (bits, group, symmetric), spec.name
        assert (spec.scheme, spec.source_scheme, spec.weight_format) == (scheme, source, weight_format)
        assert spec.scale_format == (SCALE_E8M0 if "mx" in scheme else SCALE_FLOAT)
        assert spec.num_experts is None and not spec.act_order and not spec.has_bias
        if act is None:
            assert spec.activation is None
        else:
            a = spec.activation
            assert (a.kind, a.bits, a.dynamic, a.strategy) == act
    summary = reader.summary()
    assert summary["types"] == [source] and summary["version"] == "1.0.0"


def test_fixture_w4a8_model_quant_type_is_ignored():
    reader = open_fixture("ms_w4a8_dynamic")
    assert reader.summary()["model_quant_type"] == "FLOAT"  # msModelSlim hides W4A8_DYNAMIC there
    assert len(reader.linear_specs()) == 7
    assert all(f"{s.name}.scale_bias" in s.source_tensors for s in reader.linear_specs())


def test_fixture_static_activation():
    reader = open_fixture("ms_w8a8_static_fp16")
    for spec in reader.linear_specs():
        layer = reader.load(spec)
        offset = reader.tensor(f"{spec.name}.input_offset")
        assert torch.equal(layer.input_zero, offset.float().reshape(1))
        assert torch.equal(layer.input_scale, reader.tensor(f"{spec.name}.input_scale").float().reshape(1))
        assert spec.activation.symmetric == bool(offset.item() == 0)
        assert reader.ckpt.info(f"{spec.name}.deq_scale").dtype == torch.int64
        assert layer.scale.dtype == torch.float32 and layer.scale.shape == (spec.out_features, 1)


def test_fixture_consumed_files():
    reader = open_fixture("ms_w8a16_per_group32_asym")
    assert reader.consumed_files() == ["quant_model_description.json"]
    assert reader.format == "modelslim"


# ------------------------------------------------------------------------------ tiny checkpoints
def build(
    root: Path,
    layers: dict[str, tuple[str, dict[str, torch.Tensor]]],
    *,
    version: str | None = "1.0.0",
    extra: dict[str, tuple[str | None, torch.Tensor]] | None = None,
    desc_name: str = "quant_model_description.json",
    weights_name: str = "quant_model_weights.safetensors",
    meta: dict | None = None,
) -> Path:
    """A checkpoint dir: ``layers`` prefix → (type, {suffix: tensor}); ``extra`` name → (type or
    None for "no description entry", tensor). ``<p>.bias`` is described FLOAT (as the v1 saver)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    tensors: dict[str, torch.Tensor] = {"model.norm.weight": torch.ones(4, dtype=torch.float16)}
    desc: dict[str, object] = {"model.norm.weight": "FLOAT"}
    for prefix, (qtype, parts) in layers.items():
        for suffix, tensor in parts.items():
            tensors[f"{prefix}.{suffix}"] = tensor
            desc[f"{prefix}.{suffix}"] = "FLOAT" if suffix == "bias" else qtype
    for name, (qtype, tensor) in (extra or {}).items():
        tensors[name] = tensor
        if qtype is not None:
            desc[name] = qtype
    if version is not None:
        desc["version"] = version
    desc.update({"model_quant_type": "W8A8", "metadata": {}, "group_size": 0, "optional": {}, **(meta or {})})
    save_file(tensors, root / weights_name)
    (root / desc_name).write_text(json.dumps(desc))
    return root


def read_one(root: Path):
    reader = open_reader(Checkpoint(root))
    assert isinstance(reader, ModelSlimReader)
    (spec,) = reader.linear_specs()
    return reader, spec, reader.load(spec)


def i8(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int8)


def b8(rows) -> torch.Tensor:
    """int8 tensor from unsigned byte values (e.g. 0x8F)."""
    return torch.tensor(rows, dtype=torch.uint8).view(torch.int8)


def f32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def fp32_bits_int64(values) -> torch.Tensor:
    """msModelSlim ``deqscale2int64``: float32 bits read as int32, widened (sign-extended) to int64."""
    return torch.tensor(values, dtype=torch.float32).view(torch.int32).to(torch.int64)


def check(reader, spec, layer, expected, *, scheme, bits, group_size, symmetric, source):
    assert torch.equal(dequantize(layer), f32(expected))
    assert (spec.scheme, spec.bits, spec.group_size, spec.symmetric, spec.source_scheme) == (
        scheme, bits, group_size, symmetric, source,
    )
    assert layer.qweight.shape == (spec.out_features, spec.in_features)
    assert layer.scale.shape == (spec.out_features, spec.num_groups)
    assert set(spec.source_tensors).isdisjoint(reader.passthrough_names())
    assert "model.norm.weight" in reader.passthrough_names()


# W8A16 ----------------------------------------------------------------------------------------------
def test_w8a16_per_channel_asym(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {
        "weight": i8([[-128, 0, 127], [5, -5, 1]]),
        "weight_scale": f32([[0.5], [2.0]]),
        "weight_offset": f32([[0.0], [-3.0]]),
    })})
    reader, spec, layer = read_one(root)
    # row 0: q*0.5; row 1: (q - (-3)) * 2
    check(reader, spec, layer, [[-64.0, 0.0, 63.5], [16.0, -4.0, 8.0]],
          scheme="w8a16", bits=8, group_size=-1, symmetric=False, source="W8A16")
    assert layer.qweight.dtype == torch.uint8
    assert layer.qweight.tolist() == [[0, 128, 255], [133, 123, 129]]  # q + 128
    assert layer.zero.dtype == torch.int16 and layer.zero.tolist() == [[128], [125]]  # offset + 128
    assert spec.activation is None and spec.scale_dtype == "float32"


def test_w8a16_per_group(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {
        "weight": i8([[1, 2, 3, 4]]),
        "weight_scale": f32([[0.5, 0.25]]),
        "weight_offset": f32([[1.0, -2.0]]),
    })})
    reader, spec, layer = read_one(root)
    # group 0 (k=0,1): (q-1)*0.5; group 1 (k=2,3): (q+2)*0.25
    check(reader, spec, layer, [[0.0, 0.5, 1.25, 1.5]],
          scheme="w8a16", bits=8, group_size=2, symmetric=False, source="W8A16")
    assert layer.zero.tolist() == [[129, 126]]


def test_w8a8_dynamic(tmp_path):
    root = build(tmp_path, {P: ("W8A8_DYNAMIC", {
        "weight": i8([[-2, 3]]), "weight_scale": f32([[0.5]]), "weight_offset": f32([[0.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-1.0, 1.5]],
          scheme="w8a8_dynamic", bits=8, group_size=-1, symmetric=True, source="W8A8_DYNAMIC")
    assert layer.zero is None
    a = spec.activation
    assert (a.kind, a.bits, a.dynamic, a.strategy, a.symmetric) == (INT, 8, True, "token", True)


def test_bias_belongs_to_the_layer(tmp_path):
    root = build(tmp_path, {P: ("W8A8_DYNAMIC", {
        "weight": i8([[-2, 3]]), "weight_scale": f32([[0.5]]), "weight_offset": f32([[0.0]]),
        "bias": f32([0.25]),
    })})
    reader, spec, layer = read_one(root)
    assert spec.has_bias and f"{P}.bias" in spec.source_tensors
    assert torch.equal(layer.bias, f32([0.25]))
    assert f"{P}.bias" not in reader.passthrough_names()


# W4A4_DYNAMIC -----------------------------------------------------------------------------------------
def test_w4a4_dynamic_unpacked(tmp_path):
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {
        "weight": i8([[-8, 7, 0, -1]]), "weight_scale": f32([[0.5]]), "weight_offset": f32([[1.0]]),
    })})
    reader, spec, layer = read_one(root)
    # (q - 1) * 0.5
    check(reader, spec, layer, [[-4.5, 3.0, -0.5, -1.0]],
          scheme="w4a4_dynamic", bits=4, group_size=-1, symmetric=False, source="W4A4_DYNAMIC")
    assert layer.qweight.tolist() == [[0, 15, 8, 7]]  # q + 8
    assert layer.zero.tolist() == [[9]]
    a = spec.activation
    assert (a.kind, a.bits, a.dynamic) == (INT, 4, True)


def test_w4a4_dynamic_per_group(tmp_path):
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {
        "weight": i8([[1, 2, 3, 4], [-1, -2, -3, -4]]),
        "weight_scale": f32([[1.0, 0.5], [2.0, 0.25]]),
        "weight_offset": f32([[0.0, 1.0], [0.0, 0.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[1.0, 2.0, 1.0, 1.5], [-2.0, -4.0, -0.75, -1.0]],
          scheme="w4a4_dynamic", bits=4, group_size=2, symmetric=False, source="W4A4_DYNAMIC")


def test_w4a4_autoround_unsigned_codes(tmp_path):
    """AutoRound (msModelSlim quant_tensor_asym): q = clamp(round(w/s) + 8, 0, 15) stored in int8, float
    offset 8, scale sign flipped per group; msModelSlim's reader: (q - offset) * scale. Hand vector."""
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {
        "weight": i8([[0, 15, 8, 13], [1, 2, 3, 4]]),
        "weight_scale": f32([[0.5, -0.25], [-2.0, 1.0]]),
        "weight_offset": f32([[8.0, 8.0], [8.0, 8.0]]),
    })})
    reader, spec, layer = read_one(root)
    # row 0: (0-8)*.5, (15-8)*.5, (8-8)*-.25, (13-8)*-.25; row 1: (1-8)*-2, (2-8)*-2, (3-8)*1, (4-8)*1
    check(reader, spec, layer, [[-4.0, 3.5, 0.0, -1.25], [14.0, 12.0, -5.0, -4.0]],
          scheme="w4a4_dynamic", bits=4, group_size=2, symmetric=True, source="W4A4_DYNAMIC")
    assert layer.qweight.tolist() == [[0, 15, 8, 13], [1, 2, 3, 4]]  # the stored codes, unsigned
    assert layer.zero is None  # offset 8 everywhere = the int4 midpoint: symmetric
    assert reader.warnings == []  # negative scales are how AutoRound stores a range


def test_w4a4_autoround_unsigned_asymmetric_offsets(tmp_path):
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {
        "weight": i8([[0, 15]]), "weight_scale": f32([[0.5]]), "weight_offset": f32([[10.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-5.0, 2.5]],
          scheme="w4a4_dynamic", bits=4, group_size=-1, symmetric=False, source="W4A4_DYNAMIC")
    assert layer.zero.tolist() == [[10]]


def test_w4a4_unsigned_codes_out_of_range(tmp_path):
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {
        "weight": i8([[-1, 15]]), "weight_scale": f32([[0.5]]), "weight_offset": f32([[8.0]]),
    })})
    reader = open_reader(Checkpoint(root))
    (spec,) = reader.linear_specs()
    with pytest.raises(InputError, match=r"value -1 is outside the unsigned int4 range 0\.\.15"):
        reader.load(spec)


def test_w4a4_dynamic_pairs_along_n(tmp_path):
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {
        "weight": b8([[0x8F, 0x21]]), "weight_scale": f32([[1.0], [1.0]]), "weight_offset": f32([[0.0], [0.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-1.0, 1.0], [-8.0, 2.0]],
          scheme="w4a4_dynamic", bits=4, group_size=-1, symmetric=True, source="W4A4_DYNAMIC")


# W4A8_DYNAMIC -----------------------------------------------------------------------------------------
def test_w4a8_dynamic_pairs_along_n(tmp_path):
    # byte 0x8F at (0, 0): low nibble 0xF = -1 → row 0, high nibble 0x8 = -8 → row 1
    # byte 0x21 at (0, 1): low 1 → row 0, high 2 → row 1
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {
        "weight": b8([[0x8F, 0x21]]),
        "weight_scale": f32([[0.5], [0.25]]),
        "weight_offset": f32([[0.0], [0.0]]),
        "scale_bias": f32([[0.0], [0.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-0.5, 0.5], [-2.0, 0.5]],
          scheme="w4a8_dynamic", bits=4, group_size=-1, symmetric=True, source="W4A8_DYNAMIC")
    assert (spec.out_features, spec.in_features) == (2, 2)
    assert layer.qweight.tolist() == [[7, 9], [0, 10]]
    assert f"{P}.scale_bias" in spec.source_tensors
    a = spec.activation
    assert (a.kind, a.bits, a.dynamic, a.strategy) == (INT, 8, True, "token")


def test_w4a8_dynamic_unpacked_old(tmp_path):
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {
        "weight": i8([[-1, 1], [-8, 2]]),
        "weight_scale": f32([[0.5], [0.25]]),
        "weight_offset": f32([[0.0], [0.0]]),
    })}, version=None)
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-0.5, 0.5], [-2.0, 0.5]],
          scheme="w4a8_dynamic", bits=4, group_size=-1, symmetric=True, source="W4A8_DYNAMIC")


TWO_STAGE = {
    "weight_scale": f32([[0.5], [0.25]]),
    "weight_offset": f32([[0.0], [0.0]]),
    "weight_scale_second": f32([[2.0, 3.0], [4.0, 1.0]]),
    "weight_offset_second": torch.zeros(2, 2, dtype=torch.int64),
}
# rows: [-1, 1, 0, -1] and [-8, 2, 0, 7]; w = q * s2[n, k//2] * s[n]
TWO_STAGE_EXPECTED = [[-1.0, 1.0, 0.0, -1.5], [-8.0, 2.0, 0.0, 1.75]]


def test_w4a8_two_stage_packed(tmp_path):
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {
        "weight": b8([[0x8F, 0x21, 0x00, 0x7F]]), **TWO_STAGE, "scale_bias": f32([[0.0], [0.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, TWO_STAGE_EXPECTED,
          scheme="w4a8_dynamic", bits=4, group_size=2, symmetric=True, source="W4A8_DYNAMIC")
    assert layer.scale.dtype == torch.float32 and layer.scale.tolist() == [[1.0, 1.5], [1.0, 0.25]]
    assert layer.zero is None
    assert {f"{P}.weight_scale_second", f"{P}.weight_offset_second", f"{P}.weight_offset"} <= set(spec.source_tensors)


def test_w4a8_two_stage_unpacked_old(tmp_path):
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {"weight": i8([[-1, 1, 0, -1], [-8, 2, 0, 7]]), **TWO_STAGE})},
                 version="0")
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, TWO_STAGE_EXPECTED,
          scheme="w4a8_dynamic", bits=4, group_size=2, symmetric=True, source="W4A8_DYNAMIC")


def test_w4a8_two_stage_offset_second(tmp_path):
    parts = {**TWO_STAGE, "weight_offset_second": torch.tensor([[1, 0], [0, -2]], dtype=torch.int64)}
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {"weight": i8([[-1, 1, 0, -1], [-8, 2, 0, 7]]), **parts})})
    reader, spec, layer = read_one(root)
    # row 0 group 0: (q - 1) * 2 * 0.5; row 1 group 1: (q + 2) * 1 * 0.25
    check(reader, spec, layer, [[-2.0, 0.0, 0.0, -1.5], [-8.0, 2.0, 0.5, 2.25]],
          scheme="w4a8_dynamic", bits=4, group_size=2, symmetric=False, source="W4A8_DYNAMIC")
    assert layer.zero.tolist() == [[9, 8], [8, 6]]


def test_w4a8_two_stage_rounding_order(tmp_path):
    """msModelSlim's saver dequantizes two-stage W4A8 as (q * s2) * s in float32 (complex_quantifier.py:
    ``first_deq_weight = weight * second_scale``; ``second_deq_weight = first_deq_weight * weight_scale``):
    one rounding, since q * s2 is an exact small integer. dequantize() follows that order bit for bit;
    the canonical scale (what kernels get) stays vllm-ascend's antiquant scale fl32(s * s2), and
    q * fl32(s * s2) does differ from it for some inputs (so the order matters)."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 64, 8, 4
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, 1, generator=g) * 0.01 + 1e-4).float()
    s2 = torch.randint(1, 20, (n, k // group), generator=g).float()
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {
        "weight": q, "weight_scale": s, "weight_offset": torch.zeros(n, 1),
        "weight_scale_second": s2, "weight_offset_second": torch.zeros(n, k // group, dtype=torch.int64),
    })}, version="0")
    _, _, layer = read_one(root)
    s2k = s2.repeat_interleave(group, 1)
    assert torch.equal(dequantize(layer), (q.float() * s2k) * s)
    assert torch.equal(layer.scale, s * s2)
    assert not torch.equal(q.float() * (s * s2k), (q.float() * s2k) * s)
    # the order survives row chunking (large layers are dequantized in slices of output rows)
    from npuconv import model

    chunked = model._dequantize_rows(model._row_slice(layer, 8, 24), torch.float32)
    assert torch.equal(chunked, ((q.float() * s2k) * s)[8:24])


# W4A16 ------------------------------------------------------------------------------------------------
def test_w4a16_per_group_pairs_along_n(tmp_path):
    # bytes → row 0 (low nibbles) [-1, 0, 0, 7], row 1 (high) [-8, 1, 0, 7]
    root = build(tmp_path, {P: ("W4A16", {
        "weight": b8([[0x8F, 0x10, 0x00, 0x77]]),
        "weight_scale": f32([[1.0, 2.0], [0.5, 4.0]]),
        "weight_offset": f32([[0.0, 1.0], [-1.0, 0.0]]),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-1.0, 0.0, -2.0, 12.0], [-3.5, 1.0, 0.0, 28.0]],
          scheme="w4a16", bits=4, group_size=2, symmetric=False, source="W4A16")
    assert spec.activation is None


def test_w4a16_per_channel_pairs_along_k(tmp_path):
    # row 0 byte 0x8F → k0 = -1 (low), k1 = -8 (high); row 1 byte 0x7A → k0 = -6, k1 = 7
    root = build(tmp_path, {P: ("W4A16", {
        "weight": b8([[0x8F], [0x7A]]),
        "weight_scale": torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16),
        "weight_offset": torch.tensor([[0.0], [1.0]], dtype=torch.bfloat16),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-1.0, -8.0], [-14.0, 12.0]],
          scheme="w4a16", bits=4, group_size=-1, symmetric=False, source="W4A16")
    assert (spec.out_features, spec.in_features) == (2, 2)
    assert spec.scale_dtype == "bfloat16" and layer.scale.dtype == torch.bfloat16


def test_w4a16_unpacked_old(tmp_path):
    root = build(tmp_path, {P: ("W4A16", {
        "weight": i8([[-1, -8], [-6, 7]]),
        "weight_scale": f32([[1.0], [2.0]]),
        "weight_offset": f32([[0.0], [1.0]]),
    })}, version=None)
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[-1.0, -8.0], [-14.0, 12.0]],
          scheme="w4a16", bits=4, group_size=-1, symmetric=False, source="W4A16")


# W8A8 static ------------------------------------------------------------------------------------------
STATIC_WEIGHT = [[2, -1], [0, 127]]
STATIC_EXPECTED = [[3.0, -1.5], [0.0, 95.25]]  # scale = deq / input_scale = [0.75, 0.375] / 0.5


def static_parts(deq_scale, **more):
    return {
        "weight": i8(STATIC_WEIGHT), "quant_bias": torch.tensor([1, -2], dtype=torch.int32),
        "input_scale": f32([0.5]), "input_offset": f32([3.0]), "deq_scale": deq_scale, **more,
    }


def test_w8a8_static_int64_deq_scale(tmp_path):
    deq = fp32_bits_int64([0.75, 0.375])
    assert deq.tolist() == [0x3F400000, 0x3EC00000]
    deq[1] |= 1 << 46  # npu_trans_quant_param flag bit: only the low 32 bits carry the scale
    root = build(tmp_path, {P: ("W8A8", static_parts(deq, bias=f32([0.5, -1.0])))})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, STATIC_EXPECTED,
          scheme="w8a8_static", bits=8, group_size=-1, symmetric=True, source="W8A8")
    assert layer.scale.dtype == torch.float32 and layer.scale.tolist() == [[1.5], [0.75]]
    assert layer.input_scale.tolist() == [0.5] and layer.input_zero.tolist() == [3.0]
    assert layer.input_scale.dtype == layer.input_zero.dtype == torch.float32
    a = spec.activation
    assert (a.kind, a.bits, a.dynamic, a.strategy, a.symmetric) == (INT, 8, False, "tensor", False)
    assert spec.has_bias and torch.equal(layer.bias, f32([0.5, -1.0]))
    for suffix in ("quant_bias", "deq_scale", "input_scale", "input_offset", "bias"):
        assert f"{P}.{suffix}" in spec.source_tensors


def test_w8a8_static_float_deq_scale(tmp_path):
    root = build(tmp_path, {P: ("W8A8", static_parts(f32([0.75, 0.375]), input_offset=f32([0.0])))})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, STATIC_EXPECTED,
          scheme="w8a8_static", bits=8, group_size=-1, symmetric=True, source="W8A8")
    assert spec.activation.symmetric and not spec.has_bias


def test_decode_deq_scale():
    # 0xBF400000 = -0.75: sign-extended by deqscale2int64, zero-extended by vllm-ascend; both decode
    sign_extended = fp32_bits_int64([-0.75, 1.0])
    zero_extended = sign_extended & 0xFFFFFFFF
    assert sign_extended[0].item() < 0 < zero_extended[0].item()
    for deq in (sign_extended, zero_extended):
        assert decode_deq_scale(deq).tolist() == [-0.75, 1.0]
    assert decode_deq_scale(torch.tensor([1.5], dtype=torch.float16)).dtype == torch.float32


def test_w8a8_v0_uses_weight_scale(tmp_path):
    bf16 = torch.bfloat16
    parts = static_parts(
        f32([0.75, 0.375]),
        weight_scale=torch.tensor([[1.5], [0.75]], dtype=bf16),
        weight_offset=torch.zeros(2, 1, dtype=bf16),
        input_scale=torch.tensor([0.5], dtype=bf16),
        input_offset=torch.tensor([0.0], dtype=bf16),
    )
    root = build(tmp_path, {P: ("W8A8", parts)})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, STATIC_EXPECTED,
          scheme="w8a8_static", bits=8, group_size=-1, symmetric=True, source="W8A8")
    assert layer.scale.dtype == bf16
    assert layer.input_scale.dtype == torch.float32 and layer.input_zero.tolist() == [0.0]


def test_w8a8_mix(tmp_path):
    parts = static_parts(fp32_bits_int64([0.75, 0.375]), weight_scale=f32([[1.5], [0.75]]),
                         weight_offset=torch.zeros(2, 1))
    root = build(tmp_path, {P: ("W8A8_MIX", parts)})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, STATIC_EXPECTED,
          scheme="w8a8_static", bits=8, group_size=-1, symmetric=True, source="W8A8_MIX")


# float types ------------------------------------------------------------------------------------------
def test_wfp8afp8_dynamic(tmp_path):
    root = build(tmp_path, {P: ("WFP8AFP8_DYNAMIC", {
        "weight": torch.tensor([[1.5, -2.0], [0.25, 448.0]]).to(torch.float8_e4m3fn),
        "weight_scale": f32([[0.5], [2.0]]),
        "weight_offset": torch.zeros(2, 1),
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[0.75, -1.0], [0.5, 896.0]],
          scheme="w8a8_fp8", bits=8, group_size=-1, symmetric=True, source="WFP8AFP8_DYNAMIC")
    assert spec.weight_format == FP8_E4M3 and layer.qweight.dtype == torch.float8_e4m3fn
    a = spec.activation
    assert (a.kind, a.bits, a.dynamic, a.strategy) == (FP8_E4M3, 8, True, "token")


def test_w8a8_mxfp8(tmp_path):
    weight = torch.zeros(1, 64)
    weight[0, 0], weight[0, 1], weight[0, 32], weight[0, 63] = 1.5, -0.5, 3.0, -448.0
    root = build(tmp_path, {P: ("W8A8_MXFP8", {
        "weight": weight.to(torch.float8_e4m3fn),
        "weight_scale": torch.tensor([[129, 126]], dtype=torch.uint8),  # 2**2, 2**-1
    })})
    reader, spec, layer = read_one(root)
    expected = torch.zeros(1, 64)
    expected[0, 0], expected[0, 1], expected[0, 32], expected[0, 63] = 6.0, -2.0, 1.5, -224.0
    check(reader, spec, layer, expected.tolist(),
          scheme="w8a8_mxfp8", bits=8, group_size=32, symmetric=True, source="W8A8_MXFP8")
    assert spec.scale_format == SCALE_E8M0 and spec.scale_dtype == "uint8"
    a = spec.activation
    assert (a.kind, a.bits, a.dynamic, a.strategy) == (FP8_E4M3, 8, True, "group")


FP4_BYTES = [0x9A, 0x7F] + [0] * 14  # k0 = 0xA → -1.0, k1 = 0x9 → -0.5, k2 = 0xF → -6, k3 = 0x7 → 6
FP4_VALUES = [-1.0, -0.5, -6.0, 6.0] + [0.0] * 28


@pytest.mark.parametrize(
    "qtype, scheme, act",
    [
        ("W4A8_MXFP", "w4a8_mxfp", (FP8_E4M3, 8)),
        ("W4A4_MXFP4", "w4a4_mxfp4", (FP4_E2M1, 4)),
        ("W4A16_MXFP4", "w4a16_mxfp4", None),
    ],
)
def test_mxfp4_types(tmp_path, qtype, scheme, act):
    root = build(tmp_path, {P: (qtype, {
        "weight": torch.tensor([FP4_BYTES], dtype=torch.uint8),
        "weight_scale": torch.tensor([[128]], dtype=torch.uint8),  # ×2
    })})
    reader, spec, layer = read_one(root)
    check(reader, spec, layer, [[2 * v for v in FP4_VALUES]],
          scheme=scheme, bits=4, group_size=32, symmetric=True, source=qtype)
    assert spec.weight_format == FP4_E2M1 and spec.in_features == 32
    assert layer.qweight.dtype == torch.uint8 and layer.qweight[0, :4].tolist() == [0xA, 0x9, 0xF, 0x7]
    if act is None:
        assert spec.activation is None
    else:
        assert (spec.activation.kind, spec.activation.bits, spec.activation.strategy) == (*act, "group")


# round trips of the two int4 packings ------------------------------------------------------------------
def pack_pairs_along_n(q: list[list[int]]) -> torch.Tensor:
    """Spec rule (w4a8_pack_int4): byte (i, k) = (q[2i][k] & 0xF) | (q[2i+1][k] & 0xF) << 4."""
    rows = [[(q[2 * i][k] & 0xF) | ((q[2 * i + 1][k] & 0xF) << 4) for k in range(len(q[0]))] for i in range(len(q) // 2)]
    return b8(rows)


def pack_pairs_along_k(q: list[list[int]]) -> torch.Tensor:
    """Spec rule (_w4a16_pack_int4, per-channel): byte (n, j) = (q[n][2j] & 0xF) | (q[n][2j+1] & 0xF) << 4."""
    return b8([[(row[2 * j] & 0xF) | ((row[2 * j + 1] & 0xF) << 4) for j in range(len(row) // 2)] for row in q])


int4_matrix = st.integers(1, 4).flatmap(
    lambda half: st.integers(1, 4).flatmap(
        lambda cols: st.lists(st.lists(st.integers(-8, 7), min_size=2 * cols, max_size=2 * cols),
                              min_size=2 * half, max_size=2 * half)
    )
)


@settings(max_examples=40, deadline=None)
@given(q=int4_matrix)
def test_roundtrip_pairs_along_n(q):
    n, k = len(q), len(q[0])
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp), {P: ("W4A8_DYNAMIC", {
            "weight": pack_pairs_along_n(q), "weight_scale": torch.ones(n, 1), "weight_offset": torch.zeros(n, 1),
        })})
        _, spec, layer = read_one(root)
    assert (spec.out_features, spec.in_features) == (n, k)
    assert layer.qweight.tolist() == [[v + 8 for v in row] for row in q]
    assert dequantize(layer).tolist() == [[float(v) for v in row] for row in q]


@settings(max_examples=40, deadline=None)
@given(q=int4_matrix)
def test_roundtrip_pairs_along_k(q):
    n, k = len(q), len(q[0])
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp), {P: ("W4A16", {
            "weight": pack_pairs_along_k(q), "weight_scale": torch.ones(n, 1), "weight_offset": torch.zeros(n, 1),
        })})
        _, spec, layer = read_one(root)
    assert (spec.out_features, spec.in_features) == (n, k)
    assert layer.qweight.tolist() == [[v + 8 for v in row] for row in q]


# detection, description handling -----------------------------------------------------------------------
W8 = {"weight": i8([[1, 2]]), "weight_scale": f32([[1.0]]), "weight_offset": f32([[0.0]])}


def test_legacy_file_names(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)}, desc_name="quant_model_description_w8a16.json",
                 weights_name="quant_model_weight_w8a16-00001-of-00001.safetensors")
    reader, spec, layer = read_one(root)
    assert reader.consumed_files() == ["quant_model_description_w8a16.json"]
    assert torch.equal(dequantize(layer), f32([[1.0, 2.0]]))


def test_two_legacy_descriptions_are_ambiguous(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)}, desc_name="quant_model_description_w8a16.json")
    (root / "quant_model_description_w8a8.json").write_text("{}")
    with pytest.raises(InputError, match="several msModelSlim description files"):
        open_reader(Checkpoint(root)).linear_specs()


def test_summary_and_meta_keys(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8), "model.layers.0.mlp.up_proj": ("W8A8_DYNAMIC", W8)},
                 meta={"kv_cache_type": "C8", "model.layers.0.self_attn.quant_type": "INT8", "group_size": 0})
    reader = open_reader(Checkpoint(root))
    assert reader.summary() == {"model_quant_type": "W8A8", "version": "1.0.0", "group_size": 0,
                                "types": ["W8A16", "W8A8_DYNAMIC"]}
    assert [s.name for s in reader.linear_specs()] == [P, "model.layers.0.mlp.up_proj"]


def test_float_layer_is_not_quantized(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)},
                 extra={"model.layers.0.mlp.up_proj.weight": ("FLOAT", torch.ones(2, 2, dtype=torch.float16))})
    reader = open_reader(Checkpoint(root))
    assert [s.name for s in reader.linear_specs()] == [P]
    assert "model.layers.0.mlp.up_proj.weight" in reader.passthrough_names()


def test_quarot_and_c8_tensors_pass_through(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)}, extra={
        "model.layers.0.self_attn.heads_rotation": (None, torch.eye(2)),
        "model.layers.0.self_attn.k_proj.kv_cache_scale": ("C8", torch.ones(2)),
        "model.layers.0.input_layernorm.module.weight": ("W8A16", torch.ones(4)),  # legacy norm copy
    })
    reader = open_reader(Checkpoint(root))
    assert [s.name for s in reader.linear_specs()] == [P]
    passthrough = reader.passthrough_names()
    for name in ("model.layers.0.self_attn.heads_rotation", "model.layers.0.self_attn.k_proj.kv_cache_scale",
                 "model.layers.0.input_layernorm.module.weight"):
        assert name in passthrough
    assert any("C8" in w for w in reader.warnings)


# failures ---------------------------------------------------------------------------------------------
def scan(root: Path):
    return open_reader(Checkpoint(root)).linear_specs()


def test_described_tensor_missing(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)})
    desc = json.loads((root / "quant_model_description.json").read_text())
    desc["model.layers.0.mlp.gate_proj.weight"] = "W8A16"
    (root / "quant_model_description.json").write_text(json.dumps(desc))
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        scan(root)


def test_undescribed_tensor(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)}, extra={"model.layers.0.mlp.extra": (None, torch.ones(2))})
    with pytest.raises(InputError, match=r"'model\.layers\.0\.mlp\.extra' has no entry"):
        scan(root)


@pytest.mark.parametrize("qtype", [
    "W4A4_FLATQUANT_DYNAMIC", "W4A4_MXFP4_FLATQUANT", "W8A8_SVD_DYNAMIC", "W4A4_MXFP4_SVD", "W16A16S",
    "W8A8S", "W8A8SC", "W4A4_MXFP4_DUALSCALE", "W8A8_TIMESTEP", "NF4", "SOMETHING_NEW",
])
def test_unsupported_types(tmp_path, qtype):
    root = build(tmp_path, {P: (qtype, W8)})
    with pytest.raises(UnsupportedError, match=rf"'{P}\.weight'.*{qtype}"):
        scan(root)


def test_unexplained_tensor_of_a_layer(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {**W8, "weight_dual_scale": f32([1.0])})})
    with pytest.raises(UnsupportedError, match=rf"'{P}\.weight_dual_scale'"):
        scan(root)


def test_non_integer_offset(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {**W8, "weight_offset": f32([[0.5]])})})
    with pytest.raises(InputError, match=rf"'{P}\.weight_offset'.*0\.5"):
        scan(root)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5, 2.0**15])
def test_non_integer_offset_names_the_first_bad_value(tmp_path, bad):
    # offsets are read without torch at scan (inspect); the message names the first bad one in storage order
    offsets = f32([[0.0, 1.0], [bad, -0.25], [3.0, 0.0]])
    root = build(tmp_path, {P: ("W8A16", {"weight": i8([[1, 2, 3, 4]] * 3), "weight_scale": torch.ones(3, 2),
                                          "weight_offset": offsets})})
    with pytest.raises(InputError, match=rf"'{P}\.weight_offset': offset {bad} is not an integer zero point"):
        scan(root)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32])
def test_offsets_of_every_stored_dtype(tmp_path, dtype):
    # msModelSlim writes float32, the model dtype (bf16/fp16) or int64 offsets: all read exactly
    root = build(tmp_path, {P: ("W8A16", {
        "weight": i8([[1, 2, 3, 4], [5, 6, 7, 8]]), "weight_scale": torch.ones(2, 2),
        "weight_offset": torch.tensor([[0, -3], [100, 0]], dtype=dtype),
    })})
    reader, spec, layer = read_one(root)
    assert not spec.symmetric
    assert layer.zero.tolist() == [[128, 125], [228, 128]]


def test_float8_offsets_are_refused(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {**W8, "weight_offset": torch.zeros(1, 1).to(torch.float8_e4m3fn)})})
    with pytest.raises(InputError, match=rf"'{P}\.weight_offset' is float8_e4m3fn; expected an integer"):
        scan(root)


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), 0.5])
def test_static_input_offset_not_an_integer(tmp_path, offset):
    # nan and inf ended in a traceback (round(nan)) before offsets were read without torch
    parts = static_parts(fp32_bits_int64([0.75, 0.375]), input_offset=f32([offset]))
    root = build(tmp_path, {P: ("W8A8", parts)})
    with pytest.raises(InputError, match=rf"'{P}\.input_offset': input offset {offset} is not an integer"):
        scan(root)


def test_static_input_scale_is_checked_as_float32(tmp_path):
    # the scale is loaded as float32: a float64 1e-60 is 0 there, so it is refused at scan
    parts = static_parts(fp32_bits_int64([0.75, 0.375]), input_scale=torch.tensor([1e-60], dtype=torch.float64))
    root = build(tmp_path, {P: ("W8A8", parts)})
    with pytest.raises(InputError, match=rf"'{P}\.input_scale': input scale 0.0 is not a positive number"):
        scan(root)


def test_missing_weight_scale(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {"weight": W8["weight"], "weight_offset": W8["weight_offset"]})})
    with pytest.raises(InputError, match=rf"'{P}\.weight_scale' is missing"):
        scan(root)


def test_wrong_weight_dtype(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {**W8, "weight": torch.ones(1, 2, dtype=torch.float16)})})
    with pytest.raises(InputError, match=rf"'{P}\.weight'.*float16"):
        scan(root)


def test_scale_rows_do_not_match_weight(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {**W8, "weight_scale": f32([[1.0], [1.0], [1.0]]),
                                          "weight_offset": torch.zeros(3, 1)})})
    with pytest.raises(InputError, match=rf"'{P}\.weight'"):
        scan(root)


def test_int4_shape_fits_no_layout(tmp_path):
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {"weight": i8([[1, 2], [3, 4], [5, 6]]),
                                                 "weight_scale": torch.ones(2, 1), "weight_offset": torch.zeros(2, 1)})})
    with pytest.raises(InputError, match=rf"'{P}\.weight'.*\[3, 2\]"):
        scan(root)


def test_groups_do_not_divide_k(tmp_path):
    root = build(tmp_path, {P: ("W8A16", {"weight": i8([[1, 2, 3]]), "weight_scale": f32([[1.0, 1.0]]),
                                          "weight_offset": torch.zeros(1, 2)})})
    with pytest.raises(InputError, match=rf"'{P}\.weight_scale'.*2 groups"):
        scan(root)


def test_int4_value_out_of_range(tmp_path):
    root = build(tmp_path, {P: ("W4A4_DYNAMIC", {**W8, "weight": i8([[9, 0]])})})
    reader = open_reader(Checkpoint(root))
    (spec,) = reader.linear_specs()
    with pytest.raises(InputError, match=rf"'{P}\.weight'.*9"):
        reader.load(spec)


def test_two_stage_first_offset_nonzero(tmp_path):
    parts = {**TWO_STAGE, "weight_offset": f32([[1.0], [0.0]])}
    root = build(tmp_path, {P: ("W4A8_DYNAMIC", {"weight": i8([[-1, 1, 0, -1], [-8, 2, 0, 7]]), **parts})})
    with pytest.raises(UnsupportedError, match=rf"'{P}\.weight_offset'"):
        scan(root)


def test_static_zero_input_scale(tmp_path):
    root = build(tmp_path, {P: ("W8A8", static_parts(fp32_bits_int64([0.75, 0.375]), input_scale=f32([0.0])))})
    with pytest.raises(InputError, match=rf"'{P}\.input_scale'"):
        scan(root)


def test_static_missing_deq_scale(tmp_path):
    parts = static_parts(None)
    del parts["deq_scale"]
    root = build(tmp_path, {P: ("W8A8", parts)})
    with pytest.raises(InputError, match=rf"'{P}\.deq_scale' is missing"):
        scan(root)


def test_fp8_nonzero_offset(tmp_path):
    root = build(tmp_path, {P: ("WFP8AFP8_DYNAMIC", {
        "weight": torch.ones(1, 2).to(torch.float8_e4m3fn), "weight_scale": f32([[1.0]]), "weight_offset": f32([[1.0]]),
    })})
    with pytest.raises(UnsupportedError, match=rf"'{P}\.weight_offset'"):
        scan(root)


def test_mx_scale_shape(tmp_path):
    root = build(tmp_path, {P: ("W8A8_MXFP8", {
        "weight": torch.zeros(1, 64).to(torch.float8_e4m3fn), "weight_scale": torch.full((1, 1), 127, dtype=torch.uint8),
    })})
    with pytest.raises(InputError, match=rf"'{P}\.weight_scale'.*\[1, 2\]"):
        scan(root)


def test_not_detected_without_description(tmp_path):
    root = build(tmp_path, {P: ("W8A16", W8)})
    (root / "quant_model_description.json").unlink()
    assert not ModelSlimReader.matches(Checkpoint(root))
