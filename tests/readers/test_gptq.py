"""GPTQ reader: real GPTQModel fixtures bit-exact, v1/v2 detection, hand-worked vectors, round trips, errors.

Rules under test: checkpoint_formats.md §1 (GPTQ v1/v2 layout, packing along K, v1 ``z - 1``
fields, GPTQModel's word-level v2→v1 export) and the detection rule in ``npuconv.readers.gptq``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import FIXTURES, load_reference, open_fixture
from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import dequantize
from npuconv.readers import open_reader
from npuconv.readers.gptq import V1, V2, GPTQReader, decode_zero_points, symmetric_verdict, unpack_qweight, unpack_zero_fields
from npuconv.io.safetensors_io import save_file

# fixture → (detected format, bits, group_size, sym, desc_act)
GPTQ_FIXTURES = {
    "gptq_v1_b4_g32_sym": (V1, 4, 32, True, False),
    "gptq_v1_b4_g64_asym_descact": (V1, 4, 64, False, True),
    "gptq_v1_b8_g128_asym_descact": (V1, 8, 128, False, True),
    "gptq_v2_b3_g32_asym": (V2, 3, 32, False, False),
    "gptq_v2_b4_g32_asym": (V2, 4, 32, False, False),
}


def words(*values: int) -> torch.Tensor:
    """int32 tensor from unsigned 32-bit values (safetensors stores the words as signed int32)."""
    return torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.mark.parametrize("name", sorted(GPTQ_FIXTURES))
def test_fixture_matches_gptqmodel_dequant_bit_exactly(name):
    fmt, bits, group_size, sym, desc_act = GPTQ_FIXTURES[name]
    reader = open_fixture(name)
    assert isinstance(reader, GPTQReader)
    reference = load_reference(name)
    specs = reader.linear_specs()
    assert sorted(f"{spec.name}.weight" for spec in specs) == sorted(reference)
    for spec in specs:
        assert (spec.bits, spec.group_size, spec.symmetric) == (bits, group_size, sym)
        assert spec.scheme == f"w{bits}a16"
        assert spec.source_scheme == fmt
        layer = reader.load(spec)
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (spec.out_features, spec.in_features)
        assert layer.scale.dtype == torch.float16 and layer.scale.shape == (spec.out_features, spec.num_groups)
        if sym:
            assert layer.zero is None
        else:
            assert layer.zero.dtype == torch.int16 and layer.zero.shape == layer.scale.shape
        # desc_act: every module with more than one group has a non-monotonic g_idx (README)
        assert spec.act_order == (desc_act and spec.num_groups > 1)
        assert (layer.g_idx is not None) == spec.act_order
        assert torch.equal(dequantize(layer), reference[f"{spec.name}.weight"]), spec.name
    summary = reader.summary()
    assert summary == {
        "checkpoint_format": fmt,
        "declared_checkpoint_format": fmt,
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
    }
    assert reader.warnings == []
    assert reader.consumed_files() == ["quantize_config.json"]


def test_fixture_passthrough_excludes_gptq_tensors():
    reader = open_fixture("gptq_v2_b4_g32_asym")
    passthrough = reader.passthrough_names()
    assert "model.embed_tokens.weight" in passthrough and "lm_head.weight" in passthrough
    assert not [n for n in passthrough if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")]


def relabelled(tmp_path: Path, name: str, label: str) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    for filename in ("config.json", "quantize_config.json"):
        data = json.loads((root / filename).read_text())
        target = data.get("quantization_config", data)
        target["format"] = target["checkpoint_format"] = label
        (root / filename).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("name", sorted(GPTQ_FIXTURES))
def test_detection_overrides_a_wrong_label(tmp_path, name):
    # vllm issue 38966: a "gptq" label on v2 zero points; and the converse
    fmt = GPTQ_FIXTURES[name][0]
    wrong = V1 if fmt == V2 else V2
    reader = open_reader(Checkpoint(relabelled(tmp_path, name, wrong)))
    summary = reader.summary()
    assert summary["checkpoint_format"] == fmt
    assert summary["declared_checkpoint_format"] == wrong
    assert len(reader.warnings) == 1
    assert f"declares checkpoint_format '{wrong}'" in reader.warnings[0] and f"reading them as {fmt}" in reader.warnings[0]
    reference = load_reference(name)
    spec = reader.linear_specs()[-1]
    assert torch.equal(dequantize(reader.load(spec)), reference[f"{spec.name}.weight"])


# ---------------------------------------------------------------------------- hand-worked vectors
def test_qweight_packs_along_k_lsb_first():
    # §1.3: qweight[r, n] holds rows k = 8r + j at bits [4j, 4j+4); two columns n = 0, 1
    qweight = words(0x76543210, 0x01234567).reshape(1, 2)
    assert unpack_qweight(qweight, 4, 8).tolist() == [list(range(8)), list(range(7, -1, -1))]


def test_3bit_value_10_and_21_straddle_words():
    # §1.3: 32 values per 3 words; value 10 = 0b110: bits 1..0 (0b10) are word0 bits 30-31, bit 2
    # is word1 bit 0; value 21 = 0b101: bit 0 is word1 bit 31, bits 2..1 (0b10) are word2 bits 0-1.
    qweight = words(0x80000000, 0x80000001, 0x00000002).reshape(3, 1)
    expected = [0] * 32
    expected[10], expected[21] = 6, 5
    assert unpack_qweight(qweight, 3, 32).tolist() == [expected]


def test_3bit_stream_of_ones():
    # values 0..31 all 0b001: word0 bits 0,3,..,27 + bit 30 (value 10 low bits 01); word1 bits 1,4,..,
    # 28 (values 11..20) + bit 31 (value 21 bit 0); word2 bits 2,5,..,29 (values 22..31)
    word0 = sum(1 << (3 * i) for i in range(11))
    word1 = sum(1 << (1 + 3 * j) for j in range(10)) | 1 << 31
    word2 = sum(1 << (2 + 3 * j) for j in range(10))
    assert unpack_qweight(words(word0, word1, word2).reshape(3, 1), 3, 32).tolist() == [[1] * 32]


def test_v1_asym_zero_is_field_plus_one():
    # fields (LSB first) 1, 6, 14, 0, 0, 0, 0, 0 → v1 zero points 2, 7, 15, 1, ...; v2 the fields as is
    qzeros = words(0x00000E61).reshape(1, 1)
    assert decode_zero_points(qzeros, 4, 8, V1).flatten().tolist() == [2, 7, 15, 1, 1, 1, 1, 1]
    assert decode_zero_points(qzeros, 4, 8, V2).flatten().tolist() == [1, 6, 14, 0, 0, 0, 0, 0]
    assert decode_zero_points(qzeros, 4, 8, V1).shape == (8, 1)  # canonical [N, G]


@pytest.mark.parametrize(
    "bits, word, z",
    [(4, 0x77777777, 8), (8, 0x7F7F7F7F, 128), (2, 0x55555555, 2)],
)
def test_symmetric_v1_words(bits, word, z):
    # §1.4: sym v1 stores 2^(b-1) - 1 in every field
    n = 32 // bits
    assert decode_zero_points(words(word).reshape(1, 1), bits, n, V1).flatten().tolist() == [z] * n


def test_3bit_symmetric_v1_fields_straddle():
    # 3-bit sym v1: every field 3 (0b011) over 32 columns = 3 words; zero points 4
    stream = sum(3 << (3 * i) for i in range(32))
    qzeros = words(*[(stream >> (32 * w)) & 0xFFFFFFFF for w in range(3)]).reshape(1, 3)
    assert decode_zero_points(qzeros, 3, 32, V1).flatten().tolist() == [4] * 32


def test_v1_borrow_is_undone_word_wise():
    # GPTQModel export of zero points [0, 5, 8, 8, 8, 8, 8, 8]: v2 word 0x88888850 minus 0x11111111
    # = 0x7777773F (field 0 wraps to 15 and borrows from field 1: 5 - 1 - 1 = 3).
    qzeros = words(0x7777773F).reshape(1, 1)
    assert decode_zero_points(qzeros, 4, 8, V1).flatten().tolist() == [0, 5, 8, 8, 8, 8, 8, 8]


def test_3bit_v1_zero_point_zero_is_per_field():
    # GPTQModel 3-bit: (z - 1) & 7 per field, so field 7 → z = 0 without touching its neighbour
    stream = 7 | 4 << 3  # fields 7, 4, 0, ...
    qzeros = words(stream, 0, 0).reshape(1, 3)
    assert decode_zero_points(qzeros, 3, 32, V1).flatten().tolist()[:3] == [0, 5, 1]


@pytest.mark.parametrize(
    "bits, v1_word, v2_word",
    [(2, 0x55555555, 0xAAAAAAAA), (4, 0x77777777, 0x88888888), (8, 0x7F7F7F7F, 0x80808080)],
)
def test_symmetric_verdict_from_the_stored_words(bits, v1_word, v2_word):
    # §1.4: every field of a sym module is 2^(b-1) - 1 (v1) or 2^(b-1) (v2); decided on the bytes
    n = 64 // bits  # [G=3, 2 words]
    assert symmetric_verdict(words(*[v1_word] * 6).numpy().tobytes(), 2, bits, n) == (V1, 2 ** (bits - 1) - 1)
    assert symmetric_verdict(words(*[v2_word] * 6).numpy().tobytes(), 2, bits, n) == (V2, 2 ** (bits - 1))
    one_off = words(*[v1_word] * 5, v1_word ^ (1 << bits)).numpy().tobytes()  # field 1 of the last word
    assert symmetric_verdict(one_off, 2, bits, n) is None


def test_3bit_symmetric_verdict_ignores_the_padding_of_the_last_word():
    # N = 8 fields of 3 bits fill bits 0..23 of one word; bits 24..31 are no field
    v1 = sum(3 << (3 * i) for i in range(8))
    assert symmetric_verdict(words(v1 | 0xFF000000, v1).numpy().tobytes(), 1, 3, 8) == (V1, 3)
    assert symmetric_verdict(words(v1 | 1 << 23).numpy().tobytes(), 1, 3, 8) is None  # field 7: 0b011 → 0b111


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    n=st.integers(1, 80),
    groups=st.integers(1, 3),
    base=st.sampled_from(["v1", "v2"]),
    flip=st.none() | st.tuples(st.integers(0, 239), st.integers(0, 7)),
    padding=st.integers(0, 2**32 - 1),
)
def test_symmetric_verdict_matches_the_unpacked_fields(bits, n, groups, base, flip, padding):
    """The packed-word rule agrees with comparing the fields :func:`unpack_zero_fields` unpacks."""
    value = 2 ** (bits - 1) - (base == "v1")
    fields = [[value] * n for _ in range(groups)]
    if flip is not None:
        row, bit = flip[0] % groups, flip[1] % bits
        fields[row][flip[0] % n] ^= 1 << bit
    nwords = -(-n * bits // 32)
    unused = 32 * nwords - n * bits  # padding bits above field n - 1 in the last word
    rows = [pack_stream(row, bits, nwords) for row in fields]
    for row in rows:
        row[-1] |= (padding << (32 - unused)) & 0xFFFFFFFF
    qzeros = to_int32(rows)
    unpacked = unpack_zero_fields(qzeros, bits, n)
    midpoint = 2 ** (bits - 1)
    expected = (V1, midpoint - 1) if bool((unpacked == midpoint - 1).all()) else (
        (V2, midpoint) if bool((unpacked == midpoint).all()) else None)
    assert symmetric_verdict(qzeros.numpy().tobytes(), nwords, bits, n) == expected
    assert (expected is None) == (flip is not None)


# ------------------------------------------------------------------- test-local packer (from the spec)
def pack_stream(values: list[int], bits: int, nwords: int) -> list[int]:
    """LSB-first bitstream: value i at bits [i*b, i*b+b) of consecutive 32-bit words (§1.3)."""
    acc = 0
    for i, value in enumerate(values):
        acc |= value << (i * bits)
    return [(acc >> (32 * w)) & 0xFFFFFFFF for w in range(nwords)]


def to_int32(unsigned: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[v - 2**32 if v >= 2**31 else v for v in row] for row in unsigned], dtype=torch.int64).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] → qweight int32 [K*b/32, N], packed along K."""
    k = codes.shape[1]
    columns = [pack_stream(row, bits, k * bits // 32) for row in codes.tolist()]
    return to_int32(columns).t().contiguous()


def pack_qzeros(zero: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """zero points [N, G] → qzeros int32 [G, N*b/32]; v1 as GPTQModel exports it (§1.4)."""
    n = zero.shape[0]
    nwords = -(-n * bits // 32)
    rows = zero.t().tolist()
    if fmt == V2:
        return to_int32([pack_stream(row, bits, nwords) for row in rows])
    if bits == 3:  # per decoded field
        return to_int32([pack_stream([(z - 1) & 7 for z in row], bits, nwords) for row in rows])
    constant = sum(1 << (bits * j) for j in range(32 // bits))  # whole-word subtraction
    return to_int32([[(w - constant) % 2**32 for w in pack_stream(row, bits, nwords)] for row in rows])


def quantize_like_gptq(weight: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor):
    """GPTQ's min/max quantizer per (row, group) (range always includes 0): codes, zero points, fp16 scales."""
    n, k = weight.shape
    groups = int(g_idx.max()) + 1
    maxq = 2**bits - 1
    scale = torch.empty(n, groups)
    zero = torch.empty(n, groups, dtype=torch.int64)
    for g in range(groups):
        cols = weight[:, g_idx == g]
        lo = cols.min(dim=1).values.clamp(max=0)
        hi = cols.max(dim=1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        s = ((hi - lo) / maxq).clamp(min=1e-6).half().float()
        scale[:, g] = s
        zero[:, g] = 2 ** (bits - 1) if sym else torch.round(-lo / s).clamp(0, maxq).long()
    codes = torch.round(weight / scale[:, g_idx]) + zero[:, g_idx]
    return codes.clamp(0, maxq).to(torch.uint8), zero, scale.half()


def write_checkpoint(root: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": config}))
    (root / "quantize_config.json").write_text(json.dumps(config))
    return root


def set_config(root: Path, **changes) -> None:
    """Change settings in quantize_config.json and config.json's quantization_config alike."""
    config = json.loads((root / "quantize_config.json").read_text())
    config.update(changes)
    (root / "quantize_config.json").write_text(json.dumps(config))
    full = json.loads((root / "config.json").read_text())
    full["quantization_config"].update(changes)
    (root / "config.json").write_text(json.dumps(full))


def gptq_config(bits=4, group_size=32, sym=False, desc_act=False, fmt=V1, **extra) -> dict:
    return {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act, "quant_method": "gptq",
            "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32", **extra}


def gptq_tensors(prefix: str, codes, zero, scale, bits, fmt, g_idx=None, bias=None) -> dict[str, torch.Tensor]:
    out = {
        f"{prefix}.qweight": pack_qweight(codes, bits),
        f"{prefix}.qzeros": pack_qzeros(zero, bits, fmt),
        f"{prefix}.scales": scale.t().contiguous(),
    }
    if g_idx is not None:
        out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
    if bias is not None:
        out[f"{prefix}.bias"] = bias
    return out


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    n=st.sampled_from([32, 64]),
    k_blocks=st.integers(1, 4),
    group_size=st.sampled_from([32, 64, -1]),
    sym=st.booleans(),
    act_order=st.booleans(),
    fmt=st.sampled_from([V1, V2]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_through_a_checkpoint(tmp_path_factory, bits, n, k_blocks, group_size, sym, act_order, fmt, seed):
    k = 64 * k_blocks
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    size = k if group_size == -1 else group_size
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    codes, zero, scale = quantize_like_gptq(weight, bits, group_size, sym, g_idx)
    bias = torch.randn(n, generator=gen).half()
    tensors = gptq_tensors("model.layers.0.mlp.up_proj", codes, zero, scale, bits, fmt, g_idx, bias)
    config = gptq_config(bits, group_size, sym, act_order, fmt)
    reader = open_reader(Checkpoint(write_checkpoint(tmp_path_factory.mktemp("gptq"), tensors, config)))
    (spec,) = reader.linear_specs()
    assert (spec.out_features, spec.in_features, spec.bits, spec.group_size) == (n, k, bits, group_size)
    assert spec.act_order == (act_order and size < k)
    assert spec.has_bias and spec.bias_dtype == "float16"
    assert reader.summary()["checkpoint_format"] == fmt
    layer = reader.load(spec)
    assert torch.equal(layer.qweight, codes)
    assert torch.equal(layer.scale, scale)
    assert torch.equal(layer.bias, bias)
    if sym:
        assert layer.zero is None
    else:
        assert torch.equal(layer.zero, zero.to(torch.int16))
    if spec.act_order:
        assert torch.equal(layer.g_idx, g_idx.to(torch.int32))
    else:
        assert layer.g_idx is None
    expected = (codes.float() - zero[:, g_idx].float()) * scale.float()[:, g_idx]
    assert torch.equal(dequantize(layer), expected)


def test_borrowed_v1_zero_points_warn_and_decode(tmp_path):
    # realistic asymmetric data, then row 0 given zero points 0 (v1 field 15, borrow from the next
    # field) and row 1 zero points 15: both decode exactly, and the reader warns about the borrow
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen)
    g_idx = torch.arange(256) // 32
    codes, zero, scale = quantize_like_gptq(weight, 4, 32, False, g_idx)
    zero[0, :] = 0
    zero[1, :] = 15
    tensors = gptq_tensors("model.layers.0.mlp.up_proj", codes, zero, scale, 4, V1)
    reader = open_reader(Checkpoint(write_checkpoint(tmp_path / "m", tensors, gptq_config(fmt=V1))))
    (spec,) = reader.linear_specs()
    layer = reader.load(spec)
    assert torch.equal(layer.zero, zero.to(torch.int16))
    assert any("zero point 0" in w and "model.layers.0.mlp.up_proj.qzeros" in w for w in reader.warnings)


def test_inconclusive_detection_trusts_the_label(tmp_path):
    # one tiny asymmetric module with random codes: no evidence either way
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 32), generator=gen, dtype=torch.uint8)
    zero = torch.randint(1, 15, (32, 1), generator=gen)
    scale = torch.rand(32, 1, generator=gen).half()
    tensors = gptq_tensors("model.layers.0.mlp.up_proj", codes, zero, scale, 4, V2)
    reader = open_reader(Checkpoint(write_checkpoint(tmp_path / "m", tensors, gptq_config(group_size=-1, fmt=V2))))
    assert reader.summary()["checkpoint_format"] == V2
    assert any("cannot tell GPTQ v1 from v2" in w for w in reader.warnings)


# ------------------------------------------------------------------------- config: dynamic, lm_head
def test_dynamic_overrides_and_exclusions(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for name, bits, group_size in (("q_proj", 4, 32), ("down_proj", 8, 64)):
        weight = torch.randn(64, 128, generator=gen)
        g_idx = torch.arange(128) // group_size
        codes, zero, scale = quantize_like_gptq(weight, bits, group_size, True, g_idx)
        tensors.update(gptq_tensors(f"model.layers.0.{name}", codes, zero, scale, bits, V1, g_idx))
    tensors["model.layers.0.k_proj.weight"] = torch.randn(32, 128).half()
    config = gptq_config(sym=True, dynamic={"-:.*k_proj": {}, "+:.*down_proj": {"bits": 8, "group_size": 64}})
    reader = open_reader(Checkpoint(write_checkpoint(tmp_path / "m", tensors, config)))
    specs = {spec.name: spec for spec in reader.linear_specs()}
    assert sorted(specs) == ["model.layers.0.down_proj", "model.layers.0.q_proj"]
    assert (specs["model.layers.0.down_proj"].bits, specs["model.layers.0.down_proj"].group_size) == (8, 64)
    assert specs["model.layers.0.down_proj"].scheme == "w8a16"
    assert (specs["model.layers.0.q_proj"].bits, specs["model.layers.0.q_proj"].group_size) == (4, 32)
    assert reader.passthrough_names() == ["model.layers.0.k_proj.weight"]
    for spec in specs.values():
        assert reader.load(spec).zero is None


def test_quantized_module_excluded_by_dynamic_is_an_error(tmp_path):
    root = tiny_gptq(tmp_path, dynamic={"-:.*up_proj": {}})
    with pytest.raises(InputError, match=r"'model\.layers\.0\.mlp\.up_proj\.qweight'.*-:"):
        open_reader(Checkpoint(root)).linear_specs()


def test_lm_head_flag_mismatch_warns(tmp_path):
    root = tiny_gptq(tmp_path, lm_head=True)
    reader = open_reader(Checkpoint(root))
    reader.linear_specs()
    assert any("lm_head: true" in w for w in reader.warnings)


# ------------------------------------------------------------------------------------ failure cases
def tiny_gptq(tmp_path: Path, *, bits=4, n=32, k=64, group_size=32, sym=True, fmt=V1, drop=(), edit=None, **extra) -> Path:
    """A one-module symmetric checkpoint; ``edit`` may replace tensors before writing."""
    size = k if group_size == -1 else group_size
    g_idx = torch.arange(k) // size
    codes, zero, scale = quantize_like_gptq(torch.randn(n, k, generator=torch.Generator().manual_seed(3)), bits, group_size, sym, g_idx)
    tensors = gptq_tensors("model.layers.0.mlp.up_proj", codes, zero, scale, bits, fmt, g_idx)
    if edit:
        edit(tensors)
    for suffix in drop:
        del tensors[f"model.layers.0.mlp.up_proj.{suffix}"]
    return write_checkpoint(tmp_path / "m", tensors, gptq_config(bits, group_size, sym, fmt=fmt, **extra))


def test_tiny_checkpoint_is_valid(tmp_path):
    reader = open_reader(Checkpoint(tiny_gptq(tmp_path)))
    (spec,) = reader.linear_specs()
    assert reader.load(spec).zero is None and reader.summary()["checkpoint_format"] == V1


@pytest.mark.parametrize(
    "extra, error, pattern",
    [
        ({"bits": 5}, UnsupportedError, "bits 5"),
        ({"checkpoint_format": "gptq_p", "format": "gptq_p"}, UnsupportedError, "gptq_p"),
        ({"checkpoint_format": "marlin", "format": "marlin"}, UnsupportedError, "marlin"),
        ({"checkpoint_format": "bitblas", "format": "bitblas"}, UnsupportedError, "bitblas"),
        ({"checkpoint_format": "qqq", "format": "qqq"}, UnsupportedError, "qqq"),
        ({"is_marlin_format": True}, UnsupportedError, "marlin"),
        ({"pack_dtype": "int64"}, UnsupportedError, "pack_dtype"),
        ({"group_size": 0}, InputError, "group_size"),
        ({"dynamic": {"+:.*up_proj": {"bits": 6}}}, UnsupportedError, r"dynamic\['\+:\.\*up_proj'\]: bits 6"),
        ({"dynamic": {"+:(": {}}}, InputError, "not a valid regex"),
    ],
)
def test_config_errors(tmp_path, extra, error, pattern):
    root = tiny_gptq(tmp_path)
    set_config(root, **extra)
    with pytest.raises(error, match=pattern):
        open_reader(Checkpoint(root)).linear_specs()


P = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"drop": ("qzeros",)}, rf"tensor '{P}\.qzeros' is missing"),
        ({"drop": ("scales",)}, rf"tensor '{P}\.scales' is missing"),
        # 3-bit: 4 rows of words do not hold whole 3-bit codes (K*3/32 rows)
        ({"edit": lambda t: t.update({f"{P}.qweight": torch.zeros(5, 32, dtype=torch.int32)}), "bits": 3},
         rf"'{P}\.qweight'.*whole number of 3-bit codes"),
        ({"edit": lambda t: t.update({f"{P}.scales": torch.zeros(2, 16, dtype=torch.float16)})}, rf"'{P}\.scales'.*N = 32"),
        ({"edit": lambda t: t.update({f"{P}.scales": torch.zeros(3, 32, dtype=torch.float16)})}, rf"'{P}\.scales'.*3 groups"),
        ({"edit": lambda t: t.update({f"{P}.qzeros": torch.zeros(2, 5, dtype=torch.int32)})}, rf"'{P}\.qzeros'.*shape \[2, 5\]"),
        ({"edit": lambda t: t.update({f"{P}.g_idx": torch.zeros(63, dtype=torch.int32)})}, rf"'{P}\.g_idx'.*length K = 64"),
        ({"edit": lambda t: t.update({f"{P}.g_idx": torch.full((64,), 2, dtype=torch.int32)})}, rf"'{P}\.g_idx'.*\[0, 2\)"),
        ({"edit": lambda t: t.update({f"{P}.qweight": t[f"{P}.qweight"].to(torch.int64)})}, rf"'{P}\.qweight'.*int32"),
    ],
)
def test_tensor_errors_name_the_tensor(tmp_path, kwargs, pattern):
    with pytest.raises((InputError, UnsupportedError), match=pattern):
        open_reader(Checkpoint(tiny_gptq(tmp_path, **kwargs))).linear_specs()


def test_group_size_not_dividing_k_is_an_error(tmp_path):
    root = tiny_gptq(tmp_path)  # written with g = 32, declared 48 afterwards
    set_config(root, group_size=48)
    with pytest.raises(InputError, match=rf"'{P}\.qweight'.*group_size 48 does not divide in_features K = 64"):
        open_reader(Checkpoint(root)).linear_specs()


def test_symmetric_config_with_asymmetric_zero_points_is_an_error(tmp_path):
    def asym_zeros(tensors):
        stream = pack_stream([7] * 31 + [9], 4, 4)  # v1 fields: 31 zero points 8, one 10
        tensors[f"{P}.qzeros"] = to_int32([stream, stream])

    reader = open_reader(Checkpoint(tiny_gptq(tmp_path, edit=asym_zeros)))
    (spec,) = reader.linear_specs()
    with pytest.raises(InputError, match=rf"'{P}\.qzeros'.*not all 8"):
        reader.load(spec)


def test_desc_act_without_g_idx_is_an_error(tmp_path):
    root = tiny_gptq(tmp_path, drop=("g_idx",), desc_act=True)
    with pytest.raises(InputError, match=rf"'{P}\.g_idx' is missing"):
        open_reader(Checkpoint(root)).linear_specs()


def test_missing_g_idx_without_desc_act_means_k_over_g(tmp_path):
    reader = open_reader(Checkpoint(tiny_gptq(tmp_path, drop=("g_idx",))))
    (spec,) = reader.linear_specs()
    assert not spec.act_order and reader.load(spec).g_idx is None
    assert f"{P}.g_idx" not in spec.source_tensors


def test_detected_from_config_json_without_quantize_config(tmp_path):
    root = tiny_gptq(tmp_path)
    (root / "quantize_config.json").unlink()
    reader = open_reader(Checkpoint(root))
    assert isinstance(reader, GPTQReader) and reader.summary()["checkpoint_format"] == V1
