"""``inspect --json`` on every real fixture: format, scheme, bits, group size, symmetry, act-order,
and the GPTQ checkpoint format detected from the zero points (expected values from the fixture
README, i.e. from how each tool was driven)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import ALL_FIXTURES, FIXTURES
from npuconv.cli import cli

# fixture → (format, {(scheme, bits, group_size, symmetric)}, act_order layers, gptq checkpoint_format)
EXPECTED = {
    "awq_gemm_g128": ("awq", {("w4a16", 4, 128, False)}, 0, None),
    "ct020_fp8_static": ("compressed-tensors", {("w8a8_fp8", 8, -1, True)}, 0, None),
    "ct020_mxfp8a16": ("compressed-tensors", {("w8a16_mxfp8", 8, 32, True)}, 0, None),
    "ct020_nvfp4a16": ("compressed-tensors", {("w4a16_nvfp4", 4, 16, True)}, 0, None),
    "ct020_w4a16_g32_asym": ("compressed-tensors", {("w4a16", 4, 32, False)}, 0, None),
    "ct020_w8a8_int": ("compressed-tensors", {("w8a8_dynamic", 8, -1, True)}, 0, None),
    "gptq_v1_b4_g32_sym": ("gptq", {("w4a16", 4, 32, True)}, 0, "gptq"),
    "gptq_v1_b4_g64_asym_descact": ("gptq", {("w4a16", 4, 64, False)}, 7, "gptq"),
    # K = 128 layers have a single group of 128: act-order cannot change anything there
    "gptq_v1_b8_g128_asym_descact": ("gptq", {("w8a16", 8, 128, False)}, 1, "gptq"),
    "gptq_v2_b3_g32_asym": ("gptq", {("w3a16", 3, 32, False)}, 0, "gptq_v2"),
    "gptq_v2_b4_g32_asym": ("gptq", {("w4a16", 4, 32, False)}, 0, "gptq_v2"),
    "ms_w4a8_dynamic": ("modelslim", {("w4a8_dynamic", 4, -1, True)}, 0, None),
    "ms_w8a16_per_group32_asym": ("modelslim", {("w8a16", 8, 32, False)}, 0, None),
    "ms_w8a8_mxfp8": ("modelslim", {("w8a8_mxfp8", 8, 32, True)}, 0, None),
    "ms_w8a8_static_fp16": ("modelslim", {("w8a8_static", 8, -1, True)}, 0, None),
    # AutoRound "asymmetric": unsigned codes 0..15 with offset 8 everywhere = symmetric in canonical form
    "ms_w4a4_dynamic_g32_asym_autoround": ("modelslim", {("w4a4_dynamic", 4, 32, True)}, 0, None),
    "ms_v0_w4a8_dynamic_g32": ("modelslim", {("w4a8_dynamic", 4, 32, True)}, 0, None),
    "ct020_mixed_attn_w8a8_mlp_w4a16_g32_asym": ("compressed-tensors", {("w8a8_dynamic", 8, -1, True), ("w4a16", 4, 32, False)}, 0, None),
    "ms_mixed_w8a8dyn_attn_w4a8dyn_mlp": ("modelslim", {("w8a8_dynamic", 8, -1, True), ("w4a8_dynamic", 4, -1, True)}, 0, None),
}


def inspect_json(path) -> dict:
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_every_fixture_is_covered():
    assert sorted(EXPECTED) == ALL_FIXTURES


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_inspect_json(fixture):
    fmt, schemes, act_order_layers, checkpoint_format = EXPECTED[fixture]
    report = inspect_json(FIXTURES / fixture)
    assert report["format"] == fmt
    layers = report["layers"]
    assert len(layers) == 7
    assert {(l["scheme"], l["bits"], l["group_size"], l["symmetric"]) for l in layers} == schemes
    assert sum(l["act_order"] for l in layers) == act_order_layers
    assert {l["name"].rsplit(".", 1)[-1] for l in layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert report.get("checkpoint_format") == checkpoint_format
    assert report["model_type"] == "llama" and report["num_hidden_layers"] == 1
    assert report["size_bytes"] > 0 and sum(report["schemes"].values()) == 7


def test_mislabelled_gptq_is_reported(tmp_path):
    """vllm issue 38966: a checkpoint labelled "gptq" that stores v2 zeros."""
    model = tmp_path / "m"
    shutil.copytree(FIXTURES / "gptq_v2_b4_g32_asym", model)
    for name in ("quantize_config.json", "config.json"):
        data = json.loads((model / name).read_text())
        target = data if name == "quantize_config.json" else data["quantization_config"]
        target["checkpoint_format"] = target["format"] = "gptq"
        (model / name).write_text(json.dumps(data))
    report = inspect_json(model)
    assert report["checkpoint_format"] == "gptq_v2"
    assert report["declared_checkpoint_format"] == "gptq"
    human = CliRunner().invoke(cli, ["inspect", str(model)])
    assert human.exit_code == 0
    assert "declares checkpoint_format='gptq'" in " ".join(human.output.split())


def test_inspect_human_output_and_layers_table():
    result = CliRunner().invoke(cli, ["inspect", str(FIXTURES / "gptq_v1_b4_g64_asym_descact"), "--layers"])
    assert result.exit_code == 0
    assert "format       gptq\n" in result.output and "gptq (gptq)" not in result.output and "w4a16" in result.output and "model.layers.0.mlp.down_proj" in result.output
    quiet = CliRunner().invoke(cli, ["inspect", str(FIXTURES / "ms_w8a8_mxfp8"), "-q"])
    assert quiet.output.strip() == "modelslim"


def test_inspect_float_and_npuconv_outputs(tmp_path):
    from npuconv.convert import ConvertOptions, convert

    convert(FIXTURES / "awq_gemm_g128", tmp_path / "npu", ConvertOptions("npu-int4"))
    convert(FIXTURES / "awq_gemm_g128", tmp_path / "float", ConvertOptions("float"))
    npu = inspect_json(tmp_path / "npu")
    assert npu["format"] == "npuconv" and npu["target"] == "npu-int4" and npu["source_format"] == "awq"
    assert len(npu["layers"]) == 7
    flt = inspect_json(tmp_path / "float")
    assert flt["format"] == "float" and flt["layers"] == []
