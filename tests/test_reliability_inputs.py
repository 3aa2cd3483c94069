"""Reliability of input validation (issue 16): Hub revisions, safetensors headers as the safetensors
library reads them, ``verify`` opening the output like a loader, contradicting GPTQ configs and
every numeric option of ``verify``. Each bad input ends with exit 2 (or 1 for a verify verdict)
and one line, never a traceback; the safetensors cases are checked against the library itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
from safetensors import safe_open

from npuconv.convert import ConvertOptions, convert
from npuconv.errors import InputError
from test_reliability import (
    GPTQ,
    QC,
    ST,
    assert_no_output,
    cli_error,
    copy_fixture,
    edit_bytes,
    run_cli,
    set_key,
    split_safetensors,
)
from test_source import COMMIT, hub_cache
from test_source import run_cli as run_hub_cli

Q = "model.layers.0.self_attn.q_proj"


# ============================================================================== Hub revisions
@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/3", "release-2024_01", COMMIT])
def test_branch_tag_and_commit_revisions_are_accepted(revision):
    from npuconv.io.source import check_revision

    check_revision(revision)


@pytest.mark.parametrize("revision", ["../../x", "a/../b", "..", ".hidden", "main.lock", "a//b", "/etc", "a\\b", "tag.", "x y", "a/./b"])
def test_revisions_that_could_name_a_path_are_refused(revision):
    from npuconv.io.source import check_revision

    with pytest.raises(InputError, match="is not a branch, tag or commit"):
        check_revision(revision)


def victim(tmp_path: Path) -> Path:
    """A model directory outside the Hub cache, and a file that would send a ref lookup to it."""
    outside = copy_fixture(GPTQ, tmp_path / "victim", "model")
    (tmp_path / "victim" / "ref").write_text("../../../victim/model")
    return outside


def test_a_revision_with_path_components_never_reads_outside_the_cache(tmp_path):
    cache = hub_cache(tmp_path)  # tmp_path/hub/models--acme--tiny-gptq/{refs,snapshots}
    victim(tmp_path)
    result = run_hub_cli(["inspect", "acme/tiny-gptq@../../../victim/ref", "-q"], cache)
    assert result.returncode == 2 and "revision" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_ref_file_pointing_outside_the_cache_is_refused(tmp_path):
    cache = hub_cache(tmp_path)
    victim(tmp_path)
    (cache / "models--acme--tiny-gptq" / "refs" / "evil").write_text("../../../victim/model")
    result = run_hub_cli(["inspect", "acme/tiny-gptq@evil", "-q"], cache)
    assert result.returncode == 2 and "outside the cache" in result.stderr, result.stderr


# ======================================================================== safetensors headers
def raw_header(filename: str, change) -> object:
    """Rewrite the header text itself (``change(text, data) -> (text, data)``): duplicates and escapes need it."""

    def rewrite(raw: bytes) -> bytes:
        header, data = split_safetensors(raw)
        text, data = change(json.dumps(header), data)
        blob = text.encode()
        return struct.pack("<Q", len(blob)) + blob + data

    return edit_bytes(filename, rewrite)


def duplicate_first_entry(text: str, data: bytes) -> tuple[str, bytes]:
    """Append a second entry under the first tensor's name (the last one would silently win)."""
    header = json.loads(text)
    name = next(k for k in header if k != "__metadata__")
    entry = dict(header[name])
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + size]
    return text[:-1] + f', {json.dumps(name)}: {json.dumps(entry)}}}', data + bytes(size)


def trailing_bytes(text: str, data: bytes) -> tuple[str, bytes]:
    return text, data + b"\0" * 8


def hole_before_first(text: str, data: bytes) -> tuple[str, bytes]:
    header = json.loads(text)
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    return json.dumps(header), b"\0" * 8 + data


def lone_surrogate_name(text: str, data: bytes) -> tuple[str, bytes]:
    return text.replace(f'"{Q}.qweight"', f'"{Q}.qweight\\ud800"', 1), data


HEADER_CASES = {
    "duplicate-name": (duplicate_first_entry, "twice"),
    "trailing-bytes": (trailing_bytes, "after the last tensor"),
    "hole": (hole_before_first, "belong to no tensor"),
    "lone-surrogate-name": (lone_surrogate_name, "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_safetensors_headers_are_read_as_the_library_reads_them(case, tmp_path):
    change, needle = HEADER_CASES[case]
    model = copy_fixture(GPTQ, tmp_path)
    raw_header(ST, change)(model)
    with pytest.raises(safetensors.SafetensorError):  # the format's own library refuses the file too
        with safe_open(str(model / ST), "pt") as f:
            list(f.keys())
    for command in (("inspect", model), ("inspect", model, "--layers"), ("convert", model, tmp_path / "out", "--to", "float")):
        cli_error(run_cli(*command), (ST, needle))
    assert_no_output(tmp_path / "out")


def test_verify_opens_the_output_with_the_safetensors_library(tmp_path, monkeypatch):
    """verify checks what a loader sees: if the safetensors library cannot open a shard, it FAILS."""
    model = copy_fixture(GPTQ, tmp_path)
    out = tmp_path / "out"
    convert(model, out, ConvertOptions("npu-int4"))
    assert run_cli("verify", out, "-q").exit_code == 0
    opened = []

    def refusing_open(path, framework, **kwargs):
        opened.append(Path(path).name)
        raise safetensors.SafetensorError("Error while deserializing header: invalid JSON in header")

    monkeypatch.setattr(safetensors, "safe_open", refusing_open)
    cli_error(run_cli("verify", out), ("model.safetensors", "safetensors library cannot open"), code=1)
    assert opened == ["model.safetensors"]


# ================================================================ config.json vs quantize_config.json
@pytest.mark.parametrize("key, value", [("bits", 8), ("group_size", 64), ("sym", False)])
def test_contradicting_gptq_configs_are_refused(key, value, tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    set_key("config.json", f"quantization_config.{key}", value)(model)
    stated = json.loads((model / QC).read_text())[key]
    message = cli_error(run_cli("inspect", model), (f"quantization_config.{key}={value!r}", f"quantize_config.json {key}={stated!r}"))
    assert "contradicts" in message
    cli_error(run_cli("convert", model, tmp_path / "out", "--to", "float"), ("contradicts",))
    assert_no_output(tmp_path / "out")


def test_other_gptq_config_differences_are_a_warning_naming_both(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    set_key("config.json", "quantization_config.desc_act", True)(model)
    result = run_cli("convert", model, tmp_path / "out", "--to", "float", "-q")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "desc_act" in line]
    assert len(warnings) == 1 and "desc_act=True" in warnings[0] and "desc_act=False" in warnings[0], result.stderr


# ====================================================================== numeric options of verify
@pytest.mark.parametrize(
    "option, value",
    [
        ("--seed", str(2**80)), ("--seed", "-1"), ("--max-rel-l2", "-1"), ("--max-rel-l2", "0"), ("--max-rel-l2", "nan"),
        ("--max-rel-l2", "inf"), ("--min-cosine", "nan"), ("--min-cosine", "2"), ("--min-cosine", "-inf"), ("--tokens", "0"),
    ],
)
def test_every_numeric_option_of_verify_is_validated(option, value, tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    result = run_cli("verify", model, option, value)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and option in last, result.stderr


@pytest.mark.parametrize("field, value", [("seed", 2**80), ("max_rel_l2", float("nan")), ("min_cosine", float("inf")), ("tokens", 0)])
def test_verify_options_are_validated_in_the_library_too(field, value):
    from npuconv.verify import VerifyOptions

    with pytest.raises(InputError, match=field):
        VerifyOptions(**{field: value})
