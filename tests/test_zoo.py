"""``npuconv zoo``: many conversions in one run, up-to-date skipping, sharding, parallel workers, report.

A zoo of four real fixtures is copied to ``tmp_path`` (so source files can be touched and edited).
Entries run in worker processes, so these tests exercise the real process path.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

import npuconv
from conftest import FIXTURES
from npuconv.io.checkpoint import Checkpoint
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import InputError
from npuconv.io.fingerprint import check_output, source_fingerprint
from npuconv.io.safetensors_io import read_header
from npuconv.zoo import ZooFileError, load_zoo, parse_shard, select_shard

SOURCES = {  # entry name → (fixture, target)
    "gptq": ("gptq_v1_b4_g32_sym", "npu-int4"),
    "awq": ("awq_gemm_g128", "npu-int4"),
    "w8a8": ("ct020_w8a8_int", "npu-w8a8"),
    "int8": ("ms_w8a16_per_group32_asym", "npu-int8"),
}
ZOO = """
[defaults]
target = "npu-int4"

[[model]]
name = "gptq"
source = "src/gptq"
output = "out/gptq"

[[model]]
name = "awq"
source = "./src/awq"
output = "out/awq"
nz = true

[[model]]
name = "w8a8"
source = "src/w8a8"
output = "out/w8a8"
target = "npu-w8a8"
max_shard_size = "40KB"

[[model]]
name = "int8"
source = "src/int8"
output = "out/int8"
target = "npu-int8"
"""
BROKEN = """
[[model]]
name = "missing"
source = "./src/does-not-exist"
output = "out/missing"

[[model]]
name = "unsupported"
source = "src/gptq"
output = "out/unsupported"
target = "npu-w8a8"
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Writable copies of the fixtures (copied once; tests copy this tree again if they edit it)."""
    root = tmp_path_factory.mktemp("zoo-sources")
    for name, (fixture, _) in SOURCES.items():
        shutil.copytree(FIXTURES / fixture, root / name, ignore=shutil.ignore_patterns("reference_dequant*"))
    for path in root.rglob("*"):
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return root


@pytest.fixture
def zoo_dir(tmp_path, sources) -> Path:
    shutil.copytree(sources, tmp_path / "src", copy_function=shutil.copy2)
    (tmp_path / "zoo.toml").write_text(ZOO)
    return tmp_path


def run_zoo(zoo_dir: Path, *args: str, zoo: str = "zoo.toml", expect: int | None = 0) -> dict:
    """``npuconv zoo --json``; returns the report (checks the exit code and that it equals the report's)."""
    result = CliRunner().invoke(cli, ["zoo", str(zoo_dir / zoo), "--json", *args])
    report = json.loads(result.stdout)
    if expect is not None:
        assert result.exit_code == expect, result.output
    assert report["exit_code"] == result.exit_code
    return report


def statuses(report: dict) -> dict[str, str]:
    return {e["name"]: e["status"] for e in report["entries"]}


# ------------------------------------------------------------------------------------------- runs
def test_first_run_converts_second_run_skips(zoo_dir):
    first = run_zoo(zoo_dir)
    assert statuses(first) == dict.fromkeys(SOURCES, "converted")
    for entry in first["entries"]:
        manifest = json.loads((Path(entry["output"]) / "npuconv.json").read_text())
        assert manifest["target"] == SOURCES[entry["name"]][1]
        assert manifest["source_fingerprint"]["kind"] == "local"
        assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0 and entry["peak_rss_bytes"] > 10**6
    assert json.loads((zoo_dir / "out/awq/npuconv.json").read_text())["options"]["nz"] is True
    assert len(list((zoo_dir / "out/w8a8").glob("model-*.safetensors"))) > 1  # max_shard_size applied
    before = {p: p.stat().st_mtime_ns for p in (zoo_dir / "out").rglob("*")}

    second = run_zoo(zoo_dir)
    assert statuses(second) == dict.fromkeys(SOURCES, "skipped")
    assert {e["reason"] for e in second["entries"]} == {"up to date"}
    assert second["totals"]["skipped"] == 4 and second["totals"]["bytes_out"] == 0
    assert {p: p.stat().st_mtime_ns for p in (zoo_dir / "out").rglob("*")} == before  # nothing rewritten

    forced = run_zoo(zoo_dir, "--force")
    assert statuses(forced) == dict.fromkeys(SOURCES, "converted")
    assert {e["reason"] for e in forced["entries"]} == {"forced"}


def test_changed_source_reconverts_only_that_entry(zoo_dir):
    run_zoo(zoo_dir)
    config = zoo_dir / "src/awq/generation_config.json"
    config.write_text(config.read_text() + "\n")  # size changes
    report = run_zoo(zoo_dir)
    assert statuses(report) == {"gptq": "skipped", "awq": "converted", "w8a8": "skipped", "int8": "skipped"}
    assert "generation_config.json changed (size)" in report["entries"][1]["reason"]
    assert (zoo_dir / "out/awq/generation_config.json").read_text() == config.read_text()

    new_file = zoo_dir / "src/int8/chat_template.jinja"
    new_file.write_text("{{ messages }}")
    assert statuses(run_zoo(zoo_dir))["int8"] == "converted"
    new_file.unlink()
    report = run_zoo(zoo_dir)
    assert statuses(report)["int8"] == "converted" and "-chat_template.jinja" in report["entries"][3]["reason"]


def test_quick_check_hashes_only_when_mtime_changes(zoo_dir):
    run_zoo(zoo_dir)
    weights = zoo_dir / "src/gptq/model.safetensors"
    original = weights.stat()
    os.utime(weights, ns=(original.st_atime_ns, original.st_mtime_ns + 10**9))  # touched, same bytes
    assert statuses(run_zoo(zoo_dir))["gptq"] == "skipped"  # hashed: content unchanged

    data = bytearray(weights.read_bytes())
    data[read_header(weights)[0]["model.norm.weight"].start] ^= 0x01  # same size, different content
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(original.st_atime_ns, original.st_mtime_ns))  # ... and the recorded mtime
    assert statuses(run_zoo(zoo_dir))["gptq"] == "skipped"  # the quick check trusts (size, mtime), like make

    os.utime(weights, ns=(original.st_atime_ns, original.st_mtime_ns + 2 * 10**9))
    report = run_zoo(zoo_dir)
    assert statuses(report) == {"gptq": "converted", "awq": "skipped", "w8a8": "skipped", "int8": "skipped"}
    assert report["entries"][0]["reason"] == "model.safetensors changed (content)"


def test_changed_options_or_target_reconvert(zoo_dir):
    run_zoo(zoo_dir)
    text = ZOO.replace("nz = true", "nz = false").replace('target = "npu-int8"', 'target = "float"\ndtype = "float32"')
    (zoo_dir / "zoo.toml").write_text(text)
    report = run_zoo(zoo_dir)
    assert statuses(report) == {"gptq": "skipped", "awq": "converted", "w8a8": "skipped", "int8": "converted"}
    reasons = {e["name"]: e["reason"] for e in report["entries"]}
    assert reasons["awq"] == "options changed: nz"
    assert reasons["int8"] == "target changed (npu-int8 → float)"


def test_plain_convert_output_is_skipped(zoo_dir):
    convert(zoo_dir / "src/gptq", zoo_dir / "out/gptq", ConvertOptions("npu-int4"))
    report = run_zoo(zoo_dir)
    assert statuses(report)["gptq"] == "skipped"
    assert statuses(report)["awq"] == "converted"


def test_foreign_output_directory_is_never_replaced(zoo_dir):
    foreign = zoo_dir / "out/gptq"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("not npuconv's")
    for args in ((), ("--force",)):
        report = run_zoo(zoo_dir, *args, expect=2)
        gptq = report["entries"][0]
        assert gptq["status"] == "failed" and "not an npuconv output" in gptq["error"] and "refusing" in gptq["error"]
        assert (foreign / "precious.txt").read_text() == "not npuconv's"


# ------------------------------------------------------------------------------------------- failures
def test_broken_entries_fail_alone(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(ZOO + BROKEN)
    report = run_zoo(zoo_dir, expect=2)
    assert statuses(report) == {**dict.fromkeys(SOURCES, "converted"), "missing": "failed", "unsupported": "failed"}
    errors = {e["name"]: e["error"] for e in report["entries"]}
    assert "no such directory" in errors["missing"]
    assert "cannot be written as npu-w8a8" in errors["unsupported"]
    assert not (zoo_dir / "out/missing").exists() and not (zoo_dir / "out/unsupported").exists()
    assert report["totals"] == {**report["totals"], "entries": 6, "converted": 4, "failed": 2, "skipped": 0}
    assert not report["ok"]
    # and the human output: a table, one line per failure's message, a FAIL summary
    result = CliRunner().invoke(cli, ["zoo", str(zoo_dir / "zoo.toml")])
    assert result.exit_code == 2
    assert "FAIL 6 entries: 4 skipped, 2 failed" in result.stdout
    assert "no such directory" in result.output and "Traceback" not in result.output


def test_fail_fast_stops_after_first_failure(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(BROKEN + ZOO)  # the failing entries first
    report = run_zoo(zoo_dir, "--fail-fast", expect=2)
    assert [e["status"] for e in report["entries"]] == ["failed"] + ["not-run"] * 5
    assert report["totals"]["not-run"] == 5
    assert not (zoo_dir / "out").exists()
    assert [e["status"] for e in run_zoo(zoo_dir, expect=2)["entries"]] == ["failed", "failed"] + ["converted"] * 4


def test_verify_true_and_verify_failed(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(ZOO.replace("[defaults]", "[defaults]\nverify = true"))
    report = run_zoo(zoo_dir)
    assert statuses(report) == dict.fromkeys(SOURCES, "converted")
    for entry in report["entries"]:
        assert entry["verify"]["ok"] is True and entry["verify"]["passed"] > 0 and entry["verify"]["failed"] == 0

    shard = zoo_dir / "out/gptq/model.safetensors"  # corrupt an output after the fact
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = run_zoo(zoo_dir, expect=1)  # skipped (sources unchanged), but verification catches it
    assert statuses(report) == {"gptq": "verify-failed", "awq": "skipped", "w8a8": "skipped", "int8": "skipped"}
    assert "sha256 differs" in report["entries"][0]["error"]
    assert "--skip-checksum" not in report["entries"][0]["error"]  # a verify option zoo does not have
    assert report["totals"]["verify-failed"] == 1 and report["exit_code"] == 1


# ------------------------------------------------------------------------------------------- sharding, jobs
@pytest.mark.parametrize("by", ["index", "hash"])
def test_shards_partition_the_entries(zoo_dir, by):
    (zoo_dir / "zoo.toml").write_text(ZOO + BROKEN)
    names = []
    for i in (1, 2, 3):
        report = run_zoo(zoo_dir, "--dry-run", "--shard", f"{i}/3", "--shard-by", by, expect=None)
        assert report["shard"] == f"{i}/3" and report["zoo_entries"] == 6
        names.append([e["name"] for e in report["entries"]])
    assert sorted(n for part in names for n in part) == sorted([*SOURCES, "missing", "unsupported"])
    if by == "index":
        assert names == [["gptq", "int8"], ["awq", "missing"], ["w8a8", "unsupported"]]
    assert not (zoo_dir / "out").exists()  # --dry-run writes nothing


def test_shard_runs_only_its_entries(zoo_dir):
    first = run_zoo(zoo_dir, "--shard", "1/2")
    assert statuses(first) == {"gptq": "converted", "w8a8": "converted"}
    second = run_zoo(zoo_dir, "--shard", "2/2")
    assert statuses(second) == {"awq": "converted", "int8": "converted"}
    assert statuses(run_zoo(zoo_dir)) == dict.fromkeys(SOURCES, "skipped")


def test_hash_sharding_is_stable_when_entries_are_added(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text("".join(f'[[model]]\nsource = "s{i}"\noutput = "o{i}"\ntarget = "npu-int4"\n' for i in range(20)))
    before = {e.output_key: k for k in (1, 2, 3) for e in select_shard(load_zoo(zoo), (k, 3), "hash")}
    zoo.write_text('[[model]]\nsource = "new"\noutput = "new"\ntarget = "float"\n' + zoo.read_text())
    after = {e.output_key: k for k in (1, 2, 3) for e in select_shard(load_zoo(zoo), (k, 3), "hash")}
    assert {key: after[key] for key in before} == before
    assert len(set(before.values())) == 3


def test_parallel_jobs_give_the_same_statuses(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(ZOO + BROKEN)
    report = run_zoo(zoo_dir, "--jobs", "3", expect=2)
    assert report["jobs"] == 3
    assert [e["name"] for e in report["entries"]] == [*SOURCES, "missing", "unsupported"]  # file order
    assert statuses(report) == {**dict.fromkeys(SOURCES, "converted"), "missing": "failed", "unsupported": "failed"}
    assert all(e["peak_rss_bytes"] > 10**6 for e in report["entries"])  # measured in each worker
    again = run_zoo(zoo_dir, "--jobs", "2", expect=2)
    assert statuses(again) == {**dict.fromkeys(SOURCES, "skipped"), "missing": "failed", "unsupported": "failed"}


def test_dry_run_reports_what_would_happen(zoo_dir):
    run_zoo(zoo_dir, "--shard", "1/2")
    (zoo_dir / "zoo.toml").write_text(ZOO + BROKEN)
    report = run_zoo(zoo_dir, "--dry-run", expect=2)
    assert report["dry_run"] is True
    assert statuses(report) == {
        "gptq": "would-skip", "awq": "would-convert", "w8a8": "would-skip", "int8": "would-convert",
        "missing": "failed", "unsupported": "failed",
    }
    assert report["totals"]["would-convert"] == 2 and report["entries"][1]["bytes_out"] > 0
    assert not (zoo_dir / "out/awq").exists()


# ------------------------------------------------------------------------------------------- report, zoo file
def test_report_file_schema(zoo_dir):
    (zoo_dir / "zoo.toml").write_text(ZOO + BROKEN)
    report_path = zoo_dir / "reports" / "zoo.json"
    result = CliRunner().invoke(cli, ["zoo", str(zoo_dir / "zoo.toml"), "-q", "--report", str(report_path)])
    assert result.exit_code == 2
    assert result.stdout.startswith("FAIL 6 entries: 4 converted, 2 failed")  # -q: the summary line only
    report = json.loads(report_path.read_text())
    assert set(report) == {
        "npuconv_version", "zoo", "zoo_entries", "shard", "shard_by", "jobs", "force", "fail_fast", "dry_run",
        "ok", "exit_code", "entries", "totals",
    }
    assert report["npuconv_version"] == npuconv.__version__ and report["ok"] is False and report["exit_code"] == 2
    for entry in report["entries"]:
        assert set(entry) == {
            "index", "name", "source", "output", "target", "status", "reason", "seconds", "bytes_in", "bytes_out",
            "peak_rss_bytes", "error", "exit_code", "verify", "model", "warnings",
        }
        assert entry["status"] in ("converted", "skipped", "failed", "verify-failed", "not-run")
        assert isinstance(entry["seconds"], float) and isinstance(entry["peak_rss_bytes"], int)
        assert (entry["error"] is None) == (entry["status"] == "converted")
        assert entry["exit_code"] == (0 if entry["status"] == "converted" else 2)
        assert Path(entry["output"]).is_absolute()
    totals = report["totals"]
    assert set(totals) == {"entries", "converted", "skipped", "failed", "verify-failed", "not-run", "seconds",
                           "bytes_in", "bytes_out", "peak_rss_bytes"}
    assert totals["bytes_out"] == sum(e["bytes_out"] for e in report["entries"]) > 0
    assert totals["peak_rss_bytes"] == max(e["peak_rss_bytes"] for e in report["entries"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("[[model]\nsource = 1", "invalid TOML"),
        ("", "no models"),
        ("[defaults]\ntarget = 'npu-int4'", "no models"),
        ("[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'npu-int5'", "target 'npu-int5' is not one of"),
        ("[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'float'\ntagret = 1", "unknown key 'tagret'"),
        ("[defaults]\nsource = 'a'\n[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'float'", "defaults: unknown key 'source'"),
        ("[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'float'\nnz = 'yes'", "'nz' must be a bool"),
        ("[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'float'\nverify = 1", "'verify' must be a bool"),
        ("[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'float'\nmax_shard_size = '5 parsecs'", "max_shard_size"),
        ("[[model]]\nsource = 'a'\noutput = 'b'\ntarget = 'float'\ndtype = 'int8'", "dtype 'int8' is not one of"),
        ("[[model]]\nsource = 'a'\noutput = 'o'\ntarget = 'float'\n[[model]]\nsource = 'b'\noutput = './o'\ntarget = 'float'",
         "is also the output of model[0]"),
        ("models = 3", "unknown top-level key 'models'"),
    ],
)
def test_bad_zoo_file_is_exit_2_with_one_line(tmp_path, text, message):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(text)
    result = CliRunner().invoke(cli, ["zoo", str(zoo)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    with pytest.raises(ZooFileError, match="zoo.toml"):
        load_zoo(zoo)


def test_bad_zoo_file_json_and_report(tmp_path):
    result = CliRunner().invoke(cli, ["zoo", str(tmp_path / "nope.toml"), "--json", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"ok": False, "exit_code": 2, "error": f"{tmp_path / 'nope.toml'}: no such zoo file"}
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 2


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_option(tmp_path, text):
    (tmp_path / "zoo.toml").write_text(ZOO)
    result = CliRunner().invoke(cli, ["zoo", str(tmp_path / "zoo.toml"), "--shard", text])
    assert result.exit_code == 2 and "--shard: expected i/n" in result.output
    with pytest.raises(InputError):
        parse_shard(text)


def test_paths_resolve_against_the_zoo_file(zoo_dir, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    entries = load_zoo(zoo_dir / "zoo.toml")
    assert [e.source for e in entries] == [str(zoo_dir / "src" / name) for name in SOURCES]
    assert [e.output for e in entries] == [zoo_dir / "out" / name for name in SOURCES]
    assert entries[2].max_shard_bytes == 40_000 and entries[1].nz is True and entries[0].nz is None


# ------------------------------------------------------------------------------------------- Hub sources
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _snapshot(cache: Path, commit: str, sources: Path) -> None:
    repo = cache / "models--acme--tiny"
    shutil.copytree(sources / "gptq", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_source_is_fingerprinted_by_commit(tmp_path, sources, monkeypatch):
    cache = tmp_path / "hub"
    _snapshot(cache, COMMIT_A, sources)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # the workers get the zoo command's environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "zoo.toml").write_text(
        '[[model]]\nsource = "acme/tiny"\noutput = "out/tiny"\ntarget = "npu-int4"\nverify = true\n'
        f'[[model]]\nsource = "acme/tiny@{COMMIT_A}"\noutput = "out/pinned"\ntarget = "npu-int4"\n'
    )
    assert statuses(run_zoo(tmp_path)) == {"out/tiny": "converted", "out/pinned": "converted"}
    manifest = json.loads((tmp_path / "out/tiny/npuconv.json").read_text())
    assert manifest["source_fingerprint"] == {"version": 1, "kind": "hub", "repo": "acme/tiny", "commit": COMMIT_A}
    assert statuses(run_zoo(tmp_path)) == {"out/tiny": "skipped", "out/pinned": "skipped"}

    _snapshot(cache, COMMIT_B, sources)  # main moves to a new commit
    report = run_zoo(tmp_path)
    assert statuses(report) == {"out/tiny": "converted", "out/pinned": "skipped"}
    assert report["entries"][0]["reason"] == f"acme/tiny is at commit {COMMIT_B[:12]} (converted from {COMMIT_A[:12]})"
    assert report["entries"][0]["verify"]["ok"] is True


def test_fingerprint_and_check_output_library(zoo_dir):
    from npuconv.convert import manifest_options

    options = ConvertOptions("npu-int4")
    fingerprint = source_fingerprint(Checkpoint(zoo_dir / "src/gptq"))
    names = [f["name"] for f in fingerprint["files"]]
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert names == sorted(names)
    out = zoo_dir / "o"
    assert check_output(out, str(zoo_dir / "src/gptq"), "npu-int4", manifest_options(options)).reason == "no output yet"
    convert(zoo_dir / "src/gptq", out, options)
    fresh = check_output(out, str(zoo_dir / "src/gptq"), "npu-int4", manifest_options(options))
    assert fresh.up_to_date and fresh.is_output
    (out / "model.safetensors").unlink()
    stale = check_output(out, str(zoo_dir / "src/gptq"), "npu-int4", manifest_options(options))
    assert not stale.up_to_date and stale.reason == "output incomplete (model.safetensors)"


def test_without_tomllib_or_tomli_the_error_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10 without tomli
    monkeypatch.setitem(sys.modules, "tomli", None)
    (tmp_path / "zoo.toml").write_text(ZOO)
    with pytest.raises(ZooFileError, match="pip install tomli"):
        load_zoo(tmp_path / "zoo.toml")
