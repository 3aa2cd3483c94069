"""Where outputs can be served (npuconv.engines.support): the ``--to modelslim`` refusal of layer types
no engine loads, ``--allow-unservable``, and ``inspect``'s destinations (text and JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from npuconv.cli import cli
from npuconv.engines import support

REPO = Path(__file__).parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def _convert(*args: str):
    return CliRunner().invoke(cli, ["convert", *args])


def test_modelslim_refuses_w4a16_before_writing_and_names_a_served_target(tmp_path):
    out = tmp_path / "out"
    result = _convert(str(FIXTURES / "gptq_v2_b4_g32_asym"), str(out), "--to", "modelslim")
    assert result.exit_code == 2
    assert "W4A16 per-group loads in no engine" in result.output
    assert "--to npu-int4" in result.output and "--allow-unservable" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_allow_unservable_writes_it(tmp_path):
    out = tmp_path / "out"
    result = _convert(str(FIXTURES / "gptq_v2_b4_g32_asym"), str(out), "--to", "modelslim", "-q", "--allow-unservable")
    assert result.exit_code == 0, result.output
    assert (out / "quant_model_description.json").is_file()


def test_modelslim_of_a_served_type_needs_no_flag(tmp_path):
    result = _convert(str(FIXTURES / "ms_w8a8_static_fp16"), str(tmp_path / "out"), "--to", "modelslim", "-q")
    assert result.exit_code == 0, result.output


def test_per_group_w8a16_is_refused_with_the_int8_target_named(tmp_path):
    result = _convert(str(FIXTURES / "ms_w8a16_per_group32_asym"), str(tmp_path / "o"), "--to", "modelslim", "--dry-run")
    assert result.exit_code == 2
    assert "W8A16 per-group" in result.output and "--to npu-int8" in result.output


def test_inspect_json_lists_destinations():
    result = CliRunner().invoke(cli, ["inspect", str(FIXTURES / "gptq_v2_b4_g32_asym"), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["target"]: row for row in json.loads(result.output)["destinations"]}
    assert rows["npu-int4"]["convertible"] and "SGLang 0.5.23" in rows["npu-int4"]["engines"]
    assert rows["modelslim"]["convertible"] and rows["modelslim"]["engines"] == []  # W4A16: loads nowhere
    assert not rows["npu-int8"]["convertible"] and "4-bit" in rows["npu-int8"]["reason"]
    assert rows["float"]["engines"] is None  # not judged


def test_inspect_text_shows_where_it_can_go():
    result = CliRunner().invoke(cli, ["inspect", str(FIXTURES / "ms_w8a8_static_fp16")])
    assert result.exit_code == 0, result.output
    assert "where it can go" in result.output
    line = next(l for l in result.output.splitlines() if "modelslim" in l and "│" in l)
    assert "SGLang 0.5.23" in line and "vLLM-Ascend" in line


def test_every_row_cites_existing_evidence():
    rows = [s for group in (*support.TARGETS.values(), *support.MODELSLIM.values()) for s in group]
    assert rows
    for serving in rows:
        if serving.evidence == support.STUDY:
            continue
        path, _, name = serving.evidence.partition("::")
        assert f"def {name}(" in (REPO / path).read_text(), serving
