"""Offline MX quantization of float checkpoints (``--to npu-mxfp8|npu-mxfp4`` on a bf16 model).

The written bytes, decoded from the spec, must equal the OCP MX rule computed in the test
(tests/spec_decoders.py) — the rule ``npu_dynamic_mx_quant`` applies online; the manifest records
the quantization error, which a spec-derived decoder recomputes; verify passes against the
MX-dequantized weights and catches a planted E8M0 bug.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES
from scheme_helpers import make_float_model, manifest, nibbles_of_bytes, read_all
from spec_decoders import ocp_mx_reference

from npuconv.io.checkpoint import Checkpoint
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.readers import open_reader
from npuconv.registry import get_target
from npuconv.verify import VerifyOptions, verify
from test_verify import rewrite

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)


def decode_mx(layer: dict, tensors: dict) -> torch.Tensor:
    """vllm-ascend MX layout → float64 ``[N, K]``: weight ``[K, N]`` (FP4: bytes ``[K, N/2]``, even n low),
    scale ``[ceil(Kb/2), N, 2]`` with K-block j of channel n at ``[j//2, n, j%2]``, value 2**(byte−127)."""
    roles = layer["tensors"]
    k, n = roles["weight"]["shape"]
    w = tensors[roles["weight"]["name"]]
    values = E2M1[nibbles_of_bytes(w)] if roles["weight"]["packing"] == "fp4x2" else w.double()
    scale = tensors[roles["weight_scale"]["name"]].long()
    blocks = scale.permute(1, 0, 2).reshape(n, -1)[:, : (k + 31) // 32]
    factor = torch.pow(2.0, (blocks - 127).double()).repeat_interleave(32, dim=1)[:, :k]
    return values.T * factor


@pytest.fixture(scope="module")
def float_base(tmp_path_factory):
    """A real float Llama with the GPTQ fixture's shapes, made by npuconv itself."""
    out = tmp_path_factory.mktemp("base") / "llama-bf16"
    result = CliRunner().invoke(cli, ["convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(out), "--to", "float",
                                      "--dtype", "bfloat16", "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_inspect_of_a_float_model_still_shows_no_quantized_layer(float_base):
    reader = open_reader(Checkpoint(float_base))
    assert reader.format == "float" and reader.linear_specs() == []
    assert get_target("npu-int4").offline_recipe is None  # a target without an offline recipe asks nothing
    reader.quantize_float_linears(get_target("npu-mxfp8").offline_recipe)
    assert len(reader.linear_specs()) == 7


@pytest.mark.parametrize("target,element", [("npu-mxfp8", "fp8"), ("npu-mxfp4", "fp4")])
def test_float_llama_to_mx(target, element, float_base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(float_base, out, ConvertOptions(target))
    m = manifest(out)
    tensors = read_all(out)
    source = read_all(float_base)
    assert m["source"]["offline_quantization"] == target and len(m["layers"]) == 7
    for name, layer in m["layers"].items():
        weight = source[f"{name}.weight"]
        # the stored weight, decoded from the spec, is the OCP MX rule applied to the float weight
        decoded = decode_mx(layer, tensors)
        assert torch.equal(decoded, ocp_mx_reference(weight.float(), element)), name
        # the recorded error is the rel L2 of the stored weight against the float one
        expected = ((decoded - weight.double()).norm() / weight.double().norm()).item()
        block = layer["offline_quantization"]
        assert block["source_dtype"] == "bfloat16" and block["rel_l2"] == pytest.approx(expected, rel=1e-9)
        assert 0 < block["rel_l2"] < (0.05 if target == "npu-mxfp8" else 0.2)
        assert layer["spec"]["source_scheme"].startswith("float:bfloat16:offline-")
    report = verify(out, VerifyOptions())
    assert report["ok"] and all(r["layout_exact"] for r in report["layers"]), report["layers"]


def test_hand_made_bf16_checkpoint(tmp_path, monkeypatch):
    tensors = make_float_model(tmp_path / "src")
    for target, quantized in (("npu-mxfp8", {"q_proj", "dense", "odd_proj"}), ("npu-mxfp4", {"q_proj", "dense"})):
        out = tmp_path / target
        report = convert(tmp_path / "src", out, ConvertOptions(target))
        m = manifest(out)
        assert {name.rsplit(".", 1)[-1] for name in m["layers"]} == quantized
        if target == "npu-mxfp4":
            assert any("odd_proj: kept float" in w for w in report["warnings"])
        written = read_all(out)
        # non-linears (and linears the target cannot take) pass through unchanged
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight"):
            assert torch.equal(written[name], tensors[name])
        if "odd_proj" not in quantized:
            assert torch.equal(written["model.layers.0.mlp.odd_proj.weight"], tensors["model.layers.0.mlp.odd_proj.weight"])
        q = m["layers"]["model.layers.0.self_attn.q_proj"]
        assert torch.equal(written[q["tensors"]["bias"]["name"]], tensors["model.layers.0.self_attn.q_proj.bias"].float())
        dense = m["layers"]["model.layers.0.mlp.dense"]
        assert dense["tensors"]["weight_scale"]["shape"] == [2, 48, 2]  # Kb = ceil(80/32) = 3, padded to 4
        decoded = decode_mx(dense, written)
        assert decoded.shape == (48, 80)
        report = verify(out, VerifyOptions())
        assert report["ok"] and report["passed"] == len(quantized), report["layers"]


def test_planted_e8m0_bug_is_caught(float_base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(float_base, out, ConvertOptions("npu-mxfp8"))
    layer = "model.layers.0.mlp.down_proj"
    rewrite(out, "weight_scale", lambda t: t + 1, layer)
    report = verify(out, VerifyOptions(skip_checksum=True))
    bad = next(r for r in report["layers"] if r["name"] == layer)
    assert bad["status"] == "fail" and bad["layout_exact"] is False and bad["rel_l2"] > bad["threshold"]
    assert report["failed"] == 1
