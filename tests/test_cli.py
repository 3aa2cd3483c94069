"""CLI habits: global flags anywhere, wording of the one-line summaries."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from npuconv.cli import cli

GPTQ = str(FIXTURES / "gptq_v1_b4_g32_sym")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_and_after_the_command(where, tmp_path):
    args = ["inspect", tmp_path / "missing"]
    result = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert result.exit_code == 2, result.output
    assert "no such directory" in result.output
    assert "Traceback" in result.output  # --debug shows where the error came from


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_anywhere_logs_the_steps(flag, tmp_path):
    result = run("convert", GPTQ, tmp_path / "out", "--to", "npu-int4", flag, "-q")
    assert result.exit_code == 0, result.output
    assert "npuconv: " in result.output and "gptq format, 7 quantized layers" in result.output
    result = run(flag, "verify", tmp_path / "out", "-q")
    assert result.exit_code == 0 and "layer 7/7" in result.output


def test_every_command_takes_the_global_flags():
    import click

    def leaves(group):
        for command in group.commands.values():
            yield from leaves(command) if isinstance(command, click.Group) else [command]

    for command in leaves(cli):
        names = {opt for p in command.params for opt in p.opts}
        assert {"--debug", "-v", "--verbose"} <= names, command.name


def test_inspect_wording():
    result = run("inspect", GPTQ)
    assert result.exit_code == 0
    assert "llama (1 layer)" in result.output and "1 layers" not in result.output
    assert "gptq (gptq)" not in result.output
    result = run("inspect", FIXTURES / "gptq_v2_b4_g32_asym")
    assert "gptq (gptq_v2)" in result.output  # a detected variant that differs from the format is shown


def test_convert_rate_has_a_readable_unit(tmp_path):
    result = run("convert", GPTQ, tmp_path / "out", "--to", "npu-int4")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "0.00 GB/s" not in text and "B/s of input" in text
    assert "npuconv: " not in text  # no log lines without -v


def test_progress_bar_counts_layers_as_whole_items(monkeypatch):
    import sys

    from npuconv import cli as cli_module

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = cli_module.progress_bar(14, "verify", enabled=True, unit="layer")
    try:
        assert bar.unit == "layer" and not bar.unit_scale
        assert "0/14" in str(bar) and "?B/s" not in str(bar)
    finally:
        bar.close()
