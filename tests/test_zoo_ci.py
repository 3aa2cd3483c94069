"""``npuconv zoo`` in CI: verify results and warnings in the table, progress lines in logs, JUnit XML,
Markdown summary, ``zoo merge`` of shard reports, and the tomli dependency on Python 3.10."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner

from npuconv.cli import cli
from npuconv.errors import InputError
from npuconv.zoo_report import junit_xml, markdown_summary, merge_reports
from test_zoo import BROKEN, SOURCES, ZOO, sources, statuses, zoo_dir  # noqa: F401 (fixtures)

VERIFIED = ZOO.replace("[defaults]", "[defaults]\nverify = true")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_table_shows_verify_results_and_warnings(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(VERIFIED)
    result = invoke("zoo", zoo_dir / "zoo.toml")
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "verify" in table and "7/7 ok" in table
    # an entry's conversion warnings reach the human output (here through a report with one)
    report = json.loads(invoke("zoo", zoo_dir / "zoo.toml", "--json").stdout)
    report["entries"][1]["warnings"] = ["layer x: kept float"]
    (zoo_dir / "r.json").write_text(json.dumps(report))
    result = invoke("zoo", "merge", zoo_dir / "r.json")
    assert result.exit_code == 0 and "warning: awq: layer x: kept float" in result.stderr


def test_heartbeat_lines_while_an_entry_runs(zoo_dir):
    result = invoke("zoo", zoo_dir / "zoo.toml", "--heartbeat", "0.05")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip().startswith("running")]
    assert lines, result.stderr
    assert any(name in line for line in lines for name in SOURCES)
    quiet = invoke("zoo", zoo_dir / "zoo.toml", "--heartbeat", "0")
    assert "running" not in quiet.stderr and "skipped" in quiet.stderr


def test_junit_and_markdown_files(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(VERIFIED + BROKEN)
    junit, markdown = zoo_dir / "ci" / "zoo.xml", zoo_dir / "ci" / "zoo.md"
    result = invoke("zoo", zoo_dir / "zoo.toml", "-q", "--junit", junit, "--markdown", markdown)
    assert result.exit_code == 2
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert sorted(cases) == sorted([*SOURCES, "missing", "unsupported"])
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("6", "2", "0")
    assert cases["missing"].find("error") is not None and "no such directory" in cases["missing"].find("error").get("message")
    assert cases["gptq"].find("error") is None and cases["gptq"].find("failure") is None
    assert "verify: 7/7 ok" in cases["gptq"].find("system-out").text
    text = markdown.read_text()
    assert text.startswith("### ❌ npuconv zoo: FAIL 6 entries: 4 converted, 2 failed")
    assert "| 1 | gptq | npu-int4 | converted |" in text and "| 7/7 ok |" in text
    assert "cannot be written as npu-w8a8" in text


def test_verify_failed_is_a_junit_failure():
    report = {"ok": False, "exit_code": 1, "totals": {"seconds": 1.0}, "entries": [
        {"index": 0, "name": "m", "target": "npu-int4", "status": "verify-failed", "seconds": 1.0, "reason": "skipped",
         "error": "verify: 1 of 7 layers failed", "verify": {"ok": False, "passed": 6, "failed": 1, "skipped": 0},
         "warnings": ["w1"]},
    ]}
    suite = ElementTree.fromstring(junit_xml(report)).find("testsuite")
    assert suite.get("failures") == "1" and suite.get("errors") == "0"
    assert suite.find("testcase/failure").get("message") == "verify-failed: verify: 1 of 7 layers failed"
    assert "FAIL 1 of 7" in markdown_summary(report) and "w1" in markdown_summary(report)


def test_invalid_zoo_file_still_writes_junit_and_markdown(tmp_path):
    (tmp_path / "zoo.toml").write_text("[[model]\n")
    result = invoke("zoo", tmp_path / "zoo.toml", "--junit", tmp_path / "z.xml", "--markdown", tmp_path / "z.md")
    assert result.exit_code == 2
    case = ElementTree.parse(tmp_path / "z.xml").getroot().find("testsuite/testcase")
    assert case.get("name") == "zoo file" and "invalid TOML" in case.find("error").get("message")
    assert "invalid TOML" in (tmp_path / "z.md").read_text()


def test_merge_of_shard_reports_equals_one_run(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(ZOO + BROKEN)
    paths = []
    for i in (1, 2, 3):
        path = zoo_dir / f"report-{i}.json"
        invoke("zoo", zoo_dir / "zoo.toml", "--shard", f"{i}/3", "--report", path, "-q")
        paths.append(path)
    result = invoke("zoo", "merge", *paths, "--json", "--junit", zoo_dir / "all.xml")
    merged = json.loads(result.stdout)
    assert result.exit_code == 2 == merged["exit_code"]
    assert [e["index"] for e in merged["entries"]] == list(range(6))
    assert statuses(merged) == {**dict.fromkeys(SOURCES, "converted"), "missing": "failed", "unsupported": "failed"}
    assert merged["totals"]["entries"] == 6 and merged["totals"]["converted"] == 4 and merged["totals"]["failed"] == 2
    assert merged["shards"] == ["1/3", "2/3", "3/3"]
    assert len(ElementTree.parse(zoo_dir / "all.xml").getroot().findall("testsuite/testcase")) == 6
    human = invoke("zoo", "merge", *paths)
    assert human.exit_code == 2 and "FAIL 6 entries: 4 converted, 2 failed" in human.stdout


def test_merge_errors(zoo_dir, tmp_path):
    path = zoo_dir / "r.json"
    invoke("zoo", zoo_dir / "zoo.toml", "--report", path, "-q")
    result = invoke("zoo", "merge", path, path)
    assert result.exit_code == 2 and "the same shard twice" in result.output
    (tmp_path / "bad.json").write_text("{")
    assert "invalid JSON" in invoke("zoo", "merge", tmp_path / "bad.json").output
    assert "no such report file" in invoke("zoo", "merge", tmp_path / "none.json").output
    broken = {"ok": False, "error": "zoo.toml: invalid TOML", "exit_code": 2}
    merged = merge_reports([json.loads(path.read_text()), broken], ["a", "b"])
    assert merged["exit_code"] == 2 and merged["errors"] == ["b: zoo.toml: invalid TOML"]
    with pytest.raises(InputError, match="no report"):
        merge_reports([])


def test_zoo_subcommands_and_the_default_run(zoo_dir):
    assert "merge" in invoke("zoo", "--help").output
    result = invoke("zoo", "run", zoo_dir / "zoo.toml", "-q")
    assert result.exit_code == 0 and result.stdout.startswith("OK 4 entries: 4 converted")
    result = invoke("zoo", "--jobs", "2", zoo_dir / "zoo.toml", "-q")  # options before the file still work
    assert result.exit_code == 0 and result.stdout.startswith("OK 4 entries: 4 skipped")


def test_tomli_is_declared_for_python_310():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the very dependency under test
        import tomli as tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in d.replace(" ", "").replace('"', "'")
               for d in project["dependencies"])
