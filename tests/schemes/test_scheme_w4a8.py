"""``--to npu-w4a8``: int4 weights × int8 dynamic activations for the A8W4 ``npu_grouped_matmul``.

Checked against msModelSlim's own W4A8_DYNAMIC fixture (its tool dequantization and its
``scale_bias`` bytes), a hand-made symmetric GPTQ checkpoint with group 256, a spec-derived decoder
and planted bugs (scale_bias sign and TP split, nibble pairing, scales).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, load_reference
from scheme_helpers import fp32_of_int64_bits, make_gptq_sym, manifest, nibbles_of_words, nz_to_nd, read_all

from npuconv.convert import ConvertOptions, convert
from npuconv.errors import UnsupportedError
from npuconv.kernels import emulated, get_backend
from npuconv.model import INT, ActivationQuant, LinearSpec, QuantizedLinear
from npuconv.runtime import load_output
from npuconv.io.safetensors_io import read_header, read_tensor
from npuconv.registry import native_target
from npuconv.verify import VerifyOptions, verify
from npuconv.writers import WriterOptions
from test_verify import rewrite, swap_nibbles

FIXTURE = "ms_w4a8_dynamic"
DOWN = "model.layers.0.mlp.down_proj"


def convert_to(tmp_path, source, **options):
    out = tmp_path / "out"
    convert(source, out, ConvertOptions("npu-w4a8", WriterOptions(**options)))
    return out


def decode(layer: dict, tensors: dict) -> torch.Tensor:
    """W[n, k] = nibble(weight)[k, n] · fp32(scale)[g(k), n]  (int4pack along N, int64 fp32 bits)."""
    roles = layer["tensors"]
    entry = roles["weight"]
    words = tensors[entry["name"]]
    k, n = entry["shape"][-2:]
    if entry["layout"] == "nz":
        words = nz_to_nd(words, k, n // 8)
    w = nibbles_of_words(words).double()  # [K, N]
    scale = fp32_of_int64_bits(tensors[roles["scale"]["name"]]).double()
    if scale.dim() == 1:
        scale = scale[None]
    g = k // scale.shape[0]
    return (w * scale.repeat_interleave(g, 0)).T


@pytest.fixture(scope="module")
def fixture_out(tmp_path_factory):
    return convert_to(tmp_path_factory.mktemp("w4a8"), FIXTURES / FIXTURE)


def test_fixture_decodes_to_tool_dequant_and_scale_bias_matches_modelslim(fixture_out):
    m = manifest(fixture_out)
    tensors = read_all(fixture_out)
    reference = load_reference(FIXTURE)
    infos, _ = read_header(FIXTURES / FIXTURE / "quant_model_weights.safetensors")
    assert sorted(m["layers"]) == sorted(name.removesuffix(".weight") for name in reference)
    for name, layer in m["layers"].items():
        assert layer["kernel"] == "npu_grouped_matmul" and layer["kernel_mode"] == "a8w4"
        assert layer["tensors"]["weight"]["dtype"] == "int32" and layer["tensors"]["scale"]["dtype"] == "int64"
        weight = decode(layer, tensors)
        assert torch.equal(weight, reference[f"{name}.weight"].double()), name
        # scale_bias = 8·Σ_k dequant, and for row-parallel layers msModelSlim's 16 K-chunk partial sums
        written = tensors[layer["tensors"]["scale_bias"]["name"]]
        assert torch.equal(written, (8 * weight.sum(1)).float()), name
        source = read_tensor(infos[f"{name}.scale_bias"])
        if name.endswith(("o_proj", "down_proj")):
            assert layer["parallel"] == "row" and layer["scale_bias"]["chunks"] == 16
            partials = tensors[layer["tensors"]["scale_bias_partials"]["name"]]
            assert torch.equal(partials, source), f"{name}: partials differ from msModelSlim's [N, 16]"
        else:
            assert layer["parallel"] == "column" and "scale_bias_partials" not in layer["tensors"]
            assert torch.equal(written, source[:, 0]), f"{name}: scale_bias differs from msModelSlim's"


def test_fixture_verifies(fixture_out):
    report = verify(fixture_out, VerifyOptions())
    assert report["ok"] and report["passed"] == 7, report["layers"]
    assert all(r["layout_exact"] and r["kernel"] == "npu_grouped_matmul" for r in report["layers"])


def test_nz_output_verifies(tmp_path):
    out = convert_to(tmp_path, FIXTURES / FIXTURE, nz=True)
    layers = manifest(out)["layers"]
    nz = {name for name, layer in layers.items() if layer["tensors"]["weight"]["layout"] == "nz"}
    assert nz == {name for name, layer in layers.items() if layer["spec"]["out_features"] % 64 == 0}
    assert all(layers[name]["tensors"]["weight"]["c0"] == 8 for name in nz)
    tensors = read_all(out)
    reference = load_reference(FIXTURE)
    for name in nz:
        assert torch.equal(decode(layers[name], tensors), reference[f"{name}.weight"].double())
    assert verify(out, VerifyOptions())["ok"]


def test_row_parallel_layer_serves_every_tp(fixture_out):
    layers = load_output(fixture_out, device="cpu")
    down = layers[DOWN]
    x = torch.randn(8, down.spec.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    outputs = {}
    for tp in (1, 2, 4, 8, 16):
        down.tp = tp
        outputs[tp] = down.forward(x).double()
    for tp in (2, 4, 8, 16):  # each rank quantizes its own slice: same result up to activation rounding
        rel = (outputs[tp] - outputs[1]).norm() / outputs[1].norm()
        assert rel < 2e-2, (tp, rel)


def test_unconverted_modelslim_w4a8_is_checked_on_the_a8w4_kernel():
    report = verify(FIXTURES / FIXTURE, VerifyOptions())
    assert report["ok"] and report["mode"] == "source"
    assert {r["kernel"] for r in report["layers"]} == {"npu_grouped_matmul"}


# ------------------------------------------------------------------------------ GPTQ source, per-group 256
def test_symmetric_gptq_group_256_gets_int8_activations(tmp_path):
    shapes = {"model.layers.0.mlp.down_proj": (64, 1024), "model.layers.0.mlp.up_proj": (128, 512)}
    reference = make_gptq_sym(tmp_path / "src", shapes, 256)
    out = convert_to(tmp_path, tmp_path / "src")
    m = manifest(out)
    tensors = read_all(out)
    for name, layer in m["layers"].items():
        assert layer["activation_added"] is True and layer["quant_group_size"] == 256
        assert layer["group_scale_rounding"] == "fp16"
        # fp16 source scales survive fp32 → fp16 → fp32 exactly, so the kernel scale is the source's
        assert torch.equal(decode(layer, tensors), reference[name]), name
        exact = tensors[layer["tensors"]["weight_scale"]["name"]]
        assert torch.equal(fp32_of_int64_bits(tensors[layer["tensors"]["scale"]["name"]]), exact.half().float())
    assert m["layers"]["model.layers.0.mlp.down_proj"]["verify_tp"] == 4  # K/4 = 256 = one group per rank
    report = verify(out, VerifyOptions())
    assert report["ok"] and all(r["layout_exact"] for r in report["layers"]), report["layers"]


def test_unsupported_sources_fail_before_writing(tmp_path):
    with pytest.raises(UnsupportedError, match="group size 32"):
        convert_to(tmp_path, FIXTURES / "gptq_v1_b4_g32_sym")
    with pytest.raises(UnsupportedError, match="symmetric"):
        convert_to(tmp_path, FIXTURES / "ct020_w4a16_g32_asym")
    assert not (tmp_path / "out").exists()


def test_lossy_group_scale_rounding_is_not_a_layout_error():
    """An fp32 per-group scale that fp16 cannot hold: the kernel gets the rounded one, the layout
    check reads the exact copy back; a corrupted int64 scale is read back as it is."""
    from npuconv.writers.npu_w4a8 import NpuW4A8Target

    spec = LinearSpec("m.o_proj", 16, 512, 4, 256, True, scale_dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    layer = QuantizedLinear(spec, torch.randint(0, 16, (16, 512), generator=gen).to(torch.uint8),
                            torch.rand(16, 2, generator=gen) * 0.01 + 1e-3)
    writer = NpuW4A8Target(WriterOptions())
    entries = writer.layer_manifest(spec)["tensors"]
    stored = writer.write_layer(layer)
    assert writer.warnings and "fp16 rounding" in writer.warnings[0]
    by_role = {role: stored[e["name"]] for role, e in entries.items()}
    assert torch.equal(writer.read_layer(spec, by_role).scale, layer.scale)
    by_role["scale"] = by_role["scale"] + 1  # one ulp off in the kernel's scale
    assert not torch.equal(writer.read_layer(spec, by_role).scale, layer.scale)


# ------------------------------------------------------------------------------ kernel emulation
def test_a8w4_split_equals_the_scaled_integer_matmul():
    gen = torch.Generator().manual_seed(5)
    m, k, n = 5, 512, 16
    x = torch.randint(-128, 128, (m, k), generator=gen).to(torch.int8)
    w = torch.randint(-8, 8, (k, n), generator=gen)
    s = torch.rand(2, n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    pts = torch.rand(m, generator=gen)
    y = emulated._a8w4_expert(x, emulated.int4pack(w.to(torch.int32)), s, bias, pts)
    sk = s.double().repeat_interleave(256, 0)
    expected = pts.double()[:, None] * (x.double() @ (w.double() * sk) - 8 * (w.double() * sk).sum(0) + bias.double())
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-4)


def test_default_target_for_w4a8_sources():
    act8 = ActivationQuant(INT, 8, True)
    assert native_target(LinearSpec("a.o_proj", 64, 128, 4, -1, True, activation=act8)).name == "npu-w4a8"
    # a group size the A8W4 kernel cannot take falls back to the weight-only kernel
    assert native_target(LinearSpec("a.o_proj", 64, 128, 4, 32, True, activation=act8)).name == "npu-int4"


# ------------------------------------------------------------------------------ planted bugs
def _partials(out):
    infos, _ = read_header(out / "model.safetensors")
    return read_tensor(infos[f"{DOWN}.scale_bias_partials"])


MUTATIONS = [
    ("scale_bias with the wrong sign", "scale_bias", lambda out: lambda t: -t, False),
    ("partial sums assigned to the wrong K chunks", "scale_bias_partials", lambda out: lambda t: torch.roll(t, 1, -1), False),
    ("full scale_bias holds only the TP=2 rank-0 share", "scale_bias",
     lambda out: lambda t: _partials(out)[:, :8].sum(-1), False),
    ("nibble pairing swapped (odd n in the low nibble)", "weight", lambda out: swap_nibbles, True),
    ("int64 scale shifted by one channel", "scale", lambda out: lambda t: torch.roll(t, 1, 0), True),
]


@pytest.mark.parametrize("case", MUTATIONS, ids=[c[0] for c in MUTATIONS])
def test_verify_catches_planted_bug(case, tmp_path):
    _, role, make, layout_visible = case
    out = convert_to(tmp_path, FIXTURES / FIXTURE)
    rewrite(out, role, make(out), DOWN)
    report = verify(out, VerifyOptions(skip_checksum=True))
    by_name = {r["name"]: r for r in report["layers"]}
    bad = by_name[DOWN]
    assert bad["status"] == "fail" and bad["rel_l2"] > bad["threshold"], bad
    assert bad["layout_exact"] is (not layout_visible)  # scale_bias is a kernel helper, not canonical
    assert all(r["status"] == "pass" for name, r in by_name.items() if name != DOWN)


def test_backend_is_the_emulation():
    assert get_backend("cpu").emulated


def test_expert_stack_runs_every_token_through_every_expert():
    from npuconv.model import dequantize
    from npuconv.runtime import run_kernel
    from npuconv.entries import from_storage
    from npuconv.writers.npu_w4a8 import NpuW4A8Target

    spec = LinearSpec("m.experts.down_proj", 16, 512, 4, 256, True, scale_dtype=torch.float16, num_experts=2)
    gen = torch.Generator().manual_seed(0)
    layer = QuantizedLinear(spec, torch.randint(0, 16, (2, 16, 512), generator=gen).to(torch.uint8),
                            (torch.rand(2, 16, 2, generator=gen) * 0.01 + 1e-3).half())
    writer = NpuW4A8Target(WriterOptions())
    entry = writer.layer_manifest(spec)
    stored = writer.write_layer(layer)
    tensors = {role: from_storage(stored[e["name"]], e) for role, e in entry["tensors"].items()}
    assert tuple(tensors["weight"].shape) == (2, 512, 2) and tuple(tensors["scale_bias_partials"].shape) == (2, 16, 16)
    x = torch.randn(4, 512, generator=gen).to(torch.bfloat16)
    y, x_effective = run_kernel(get_backend("cpu"), entry, spec, tensors, x)
    assert y.shape == (2, 8, 16) and x_effective.shape == (8, 512)  # TP=1 and TP=verify_tp stacked
    reference = torch.einsum("mk,enk->emn", x_effective.double(), dequantize(layer).double())
    assert ((y.double() - reference).norm() / reference.norm()).item() < 5e-3
    back = writer.read_layer(spec, tensors)
    assert torch.equal(back.qweight, layer.qweight) and torch.equal(back.effective_scale(), layer.effective_scale())
