"""``--to npu`` (convert's default): each layer to its natural NPU target, one output, verified.

The mixed fixture is msModelSlim's own common recipe (W8A8_DYNAMIC attention + W4A8_DYNAMIC MLP,
``tests/fixtures/recipes/make_modelslim_extra.py``); its reference is msModelSlim's dequantization.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import ALL_FIXTURES, FIXTURES, MOE_FIXTURES, load_reference, open_fixture
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import UnsupportedError
from npuconv.model import FP4_E2M1, INT, SCALE_E8M0, ActivationQuant, LinearSpec, dequantize
from npuconv.readers import open_reader
from npuconv.io.checkpoint import Checkpoint
from npuconv.registry import get_target, layer_target
from npuconv.runtime import load_output
from npuconv.io.safetensors_io import read_header, read_tensor, save_file
from npuconv.verify import VerifyOptions, verify
from npuconv.writers import WriterOptions

MIXED = "ms_mixed_w8a8dyn_attn_w4a8dyn_mlp"
CT_MIXED = "ct020_mixed_attn_w8a8_mlp_w4a16_g32_asym"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# fixture → the natural target of every layer (one target: uniform; a dict: by module-name fragment)
NATURAL = {
    "awq_gemm_g128": "npu-int4",  # 4-bit weight-only
    "ct020_w4a16_g32_asym": "npu-int4",
    "gptq_v1_b4_g32_sym": "npu-int4",
    "gptq_v1_b4_g64_asym_descact": "npu-int4",
    "gptq_v2_b3_g32_asym": "npu-int4",
    "gptq_v2_b4_g32_asym": "npu-int4",
    "gptq_v1_b8_g128_asym_descact": "npu-int8",  # 8-bit weight-only
    "ms_w8a16_per_group32_asym": "npu-int8",
    "ct020_w8a8_int": "npu-w8a8",  # W8A8 dynamic
    "ms_w8a8_static_fp16": "npu-w8a8",  # W8A8 static
    "ms_w4a8_dynamic": "npu-w4a8",  # W4A8 dynamic per-channel
    "ct020_mxfp8a16": "npu-mxfp8",  # MX
    "ms_w8a8_mxfp8": "npu-mxfp8",
    # activation-quantized, but no such kernel takes group 32: the weight-only kernel of their bits
    "ms_w4a4_dynamic_g32_asym_autoround": "npu-int4",
    "ms_v0_w4a8_dynamic_g32": "npu-int4",
    MIXED: {".self_attn.": "npu-w8a8", ".mlp.": "npu-w4a8"},
    CT_MIXED: {".self_attn.": "npu-w8a8", ".mlp.": "npu-int4"},  # llm-compressor-style groups
    "ct020_nvfp4a16": None,  # no Ascend kernel
    "ct020_fp8_static": None,
    "ct020_moe_mixtral_w8a8_int": "npu-w8a8",
    "ct020_moe_qwen2_w4a16_g32_asym": "npu-int4",
}


def natural(fixture: str, layer: str) -> str | None:
    expected = NATURAL[fixture]
    return next(t for fragment, t in expected.items() if fragment in layer) if isinstance(expected, dict) else expected


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        infos, _ = read_header(path)
        out.update({name: read_tensor(info) for name, info in infos.items()})
    return out


@pytest.fixture(scope="module")
def mixed_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("npu") / "mixed-npu"
    result = run("convert", FIXTURES / MIXED, out)  # no --to: npu is the default
    assert result.exit_code == 0, result.output
    assert "npu: 4 npu-w8a8, 3 npu-w4a8" in " ".join(result.output.split())
    return out


# ------------------------------------------------------------------------------------ the choice
def test_every_fixture_has_an_expected_choice():
    assert sorted(NATURAL) == sorted(ALL_FIXTURES + MOE_FIXTURES)


@pytest.mark.parametrize("fixture", sorted(NATURAL))
def test_natural_target_per_layer(fixture):
    target = get_target("npu")
    for spec in open_fixture(fixture).linear_specs():
        chosen = target.choose(spec)
        assert (chosen.name if chosen else None) == natural(fixture, spec.name), spec.name


def test_natural_target_of_synthetic_schemes():
    """Schemes no fixture has: W4A4 per-channel → npu-w4a4, MXFP4 → npu-mxfp4, and (no native kernel
    target serves it) a dual-level MXFP4 layer of an earlier offline quantization → npu-mxfp4-dual."""
    target = get_target("npu")
    w4a4 = LinearSpec("l", 64, 128, 4, -1, True, activation=ActivationQuant(INT, 4, dynamic=True))
    assert target.choose(w4a4).name == "npu-w4a4"
    mxfp4 = LinearSpec("l", 64, 128, 4, 32, True, weight_format=FP4_E2M1, scale_format=SCALE_E8M0, scale_dtype=torch.uint8)
    assert target.choose(mxfp4).name == "npu-mxfp4"
    dual = LinearSpec("l", 64, 1024, 4, 32, True, weight_format=FP4_E2M1, scale_dtype=torch.float32,
                      source_scheme="float:bfloat16:offline-mxfp4-dual")
    assert dual.scheme == "w4a16_mxfp4_dual" and target.choose(dual).name == "npu-mxfp4-dual"


# ------------------------------------------------------------------------------------ done when: convert MIXED OUT, verify
def test_mixed_output_records_each_layers_target(mixed_out):
    manifest = json.loads((mixed_out / "npuconv.json").read_text())
    config = json.loads((mixed_out / "config.json").read_text())
    assert manifest["target"] == "npu" and config["quantization_config"]["target"] == "npu"
    targets = {name.rsplit(".", 1)[-1]: entry["target"] for name, entry in manifest["layers"].items()}
    assert targets == {**dict.fromkeys(ATTENTION, "npu-w8a8"), **dict.fromkeys(MLP, "npu-w4a8")}
    kernels = {entry["kernel"] for entry in manifest["layers"].values()}
    assert kernels == {"npu_quant_matmul", "npu_grouped_matmul"}
    assert not (mixed_out / "quant_model_description.json").exists()  # an npuconv output, not msModelSlim's


def test_mixed_output_verifies(mixed_out):
    result = run("verify", mixed_out)
    assert result.exit_code == 0, result.output
    assert "PASS 7/7 layers" in result.output
    report = verify(mixed_out, VerifyOptions())
    assert report["ok"] and report["mode"] == "converted"
    assert all(layer["layout_exact"] for layer in report["layers"])
    assert {layer["kernel"] for layer in report["layers"]} == {"npu_quant_matmul", "npu_grouped_matmul"}


def test_mixed_output_decodes_to_msmodelslims_dequantization(mixed_out):
    """Each layer read back by its own target equals msModelSlim's reference, bit for bit."""
    reader = open_reader(Checkpoint(mixed_out))
    reference = load_reference(MIXED)
    for spec in reader.linear_specs():
        assert torch.equal(dequantize(reader.load(spec)), reference[f"{spec.name}.weight"]), spec.name


def test_runtime_loader_runs_a_mixed_output(mixed_out):
    layers = load_output(mixed_out, device="cpu")
    reference = load_reference(MIXED)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for name, layer in layers.items():
        if layer.spec.in_features != 128:
            continue
        y = layer.forward(x).double()
        y_ref = x.double() @ reference[f"{name}.weight"].double().T
        rel = ((y[: y_ref.shape[0]] - y_ref).norm() / y_ref.norm()).item()
        assert rel < 0.05, (name, rel)  # activation quantization (int8 per token) + bf16 output


def test_verify_catches_a_broken_layer_of_a_mixed_output(mixed_out, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(mixed_out, out)
    manifest = json.loads((out / "npuconv.json").read_text())
    name = manifest["layers"]["model.layers.0.mlp.up_proj"]["tensors"]["scale"]["name"]
    path = out / "model.safetensors"
    infos, metadata = read_header(path)
    tensors = {key: read_tensor(info) for key, info in infos.items()}
    tensors[name] = tensors[name] * 2
    save_file(tensors, path, metadata)
    report = verify(out, VerifyOptions(skip_checksum=True))
    failed = {r["name"] for r in report["layers"] if r["status"] == "fail"}
    assert failed == {"model.layers.0.mlp.up_proj"} and report["exit_code"] == 1


def test_plan_prints_the_per_layer_choice(tmp_path):
    result = run("convert", FIXTURES / MIXED, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if "model.layers.0." in line]
    assert len(rows) == 7
    assert all(("npu-w8a8" in row) == ("self_attn" in row) and ("npu-w4a8" in row) == (".mlp." in row) for row in rows)
    plan = json.loads(run("convert", FIXTURES / MIXED, tmp_path / "out", "--dry-run", "--json").output)["plan"]
    assert plan["target"] == "npu" and plan["layer_targets"] == {"npu-w8a8": 4, "npu-w4a8": 3}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fixture,target", [("gptq_v1_b4_g32_sym", "npu-int4"), ("ms_w4a8_dynamic", "npu-w4a8"),
                                            ("ct020_w8a8_int", "npu-w8a8"), ("ms_w8a8_mxfp8", "npu-mxfp8")])
def test_uniform_model_is_byte_identical_to_its_single_target(fixture, target, tmp_path):
    convert(FIXTURES / fixture, tmp_path / "npu", ConvertOptions("npu"))
    convert(FIXTURES / fixture, tmp_path / "single", ConvertOptions(target))
    assert (tmp_path / "npu" / "model.safetensors").read_bytes() == (tmp_path / "single" / "model.safetensors").read_bytes()
    npu, single = (json.loads((tmp_path / d / "npuconv.json").read_text()) for d in ("npu", "single"))
    assert npu["layers"] == single["layers"] and npu["target"] == "npu" and single["target"] == target


def test_float_model_is_written_as_npu_float_writes_it(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "schemes"))
    from scheme_helpers import make_float_model

    make_float_model(tmp_path / "float", seed=0)
    for target in ("npu", "npu-float"):
        convert(tmp_path / "float", tmp_path / target, ConvertOptions(target, WriterOptions(nz=True)))
    assert read_all(tmp_path / "npu").keys() == read_all(tmp_path / "npu-float").keys()
    for name, tensor in read_all(tmp_path / "npu-float").items():
        assert torch.equal(read_all(tmp_path / "npu")[name], tensor), name
    assert (tmp_path / "npu" / "npuconv_nz.json").read_text() == (tmp_path / "npu-float" / "npuconv_nz.json").read_text()


def test_layer_target_of_a_mixed_manifest(mixed_out):
    manifest = json.loads((mixed_out / "npuconv.json").read_text())
    assert layer_target(manifest, manifest["layers"]["model.layers.0.mlp.gate_proj"]).name == "npu-w4a8"
    assert layer_target(manifest, manifest["layers"]["model.layers.0.self_attn.q_proj"]).name == "npu-w8a8"


# ------------------------------------------------------------------------------------ a target that does not fit
def test_refusal_lists_every_offending_layer_and_the_targets_that_fit(tmp_path):
    with pytest.raises(UnsupportedError) as error:
        convert(FIXTURES / MIXED, tmp_path / "out", ConvertOptions("npu-w8a8"))
    message = str(error.value)
    assert message.startswith("3 of 7 quantized layers cannot be written as npu-w8a8 — w4a8_dynamic (needs 8-bit integer weights): 3 layers")
    assert all(f"model.layers.0.mlp.{p}" in message for p in MLP)
    assert message.endswith("Targets that take every layer: npu, float, modelslim")
    assert not (tmp_path / "out").exists()


def test_refusal_groups_by_scheme(tmp_path):
    with pytest.raises(UnsupportedError) as error:
        convert(FIXTURES / MIXED, tmp_path / "out", ConvertOptions("npu-mxfp8"))
    message = str(error.value)
    assert message.startswith("7 of 7 quantized layers cannot be written as npu-mxfp8 — ")
    attention, mlp = message.index("w8a8_dynamic ("), message.index("w4a8_dynamic (")
    assert all(message.index(f"self_attn.{p}") > attention for p in ATTENTION)
    assert all(message.index(f"mlp.{p}") > mlp for p in MLP)


def test_npu_refuses_schemes_without_a_kernel(tmp_path):
    result = run("convert", FIXTURES / "ct020_nvfp4a16", tmp_path / "out")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "7 of 7 quantized layers cannot be written as npu — w4a16_nvfp4 (no Ascend NPU kernel takes this scheme)" in text
    assert text.endswith("Targets that take every layer: float")


def test_a_dropped_activation_quantization_is_warned(tmp_path):
    result = run("convert", FIXTURES / "ms_w4a4_dynamic_g32_asym_autoround", tmp_path / "out")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "7 w4a4_dynamic layer(s) written for npu-int4, a weight-only kernel" in text
    assert "npu-w4a4: npu_quant_matmul int4 × int4 takes per-channel weight scales only" in text
    assert run("verify", tmp_path / "out", "-q").exit_code == 0


def test_convert_defaults_to_npu():
    convert_command = cli.commands["convert"]
    to = next(p for p in convert_command.params if p.name == "target")
    assert to.default == "npu" and not to.required
    assert "Default npu" in run("convert", "--help").output


def test_zoo_entry_without_target_is_npu(tmp_path):
    (tmp_path / "zoo.toml").write_text(f'[[model]]\nsource = "{FIXTURES / MIXED}"\noutput = "out"\nverify = true\n')
    result = run("zoo", tmp_path / "zoo.toml", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert report["entries"][0]["target"] == "npu" and report["entries"][0]["verify"]["passed"] == 7


def test_compressed_tensors_mixed_precision_converts_and_verifies(tmp_path):
    """CT's mixed-precision format (W8A8 attention group + W4A16 g32 MLP group), written by CT 0.20.0."""
    out = tmp_path / "out"
    result = run("convert", FIXTURES / CT_MIXED, out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "npuconv.json").read_text())
    assert {name: entry["target"] for name, entry in manifest["layers"].items()} == {
        name: natural(CT_MIXED, name) for name in manifest["layers"]
    }
    result = run("verify", out)
    assert result.exit_code == 0 and "PASS 7/7 layers" in result.output
    reader = open_reader(Checkpoint(out))
    reference = load_reference(CT_MIXED)
    for spec in reader.linear_specs():
        assert torch.equal(dequantize(reader.load(spec)), reference[f"{spec.name}.weight"]), spec.name
