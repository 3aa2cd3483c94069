"""``--to npu-w4a4``: int4 weights × int4 dynamic activations for ``npu_quant_matmul``."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, load_reference
from scheme_helpers import make_gptq_sym, manifest, nibbles_of_words, read_all

from npuconv.convert import ConvertOptions, convert
from npuconv.errors import UnsupportedError
from npuconv.kernels import emulated, get_backend
from npuconv.model import INT, ActivationQuant, LinearSpec
from npuconv.runtime import load_output
from npuconv.registry import native_target
from npuconv.verify import VerifyOptions, verify
from test_verify import rewrite, swap_nibbles

FIXTURE = "ms_w4a8_dynamic"  # symmetric per-channel int4: the user asks for int4 activations instead of int8
DOWN = "model.layers.0.mlp.down_proj"


def convert_to(tmp_path, source):
    out = tmp_path / "out"
    convert(source, out, ConvertOptions("npu-w4a4"))
    return out


@pytest.fixture(scope="module")
def fixture_out(tmp_path_factory):
    return convert_to(tmp_path_factory.mktemp("w4a4"), FIXTURES / FIXTURE)


def test_fixture_decodes_to_tool_dequant(fixture_out):
    m = manifest(fixture_out)
    tensors = read_all(fixture_out)
    reference = load_reference(FIXTURE)
    for name, layer in m["layers"].items():
        roles = layer["tensors"]
        assert layer["int4_layout"] == "sglang" and layer["activation_changed"] and roles["weight"]["layout"] == "nd"
        k, n = roles["weight"]["shape"]
        words = tensors[roles["weight"]["name"]]
        assert words.dtype == torch.int32 and tuple(words.shape) == (k, n // 8)
        weight = (nibbles_of_words(words).double() * tensors[roles["weight_scale"]["name"]].double()).T
        assert torch.equal(weight, reference[f"{name}.weight"].double()), name


def test_fixture_verifies_against_its_own_quantized_activations(fixture_out):
    report = verify(fixture_out, VerifyOptions())
    assert report["ok"] and report["passed"] == 7
    assert all(r["layout_exact"] and r["rel_l2"] < 5e-3 for r in report["layers"])
    # the activations the reference uses are the backend's own int4 quantization of x
    layer = load_output(fixture_out, device="cpu")[DOWN]
    x = torch.randn(4, layer.spec.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    from npuconv.runtime import run_kernel

    _, x_effective = run_kernel(layer.backend, layer.entry, layer.spec, layer.tensors, x)
    x_q, scale = emulated.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    values = nibbles_of_words(x_q).double()
    assert values.abs().max() <= 7
    assert torch.equal(x_effective, values * scale.double()[:, None])


def test_dynamic_quant_to_int4_rounds_half_to_even():
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.49, -7.0]])
    y, scale = emulated.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    assert nibbles_of_words(y).tolist() == [[7, 0, 2, 2, -2, 0, 3, -7]]
    assert scale.item() == torch.tensor(7.0) * torch.tensor(1 / 7, dtype=torch.float32)


def test_int4_by_int4_quant_matmul_is_the_scaled_integer_product():
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(-8, 8, (3, 64), generator=gen, dtype=torch.int32)
    b = torch.randint(-8, 8, (64, 16), generator=gen, dtype=torch.int32)
    s, pts = torch.rand(16, generator=gen), torch.rand(3, generator=gen)
    y = emulated.npu_quant_matmul(emulated.int4pack(a), emulated.int4pack(b), s, pertoken_scale=pts, output_dtype=torch.float32)
    expected = (a.double() @ b.double()) * s.double() * pts.double()[:, None]
    assert torch.allclose(y.double(), expected, rtol=1e-6)


def test_per_channel_gptq_gets_int4_activations(tmp_path):
    reference = make_gptq_sym(tmp_path / "src", {"model.layers.0.mlp.up_proj": (64, 128)}, -1)
    out = convert_to(tmp_path, tmp_path / "src")
    layer = manifest(out)["layers"]["model.layers.0.mlp.up_proj"]
    assert layer["activation_added"] and not layer["activation_changed"]
    tensors = read_all(out)
    weight = (nibbles_of_words(tensors[layer["tensors"]["weight"]["name"]]).double()
              * tensors[layer["tensors"]["weight_scale"]["name"]].double()).T
    assert torch.equal(weight, reference["model.layers.0.mlp.up_proj"])
    assert verify(out, VerifyOptions())["ok"]


@pytest.mark.parametrize("fixture,message", [("gptq_v1_b4_g32_sym", "per-channel"), ("ct020_w4a16_g32_asym", "symmetric")])
def test_unsupported_sources_fail_before_writing(fixture, message, tmp_path):
    with pytest.raises(UnsupportedError, match=message):
        convert_to(tmp_path, FIXTURES / fixture)
    assert not (tmp_path / "out").exists()


def test_default_target_for_w4a4_sources():
    act4 = ActivationQuant(INT, 4, True)
    assert native_target(LinearSpec("a.o_proj", 64, 128, 4, -1, True, activation=act4)).name == "npu-w4a4"
    assert native_target(LinearSpec("a.o_proj", 64, 128, 4, 32, False, activation=act4)).name == "npu-int4"


@pytest.mark.parametrize("role,mutate", [("weight", swap_nibbles), ("weight_scale", lambda t: torch.roll(t, 1, 0))],
                         ids=["nibble order swapped", "weight scale shifted by one channel"])
def test_verify_catches_planted_bug(role, mutate, tmp_path):
    out = convert_to(tmp_path, FIXTURES / FIXTURE)
    rewrite(out, role, mutate, DOWN)
    report = verify(out, VerifyOptions(skip_checksum=True))
    by_name = {r["name"]: r for r in report["layers"]}
    bad = by_name[DOWN]
    assert bad["status"] == "fail" and bad["layout_exact"] is False and bad["rel_l2"] > bad["threshold"]
    assert all(r["status"] == "pass" for name, r in by_name.items() if name != DOWN)
    assert get_backend("cpu").emulated
