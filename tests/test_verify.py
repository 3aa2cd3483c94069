"""``verify`` passes every clean conversion and fails on each planted layout / convention bug.

Each mutation test converts a real fixture, rewrites one tensor of one layer in the output the way
a known bug would (sglang's ``z - 8`` offset, swapped nibbles, wrong NZ C0, …), and asserts that
verify reports exactly that layer as failing — by the layout check *and* by the kernel check
alone (rel L2 above the threshold), so the kernel path is proven to catch it independently.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import FIXTURES, load_reference
from spec_decoders import assert_decodes_to_tool
from npuconv import layouts
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import VerificationFailed
from npuconv.io.safetensors_io import read_header, read_tensor, save_file
from npuconv.verify import VerifyOptions, verify
from npuconv.writers import WriterOptions
from test_convert import CASES

LAYER = "model.layers.0.mlp.down_proj"


def converted(tmp_path, fixture: str, target: str, **writer_options):
    out = tmp_path / "out"
    convert(FIXTURES / fixture, out, ConvertOptions(target, WriterOptions(**writer_options)))
    return out


def rewrite(out, role: str, mutate, layer: str = LAYER) -> None:
    """Replace one tensor of ``layer`` in the (single-shard) output by ``mutate(tensor)``."""
    manifest = json.loads((out / "npuconv.json").read_text())
    name = manifest["layers"][layer]["tensors"][role]["name"]
    path = out / "model.safetensors"
    infos, metadata = read_header(path)
    tensors = {key: read_tensor(info) for key, info in infos.items()}
    new = mutate(tensors[name].clone())
    assert new.shape == tensors[name].shape and new.dtype == tensors[name].dtype
    assert not torch.equal(new.view(torch.uint8), tensors[name].view(torch.uint8)), "mutation changed nothing"
    tensors[name] = new
    save_file(tensors, path, metadata)


def assert_only_layer_fails(report: dict, layer: str = LAYER) -> None:
    assert not report["ok"]
    by_name = {r["name"]: r for r in report["layers"]}
    bad = by_name[layer]
    assert bad["status"] == "fail"
    assert bad["layout_exact"] is False
    assert bad["rel_l2"] is None or bad["rel_l2"] > bad["threshold"], "the kernel check alone must catch it"
    assert all(r["status"] == "pass" for name, r in by_name.items() if name != layer)


def run_verify(out) -> dict:
    return verify(out, VerifyOptions(skip_checksum=True))


# ------------------------------------------------------------------------------ clean conversions
@pytest.mark.parametrize("fixture,target", CASES)
def test_verify_passes_on_every_clean_conversion(fixture, target, tmp_path):
    report = verify(converted(tmp_path, fixture, target), VerifyOptions())
    assert report["ok"], [r for r in report["layers"] if r["status"] != "pass"]
    assert report["passed"] == 7 and report["backend"] == "emulated-cpu" and report["mode"] == "converted"
    assert all(r["layout_exact"] for r in report["layers"])


@pytest.mark.parametrize("fixture", ["awq_gemm_g128", "gptq_v1_b4_g64_asym_descact"])
def test_verify_passes_with_nz_weights(fixture, tmp_path):
    out = converted(tmp_path, fixture, "npu-int4", nz=True)
    report = verify(out, VerifyOptions())
    assert report["ok"]
    assert_decodes_to_tool(out, load_reference(fixture))  # and the NZ bytes are right by the spec, not by npuconv


def test_verify_passes_on_sglang_mx_layout(tmp_path):
    out = converted(tmp_path, "ms_w8a8_mxfp8", "npu-mxfp8", mx_layout="sglang")
    report = verify(out, VerifyOptions())
    assert report["ok"]
    assert_decodes_to_tool(out, load_reference("ms_w8a8_mxfp8"))


def test_verify_unconverted_source(tmp_path):
    report = verify(FIXTURES / "gptq_v2_b4_g32_asym", VerifyOptions())
    assert report["ok"] and report["mode"] == "source" and report["passed"] == 7


def test_verify_checking_nothing_is_not_a_pass():
    """Every layer skipped (no Ascend kernel for NVFP4): not ok, exit 2, and the reason is given."""
    report = verify(FIXTURES / "ct020_nvfp4a16", VerifyOptions())
    assert not report["ok"] and report["skipped"] == 7 and report["passed"] == 0
    assert report["exit_code"] == 2 and "nothing could be checked" in report["error"]
    assert "no Ascend kernel for w4a16_nvfp4" in report["error"]
    result = CliRunner().invoke(cli, ["verify", str(FIXTURES / "ct020_nvfp4a16")])
    assert result.exit_code == 2
    assert "FAIL 0/0 layers, 7 skipped" in result.output and "nothing could be checked" in result.output
    result = CliRunner().invoke(cli, ["verify", str(FIXTURES / "ct020_nvfp4a16"), "--json"])
    assert result.exit_code == 2 and json.loads(result.output)["ok"] is False


def test_verify_names_a_moved_source(tmp_path):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "gptq_v1_b4_g32_sym", source)
    out = tmp_path / "out"
    convert(source, out, ConvertOptions("npu-int4"))
    source.rename(tmp_path / "moved")
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 2
    assert f"source {source} (recorded in npuconv.json) not found; pass --source MODEL" in " ".join(result.output.split())
    result = CliRunner().invoke(cli, ["verify", str(out), "--source", str(tmp_path / "moved"), "-q"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------ mutations
def swap_nibbles(t: torch.Tensor) -> torch.Tensor:
    b = t.contiguous().view(torch.uint8)
    return ((b >> 4) | (b << 4)).view(t.dtype).reshape(t.shape)


MUTATIONS = [
    # (id, fixture, target, writer options, role, mutation)
    ("int4pack nibble order swapped", "gptq_v2_b4_g32_asym", "npu-int4", {}, "weight", swap_nibbles),
    ("sglang offset sign z-8", "gptq_v2_b4_g32_asym", "npu-int4", {}, "antiquant_offset", lambda t: -t),
    ("v1/v2 zero off by one", "gptq_v1_b4_g64_asym_descact", "npu-int4", {}, "antiquant_offset", lambda t: t + 1),
    ("scales shifted by one group", "awq_gemm_g128", "npu-int4", {}, "antiquant_scale", lambda t: torch.roll(t, 1, 0)),
    ("scales transposed", "ct020_w4a16_g32_asym", "npu-int4", {}, "antiquant_scale",
     lambda t: t.T.contiguous().reshape(t.shape)),
    ("act-order permutation dropped", "gptq_v1_b4_g64_asym_descact", "npu-int4", {}, "perm",
     lambda t: torch.arange(t.numel(), dtype=t.dtype)),
    ("NZ tiles transposed", "gptq_v1_b4_g64_asym_descact", "npu-int4", {"nz": True}, "weight",
     lambda t: t.permute(1, 0, 2, 3).contiguous().reshape(t.shape)),
    ("NZ with the default int32 C0 (16) instead of 8", "gptq_v1_b4_g64_asym_descact", "npu-int4", {"nz": True}, "weight",
     lambda t: layouts.nd_to_nz(layouts.nz_to_nd(t, 256, 16), 16).reshape(t.shape)),
    ("int8 NZ tiles transposed", "gptq_v1_b8_g128_asym_descact", "npu-int8", {}, "weight",
     lambda t: t.permute(1, 0, 2, 3).contiguous().reshape(t.shape), "model.layers.0.self_attn.q_proj"),
    ("E8M0 exponent off by one", "ms_w8a8_mxfp8", "npu-mxfp8", {}, "weight_scale", lambda t: t + 1),
    ("w8a8 weight scale per-channel shifted", "ct020_w8a8_int", "npu-w8a8", {}, "weight_scale", lambda t: torch.roll(t, 1, 0)),
    ("w8a8 static quant_bias dropped zero-point fold", "ms_w8a8_static_fp16", "npu-w8a8", {}, "quant_bias",
     lambda t: torch.zeros_like(t)),
]


@pytest.mark.parametrize("case", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_verify_fails_on_planted_bug(case, tmp_path):
    _, fixture, target, options, role, mutate, *rest = case
    layer = rest[0] if rest else LAYER
    out = converted(tmp_path, fixture, target, **options)
    rewrite(out, role, mutate, layer)
    report = run_verify(out)
    if role == "quant_bias":  # folded into the static kernel only: the canonical layout is unchanged
        bad = next(r for r in report["layers"] if r["name"] == layer)
        assert bad["status"] == "fail" and bad["rel_l2"] > bad["threshold"]
        return
    assert_only_layer_fails(report, layer)


def test_modified_output_is_refused_without_skip_checksum(tmp_path):
    out = converted(tmp_path, "gptq_v2_b4_g32_asym", "npu-int4")
    rewrite(out, "antiquant_offset", lambda t: -t)
    with pytest.raises(VerificationFailed, match="sha256 differs"):
        verify(out, VerifyOptions())
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1 and "sha256 differs" in result.output and "--skip-checksum" in result.output
    result = CliRunner().invoke(cli, ["verify", str(out), "--skip-checksum", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["failed"] == 1 and report["layers"][0]["name"] == LAYER


def test_cli_verify_pass_and_options(tmp_path):
    out = converted(tmp_path, "awq_gemm_g128", "npu-int4")
    result = CliRunner().invoke(cli, ["verify", str(out), "--layers", "*.mlp.*", "--tokens", "4", "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] == 3 and report["tokens"] == 4
    result = CliRunner().invoke(cli, ["verify", str(out), "--layers", "nothing*"])
    assert result.exit_code == 2 and "matches no quantized layer" in result.output
    result = CliRunner().invoke(cli, ["verify", str(out), "--max-rel-l2", "1e-9"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_verify_pairs_a_modelslim_output_with_its_source(tmp_path):
    """--to modelslim writes a foreign format; verify reads it back, pairs it with the recorded
    source, and catches a sign-flipped weight_offset (the W8A16/W4A16 offset convention)."""
    out = tmp_path / "ms"
    convert(FIXTURES / "gptq_v2_b4_g32_asym", out, ConvertOptions("modelslim"))
    report = verify(out, VerifyOptions())
    assert report["ok"] and report["mode"] == "paired" and report["passed"] == 7
    assert all(r["layout_exact"] for r in report["layers"])
    path = out / "quant_model_weights.safetensors"
    infos, metadata = read_header(path)
    tensors = {key: read_tensor(info) for key, info in infos.items()}
    tensors[f"{LAYER}.weight_offset"] = -tensors[f"{LAYER}.weight_offset"]
    save_file(tensors, path, metadata)
    with pytest.raises(VerificationFailed, match="sha256 differs"):
        verify(out, VerifyOptions())
    report = verify(out, VerifyOptions(skip_checksum=True))
    assert_only_layer_fails(report)
