"""Start-up without torch (issue 15): ``--help``, ``--version`` and ``inspect`` never import torch
where no tensor has to be made. Not a timing test (speed is in ``benchmarks/RESULTS.md``): each
command runs in a fresh interpreter and reports whether ``torch`` ended up in ``sys.modules``.

Where ``inspect`` does need torch, by its format's own rule, the fixture is left out below: an
asymmetric GPTQ checkpoint tells v1 from v2 by statistics of the codes it unpacks (a symmetric one
by its packed zero-point words, without torch; msModelSlim offsets are read without torch too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES
from test_source import hub_cache

SRC = Path(__file__).resolve().parents[1] / "src"

# runs the real entry point (npuconv.__main__), then says whether torch was imported
PROBE = """
import sys
sys.argv[0] = "npuconv"
from npuconv.__main__ import main
try:
    main()
finally:
    sys.stderr.write("\\ntorch imported: %s\\n" % ("torch" in sys.modules))
"""

TORCH_FREE_FIXTURES = [
    "awq_gemm_g128",
    "ct020_w4a16_g32_asym",
    "ct020_w8a8_int",
    "ct020_fp8_static",
    "ct020_mxfp8a16",
    "ct020_nvfp4a16",
    "ct020_mixed_attn_w8a8_mlp_w4a16_g32_asym",
    "ct020_moe_qwen2_w4a16_g32_asym",
    "ct020_moe_mixtral_w8a8_int",
    "ms_w8a8_mxfp8",
    "gptq_v1_b4_g32_sym",
    "ms_w8a8_static_fp16",
    "ms_w8a16_per_group32_asym",
    "ms_w4a8_dynamic",
    "ms_v0_w4a8_dynamic_g32",
    "ms_w4a4_dynamic_g32_asym_autoround",
    "ms_mixed_w8a8dyn_attn_w4a8dyn_mlp",
]


def run_probe(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **env}
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=full_env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def torch_imported(result: subprocess.CompletedProcess) -> bool:
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("torch imported: "), result.stderr
    return line == "torch imported: True"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"]], ids=" ".join)
def test_help_and_version_do_not_import_torch(args):
    assert not torch_imported(run_probe(*args))


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("fixture", TORCH_FREE_FIXTURES)
def test_inspect_does_not_import_torch(fixture, as_json):
    result = run_probe("inspect", str(FIXTURES / fixture), *(["--json"] if as_json else []))
    assert not torch_imported(result)
    if as_json:  # the whole report, "where it can go" included, was made
        report = json.loads(result.stdout)
        assert report["layers"] and report["destinations"]
    else:
        assert "where it can go" in result.stdout


def test_inspect_from_the_hub_cache_does_not_import_torch(tmp_path):
    cache = hub_cache(tmp_path, "ct020_w4a16_g32_asym")
    result = run_probe("inspect", "acme/tiny-gptq", "--json", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert not torch_imported(result)
    assert json.loads(result.stdout)["format"] == "compressed-tensors"


def test_inspect_of_an_npuconv_output_does_not_import_torch(tmp_path):
    out = tmp_path / "out"
    converted = subprocess.run([sys.executable, "-m", "npuconv", "convert", str(FIXTURES / "awq_gemm_g128"), str(out), "-q"],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert converted.returncode == 0, converted.stderr
    result = run_probe("inspect", str(out), "--json")
    assert not torch_imported(result)
    assert json.loads(result.stdout)["format"] == "npuconv"


def test_the_probe_sees_torch_when_it_is_imported():
    """The check can fail: GPTQ's v1/v2 detection of an asymmetric checkpoint unpacks codes with torch."""
    assert torch_imported(run_probe("inspect", str(FIXTURES / "gptq_v2_b4_g32_asym")))
