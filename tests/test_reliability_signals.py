"""Signals and the terminal: every interrupt, at any moment of a run, ends cleanly.

Contract (README "Output safety", :mod:`npuconv.interrupts`): SIGINT exits 130, SIGHUP 129,
SIGTERM 143, each with one ``error:`` line and no traceback; a second Ctrl-C during cleanup is
ignored; nothing is left beside OUT, and OUT is either the complete previous output or the
complete new one. SIGKILL cannot be handled: OUT is still old-or-new, and the next run removes
what the killed one left. A closed stdout (``>&-``, a pipe whose reader is gone) is no error.

Timing is swept deterministically: ``tests/moments.py`` runs the real CLI and sends the signal
to itself at moment K of the run (before/after each step from taking the lock to releasing it);
~10 moments per signal spread over the whole run, plus every moment of publishing. Start-up
(importing click, rich, torch) is swept in real time from the moment npuconv's handlers are in
place. Bounded on purpose: ~30 short processes in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moments
from npuconv.convert import ConvertOptions, convert
from test_reliability import GPTQ, clean_error, copy_fixture, file_bytes, leftovers, process_env
from test_reliability_output import NEW, OLD, complete_outputs

DRIVER = Path(moments.__file__)
CODES = {"SIGINT": 130, "SIGINT2": 130, "SIGHUP": 129, "SIGTERM": 143}
WORDS = {"SIGINT": "interrupted", "SIGINT2": "interrupted", "SIGHUP": "SIGHUP", "SIGTERM": "SIGTERM"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return copy_fixture(GPTQ, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    return complete_outputs(model, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def force_moments(model, tmp_path_factory) -> list[str]:
    """The moments of ``convert --force`` over an earlier output (the same in the driver process)."""
    out = tmp_path_factory.mktemp("moments") / "out"
    convert(model, out, ConvertOptions(OLD))
    with pytest.MonkeyPatch.context() as patch:
        seen = moments.install(lambda i, name: None, patch.setattr)
        convert(model, out, ConvertOptions(NEW, force=True))
    return list(seen)


def spread(names: list[str], count: int) -> list[int]:
    """``count`` moments evenly over the run, always including the swap and the last moment."""
    swap = [i for i, n in enumerate(names) if n.endswith("renameat2")]
    even = {round(j * (len(names) - 1) / (count - 1)) for j in range(count)}
    return sorted(even | set(swap))


def run_at(model: Path, out: Path, k: int, how: str, tmp_path: Path) -> subprocess.CompletedProcess:
    events = tmp_path / "events.json"
    return subprocess.run(
        [sys.executable, str(DRIVER), str(k), how, str(events), "convert", str(model), str(out), "--to", NEW, "--force", "-q"],
        capture_output=True, text=True, env=process_env(), timeout=300,
    )


def assert_old_or_new(out: Path, reference) -> str:
    state = file_bytes(out)
    assert state in (reference[OLD], reference[NEW]), f"OUT is neither the complete old nor the complete new output: {sorted(state)}"
    return OLD if state == reference[OLD] else NEW


SWEEPS = {"SIGINT": 8, "SIGTERM": 3, "SIGHUP": 3, "SIGINT2": 3}


@pytest.mark.parametrize("how, position", [(how, p) for how, n in SWEEPS.items() for p in range(n + 2)])
def test_a_signal_at_any_moment_of_a_force_run_leaves_old_or_new_and_nothing_else(model, reference, force_moments, tmp_path, how, position):
    chosen = spread(force_moments, SWEEPS[how])
    if position >= len(chosen):
        pytest.skip("fewer moments in this sweep")
    k = chosen[position]
    out = tmp_path / "out"
    convert(model, out, ConvertOptions(OLD))
    proc = run_at(model, out, k, how, tmp_path)
    message = clean_error(proc.returncode, proc.stdout, proc.stderr, (WORDS[how],), code=CODES[how])
    which = assert_old_or_new(out, reference)
    assert which == (NEW if "published complete" in message else OLD), (force_moments[k], message)
    assert not leftovers(out), (force_moments[k], leftovers(out))


@pytest.mark.parametrize("position", range(7))
def test_sigkill_at_any_moment_leaves_old_or_new_and_the_next_run_cleans_up(model, reference, force_moments, tmp_path, position):
    chosen = spread(force_moments, 5)
    if position >= len(chosen):
        pytest.skip("fewer moments in this sweep")
    k = chosen[position]
    out = tmp_path / "out"
    convert(model, out, ConvertOptions(OLD))
    proc = run_at(model, out, k, "SIGKILL", tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_old_or_new(out, reference)
    convert(model, out, ConvertOptions(NEW, force=True))  # the next run: its own lock, the dead run's leftovers removed
    assert file_bytes(out) == reference[NEW]
    assert not leftovers(out)


def handlers_installed(pid: int) -> bool:
    """npuconv's handlers are in: SIGHUP is caught (only npuconv.interrupts catches it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGHUP - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.0])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(model, reference, tmp_path, delay):
    """From npuconv's first line (handlers in) through the imports of click, rich and torch, and on."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "npuconv", "convert", str(model), str(out), "--to", NEW, "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env(),
    )
    deadline = time.monotonic() + 60
    while not handlers_installed(proc.pid) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:  # finished before the signal: then it is complete
        assert file_bytes(out) == reference[NEW]
    else:
        clean_error(proc.returncode, stdout, stderr, ("interrupted",), code=130)
        assert not out.exists()
    assert not leftovers(out)


# =========================================================================== closed stdout
def test_closed_stdout_is_not_an_error(model, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "npuconv", "convert", str(model), str(out), "--to", NEW],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=process_env(), timeout=300,
        preexec_fn=lambda: os.close(1),  # `npuconv convert … >&-`
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert file_bytes(out) == reference[NEW]


def run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader is already gone (``npuconv … | true``): every write is EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "npuconv", *map(str, args)], stdout=write, stderr=subprocess.PIPE,
            text=True, env=process_env(), timeout=300,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [("inspect", "--layers"), ("inspect", "--json")])
def test_a_closed_pipe_ends_cleanly(model, args):
    proc = run_into_closed_pipe(args[0], model, *args[1:])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_closed_pipe_keeps_the_exit_code_of_a_failed_verify(model, tmp_path):
    out = tmp_path / "out"
    convert(model, out, ConvertOptions(NEW))
    proc = run_into_closed_pipe("verify", out, "--max-rel-l2", "1e-30", "--min-cosine", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
