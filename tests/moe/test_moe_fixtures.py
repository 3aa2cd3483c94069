"""MoE checkpoints written by compressed-tensors 0.20.0 (tests/fixtures/ct020_moe_*, recipe
tests/fixtures/recipes/make_moe.py): expert stacks through inspect, every target and verify,
against the tool's own per-expert dequantization."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, MOE_FIXTURES, load_reference
from test_verify import assert_only_layer_fails, rewrite

from npuconv.io.checkpoint import Checkpoint
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.model import dequantize
from npuconv.readers import open_reader
from npuconv.readers.modelslim import DESCRIPTION
from npuconv.io.safetensors_io import read_header, read_tensor
from npuconv.verify import VerifyOptions, verify
from npuconv.writers import WriterOptions

QWEN = "ct020_moe_qwen2_w4a16_g32_asym"  # Qwen2-MoE, 4 experts (+ shared expert), W4A16 g32 asym
MIXTRAL = "ct020_moe_mixtral_w8a8_int"  # Mixtral, 4 experts, W8A8 int8 channel + dynamic token
QWEN_EXPERTS = "model.layers.0.mlp.experts"
MIXTRAL_EXPERTS = "model.layers.0.block_sparse_moe.experts"
# fixture → {stacked layer: [E, N, K]}
STACKS = {
    QWEN: {f"{QWEN_EXPERTS}.gate_proj": [4, 64, 128], f"{QWEN_EXPERTS}.up_proj": [4, 64, 128],
           f"{QWEN_EXPERTS}.down_proj": [4, 128, 64]},
    MIXTRAL: {f"{MIXTRAL_EXPERTS}.w1": [4, 64, 128], f"{MIXTRAL_EXPERTS}.w3": [4, 64, 128],
              f"{MIXTRAL_EXPERTS}.w2": [4, 128, 64]},
}


def read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        infos, _ = read_header(path)
        out.update({name: read_tensor(info) for name, info in infos.items()})
    return out


def per_expert(stacked: str, e: int) -> str:
    prefix, proj = stacked.rsplit(".", 1)
    return f"{prefix}.{e}.{proj}"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Each (fixture, target) converted once."""
    root = tmp_path_factory.mktemp("moe")
    done = {}

    def get(fixture: str, target: str, **writer_options):
        key = (fixture, target, tuple(sorted(writer_options.items())))
        if key not in done:
            out = root / f"{fixture}-{target}-{len(done)}"
            convert(FIXTURES / fixture, out, ConvertOptions(target, WriterOptions(**writer_options)))
            done[key] = out
        return done[key]

    return get


def test_moe_fixtures_present():
    assert sorted(STACKS) == MOE_FIXTURES
    for fixture in MOE_FIXTURES:  # small, and their reference is per expert, as the tool names the modules
        assert sum(p.stat().st_size for p in (FIXTURES / fixture).iterdir()) < 1_000_000
        assert any(".experts.3." in key for key in load_reference(fixture))


# ------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("fixture", MOE_FIXTURES)
def test_inspect_shows_stacked_layers(fixture):
    result = CliRunner().invoke(cli, ["inspect", str(FIXTURES / fixture), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    layers = {l["name"]: l for l in report["layers"]}
    assert report["moe_experts"] == 4
    assert not any(".experts.0." in name for name in layers)
    for name, shape in STACKS[fixture].items():
        assert layers[name]["experts"] == 4 and layers[name]["shape"] == shape
    assert all(l["experts"] is None for name, l in layers.items() if name not in STACKS[fixture])
    assert len(layers) == {QWEN: 10, MIXTRAL: 7}[fixture]  # attention 4 (+ shared expert 3) + 3 stacks
    # the stack owns every expert tensor (bytes of 4 experts), nothing of it passes through
    reader = open_reader(Checkpoint(FIXTURES / fixture))
    passthrough = reader.passthrough_names()
    assert not any(".experts." in name for name in passthrough)
    human = CliRunner().invoke(cli, ["inspect", str(FIXTURES / fixture), "--layers"], catch_exceptions=False,
                               env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "experts" in human.output
    assert next(iter(STACKS[fixture])) in human.output


# --------------------------------------------------------------------------------------- float
@pytest.mark.parametrize("fixture", MOE_FIXTURES)
def test_float_target_is_the_tool_reference_per_expert(fixture, outputs):
    out = outputs(fixture, "float", dtype=torch.float32)
    written = read_all(out)
    reference = load_reference(fixture)
    for name, expected in reference.items():
        assert written[name].dtype == torch.float32 and torch.equal(written[name], expected), name
    # per-expert names (what transformers loads), never the stacked ones
    for stacked in STACKS[fixture]:
        assert f"{stacked}.weight" not in written
        assert all(per_expert(stacked, e) + ".weight" in written for e in range(4))
    source = read_all(FIXTURES / fixture)
    float_names = {n for n, t in source.items() if t.is_floating_point() and not n.endswith(("_scale", "zero_point"))}
    assert float_names <= set(written) and all(torch.equal(written[n], source[n]) for n in float_names)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


# -------------------------------------------------------------------------------- NPU targets
@pytest.mark.parametrize("fixture,target", [(QWEN, "npu-int4"), (MIXTRAL, "npu-w8a8"), (MIXTRAL, "npu-int8")])
def test_npu_targets_decode_back_exactly_and_verify(fixture, target, outputs):
    out = outputs(fixture, target)
    manifest = json.loads((out / "npuconv.json").read_text())
    reference = load_reference(fixture)
    output = open_reader(Checkpoint(out))
    specs = {s.name: s for s in output.linear_specs()}
    for name, (e, n, k) in [(name, shape) for name, shape in STACKS[fixture].items()]:
        entry = manifest["layers"][name]
        assert entry["spec"]["num_experts"] == e
        weight = entry["tensors"]["weight"]
        assert weight["shape"] == [e, k, n]
        if target == "npu-int4":
            groups = k // 32
            assert weight["layout"] == "nd" and weight["storage_shape"] == [e, k, n // 8]
            assert entry["tensors"]["antiquant_scale"]["shape"] == [e, groups, n]
            assert entry["tensors"]["antiquant_offset"]["shape"] == [e, groups, n]
        elif target == "npu-w8a8":
            assert weight["layout"] == "nz" and weight["storage_shape"] == [e, n // 32, k // 16, 16, 32]
            assert entry["tensors"]["weight_scale"]["shape"] == [e, n]
        else:
            assert weight["layout"] == "nd" and entry["tensors"]["antiquant_scale"]["shape"] == [e, n]
        # the stored tensors decode to the tool's dequantization of every expert, bit for bit
        weights = dequantize(output.load(specs[name]))
        assert weights.shape == (e, n, k)
        for i in range(e):
            assert torch.equal(weights[i], reference[per_expert(name, i) + ".weight"]), (name, i)
    report = verify(out, VerifyOptions())
    assert report["ok"], [r for r in report["layers"] if r["status"] != "pass"]
    results = {r["name"]: r for r in report["layers"]}
    assert set(STACKS[fixture]) <= set(results)
    assert all(results[name]["layout_exact"] and results[name]["status"] == "pass" for name in STACKS[fixture])


@pytest.mark.parametrize("fixture", MOE_FIXTURES)
def test_modelslim_target_stores_experts_one_by_one(fixture, outputs):
    out = outputs(fixture, "modelslim")
    description = json.loads((out / DESCRIPTION).read_text())
    for stacked in STACKS[fixture]:
        assert f"{stacked}.weight" not in description
        assert all(f"{per_expert(stacked, e)}.weight" in description for e in range(4))
    assert {description[f"{per_expert(s, 0)}.weight"] for s in STACKS[fixture]} == {
        {QWEN: "W4A16", MIXTRAL: "W8A8_DYNAMIC"}[fixture]}
    back = {s.name: s for s in open_reader(Checkpoint(out)).linear_specs()}  # read back stacked again
    assert {name: back[name].num_experts for name in STACKS[fixture]} == dict.fromkeys(STACKS[fixture], 4)
    report = verify(out, VerifyOptions())
    assert report["ok"] and report["mode"] == "paired"


# ----------------------------------------------------------------------------------- mutations
def swap_experts(t: torch.Tensor) -> torch.Tensor:
    return t[[1, 0, 2, 3]].contiguous()


@pytest.mark.parametrize("fixture,target,layer,role", [
    (QWEN, "npu-int4", f"{QWEN_EXPERTS}.down_proj", "antiquant_scale"),
    (MIXTRAL, "npu-w8a8", f"{MIXTRAL_EXPERTS}.w1", "weight_scale"),
])
def test_swapped_expert_scales_fail_verify(fixture, target, layer, role, tmp_path):
    out = tmp_path / "out"
    convert(FIXTURES / fixture, out, ConvertOptions(target))
    rewrite(out, role, swap_experts, layer=layer)
    report = verify(out, VerifyOptions(skip_checksum=True))
    assert_only_layer_fails(report, layer)
