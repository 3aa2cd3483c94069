"""The writing libraries as oracles (run in their own venvs, tests/oracle_env.py).

- compressed-tensors writes small checkpoints at test time (tests/oracle_scripts/make_ct.py: its
  own ``calculate_qparams`` and registered compressors) and dequantizes them with its own
  dequantizer; npuconv's reader must agree.
- ``verify --reference tool`` (npuconv.references) on conversions of compressed-tensors and
  msModelSlim sources: the report names the tool, every layer used it, and a planted reader bug
  that ``--reference npuconv`` cannot see (the reader feeds both sides) fails it.
- Without the tool, ``--reference tool`` is a clean one-line error and ``auto`` falls back.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES
from oracle_env import REPO, run_oracle, tool_dequant

from npuconv.io.checkpoint import Checkpoint
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.model import dequantize
from npuconv.readers import open_reader
from npuconv.verify import VerifyOptions, verify

CT_GENERATED = ["fp8_dynamic", "mxfp4a16", "mxfp8a16", "nvfp4a16", "w3a16_g32", "w4a16_g32_asym", "w4a16_g64_sym",
                "w8a16_channel", "w8a8_int"]
#: compressed-tensors computes NVFP4 in bf16 (its fp4 unpacker's default dtype): its result is npuconv's float32
#: dequantization rounded to bf16, not bit-equal to it
BF16_TOOL = {"nvfp4a16"}


@pytest.fixture(scope="module")
def ct_generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct_generated")
    run_oracle("compressed-tensors", str(REPO / "tests" / "oracle_scripts" / "make_ct.py"), str(root))
    dirs = [root / name for name in CT_GENERATED]
    return dict(zip(CT_GENERATED, zip(dirs, tool_dequant("compressed-tensors", dirs, root))))


@pytest.mark.parametrize("name", CT_GENERATED)
def test_compressed_tensors_reader_agrees_with_the_library(ct_generated, name):
    directory, tool = ct_generated[name]
    reader = open_reader(Checkpoint(directory))
    specs = reader.linear_specs()
    assert sorted(tool) == sorted(s.name for s in specs) and len(specs) == 2
    for spec in specs:
        mine = dequantize(reader.load(spec), torch.float32)
        if name in BF16_TOOL:
            assert torch.equal(mine.to(torch.bfloat16).float(), tool[spec.name]), spec.name
        else:
            assert torch.equal(mine, tool[spec.name]), spec.name


# ------------------------------------------------------------------------------ verify --reference tool
VERIFY_SCRIPT = """
import json, sys
from npuconv.verify import VerifyOptions, verify
plant = sys.argv[2]
if plant == "ct-zero":  # a reader bug: every asymmetric zero point one too high
    from npuconv.readers.compressed_tensors import CompressedTensorsReader as R
elif plant == "ms-scale":  # a reader bug: every weight scale 1.5x
    from npuconv.readers.modelslim import ModelSlimReader as R
if plant != "none":
    real = R.load_layer
    def load_layer(self, spec):
        layer = real(self, spec)
        if plant == "ct-zero" and layer.zero is not None:
            layer.zero = layer.zero + 1
        elif plant == "ms-scale":
            layer.scale = layer.scale * 1.5
        return layer
    R.load_layer = load_layer
out = []
for path, mode in json.loads(sys.argv[1]):
    if plant != "none":  # convert with the planted bug too: npuconv's reference cannot tell
        from npuconv.convert import ConvertOptions, convert
        convert(path[0], path[1], ConvertOptions(path[2]))
        path = path[1]
    out.append(verify(path, VerifyOptions(reference=mode)))
print(json.dumps(out))
"""


def tool_verify(tool: str, jobs: list, plant: str = "none") -> list[dict]:
    done = run_oracle(tool, "-c", VERIFY_SCRIPT, json.dumps(jobs), plant)
    return json.loads(done.stdout.strip().splitlines()[-1])


def converted(tmp_path, cases: list[tuple[str, str]]) -> list[str]:
    outs = []
    for fixture, target in cases:
        out = tmp_path / f"{fixture}.{target}"
        source = fixture if "/" in fixture else FIXTURES / fixture
        convert(source, out, ConvertOptions(target))
        outs.append(str(out))
    return outs


CT_CASES = [("ct020_w4a16_g32_asym", "npu-int4"), ("ct020_w8a8_int", "npu-w8a8"), ("ct020_mxfp8a16", "npu-mxfp8"),
            ("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4"), ("ct020_moe_mixtral_w8a8_int", "npu-w8a8"),
            ("ct020_w8a8_int", "modelslim")]
MS_CASES = [("ms_w4a8_dynamic", "npu-w4a8"), ("ms_w8a16_per_group32_asym", "npu-int8"), ("ms_w8a8_mxfp8", "npu-mxfp8"),
            ("ms_w8a8_static_fp16", "npu-w8a8"), ("ms_w4a8_dynamic", "npu-int4")]


@pytest.mark.parametrize("tool, cases, prefix", [("compressed-tensors", CT_CASES, "compressed-tensors 0."),
                                                 ("modelslim", MS_CASES, "msmodelslim 26.1.0")])
def test_verify_against_the_writing_library(tmp_path, tool, cases, prefix):
    outs = converted(tmp_path, cases)
    reports = tool_verify(tool, [[out, mode] for out in outs for mode in ("tool", "auto")])
    for report in reports:
        assert report["ok"], (report["output"], [l for l in report["layers"] if l["status"] != "pass"])
        assert report["reference"].startswith(prefix), report["reference"]
        assert report["passed"] > 0 and all(l["reference"] == report["reference"] for l in report["layers"])


@pytest.mark.parametrize("tool, fixture, target, plant", [
    ("compressed-tensors", "ct020_w4a16_g32_asym", "npu-int4", "ct-zero"),
    ("modelslim", "ms_w8a16_per_group32_asym", "npu-int8", "ms-scale"),
])
def test_tool_reference_catches_a_reader_bug_npuconv_reference_cannot(tmp_path, tool, fixture, target, plant):
    jobs = [[[str(FIXTURES / fixture), str(tmp_path / mode), target], mode] for mode in ("npuconv", "tool")]
    own, tools = tool_verify(tool, jobs, plant)
    assert own["ok"] and own["reference"] == "npuconv"  # consistent with itself: blind to the bug
    assert not tools["ok"] and tools["failed"] == len(tools["layers"])


def test_reference_tool_without_the_library_is_a_clean_error(tmp_path):
    out = converted(tmp_path, [("gptq_v2_b4_g32_asym", "npu-int4")])[0]
    result = CliRunner().invoke(cli, ["verify", out, "--reference", "tool"])
    assert result.exit_code == 2
    assert "--reference tool: no tool reference for gptq sources" in result.output
    report = verify(out, VerifyOptions(reference="auto"))
    assert report["ok"] and report["reference"] == "npuconv"
    assert {l["reference"] for l in report["layers"]} == {"npuconv"}


def test_reference_tool_names_the_missing_library(tmp_path):
    if importlib.util.find_spec("compressed_tensors") is not None:
        pytest.skip("compressed-tensors is installed in this Python")
    out = converted(tmp_path, [("ct020_w4a16_g32_asym", "npu-int4")])[0]
    result = CliRunner().invoke(cli, ["verify", out, "--reference", "tool"])
    assert result.exit_code == 2 and "(compressed_tensors) is not installed" in result.output
    assert "Traceback" not in result.output
