"""Reliability of the output path: ``--force``, publishing, the lock, cleanup, permissions, dry-run.

Every class of failure of issue 16 ("nothing lost, ever") has a test here; races are swept over
the whole run (:mod:`moments`: every step from taking the lock to releasing it, ~16 moments per
class), not tried at one moment. Signals are in ``test_reliability_signals.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import moments
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import OutputError
from test_reliability import (
    GPTQ,
    assert_no_output,
    clean_error,
    cli_error,
    copy_fixture,
    file_bytes,
    leftovers,
    process_env,
    run_cli,
    tree_state,
)

OLD, NEW = "float", "npu-int4"  # the earlier output and the new one: different targets, so tell-apart bytes


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    source = copy_fixture(GPTQ, root)
    (source / "extras").mkdir()
    (source / "extras" / "notes.md").write_text("a side file in a subdirectory (copied into the output)\n")
    return source


def complete_outputs(model: Path, root: Path) -> dict[str, dict[str, bytes]]:
    """The complete bytes of the OLD and NEW outputs of ``model`` (conversion is deterministic)."""
    result = {}
    for target in (OLD, NEW):
        convert(model, root / target, ConvertOptions(target))
        result[target] = file_bytes(root / target)
    return result


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    return complete_outputs(model, tmp_path_factory.mktemp("reference"))


def old_output(model: Path, out: Path) -> None:
    convert(model, out, ConvertOptions(OLD))


# ============================================================================ --force: whole outputs only
def test_force_refuses_a_user_directory_holding_a_copied_manifest(model, tmp_path):
    """The data-loss case: a user's directory with a stray npuconv.json is never replaced."""
    old_output(model, tmp_path / "earlier")
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "thesis.tex").write_text("\\documentclass{book} years of work")
    shutil.copy(tmp_path / "earlier" / "npuconv.json", precious / "npuconv.json")
    before = tree_state(precious)
    for extra in ((), ("--dry-run",)):
        cli_error(run_cli("convert", model, precious, "--to", NEW, "--force", *extra), ("not an npuconv output", "thesis.tex"))
        assert tree_state(precious) == before
    assert not leftovers(precious)


def test_force_refuses_a_hand_made_manifest_without_a_file_list(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "npuconv.json").write_text(json.dumps({"target": "npu-int4", "layers": {}}))
    before = tree_state(out)
    cli_error(run_cli("convert", model, out, "--to", NEW, "--force"), ("lists no 'files'",))
    assert tree_state(out) == before


@pytest.mark.parametrize("addition", ["file", "subdir-file", "empty-dir", "symlink"])
def test_force_refuses_an_output_the_user_added_to(model, tmp_path, addition):
    out = tmp_path / "out"
    old_output(model, out)
    if addition == "file":
        (out / "my-eval-results.json").write_text("{}")
    elif addition == "subdir-file":
        (out / "extras" / "mine.txt").write_text("mine")
    elif addition == "empty-dir":
        (out / "runs").mkdir()
    else:
        (out / "link").symlink_to(tmp_path)
    before = tree_state(out)
    cli_error(run_cli("convert", model, out, "--to", NEW, "--force"), ("not an npuconv output",))
    assert tree_state(out) == before
    assert not leftovers(out)


def test_force_replaces_a_whole_earlier_output(model, reference, tmp_path):
    out = tmp_path / "out"
    old_output(model, out)
    manifest = json.loads((out / "npuconv.json").read_text())
    assert "extras/notes.md" in manifest["files"] and "npuconv.json" in manifest["files"]
    assert sorted(manifest["files"]) == sorted(file_bytes(out))
    assert run_cli("convert", model, out, "--to", NEW, "--force", "-q").exit_code == 0
    assert file_bytes(out) == reference[NEW]
    assert not leftovers(out)


def test_force_replaces_an_empty_directory(model, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("convert", model, out, "--to", NEW, "--force", "-q").exit_code == 0
    assert file_bytes(out) == reference[NEW]


# ================================================================== dry-run: the same errors as a run
@pytest.mark.parametrize("case", ["out-is-model", "out-inside-model", "out-exists", "out-not-npuconv"])
def test_dry_run_reports_the_errors_of_a_real_run(model, tmp_path, case):
    source = copy_fixture(GPTQ, tmp_path, "src")
    out = {"out-is-model": source, "out-inside-model": source / "sub"}.get(case, tmp_path / "out")
    force = ("--force",) if case in ("out-is-model", "out-not-npuconv") else ()
    if case == "out-exists":
        old_output(model, out)
    elif case == "out-not-npuconv":
        out.mkdir()
        (out / "data.txt").write_text("x")
    before = tree_state(tmp_path)
    real = cli_error(run_cli("convert", source, out, "--to", NEW, *force))
    assert tree_state(tmp_path) == before
    dry = cli_error(run_cli("convert", source, out, "--to", NEW, "--dry-run", *force))
    assert dry == real


# ============================================================================ permissions of the output
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
def test_output_directory_mode_follows_the_umask(model, tmp_path, umask, mode):
    """mkdtemp makes 0700 directories; the published OUT must be a normal directory (engine users read it)."""
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        convert(model, out, ConvertOptions(NEW))
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == mode
    assert (out / "extras").stat().st_mode & 0o777 == mode
    assert (out / "npuconv.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ============================================================ races, swept over every moment of a run
@pytest.fixture(scope="module")
def run_moments(model, tmp_path_factory) -> dict[bool, list[str]]:
    """The moments of a conversion to a fresh OUT (False) and of a --force replacement (True)."""
    result = {}
    for force in (False, True):
        out = tmp_path_factory.mktemp("moments") / "out"
        if force:
            old_output(model, out)
        with pytest.MonkeyPatch.context() as patch:
            seen = moments.install(lambda i, name: None, patch.setattr)
            convert(model, out, ConvertOptions(NEW, force=force))
        result[force] = list(seen)
    return result


def sweep(names: list[str], count: int = 16) -> list[int]:
    """~``count`` moments spread over the whole run, plus every moment of publishing and cleanup."""
    step = max(1, len(names) // count)
    critical = ("renameat2", "_fsync_dir", "check_replaceable", "rmtree", "release", "acquire", "_make_container")
    return sorted({*range(0, len(names), step), len(names) - 1, *(i for i, n in enumerate(names) if n.endswith(critical))})


def moment(run_moments, force: bool, position: int) -> int:
    chosen = sweep(run_moments[force])
    if position >= len(chosen):
        pytest.skip("the sweep has fewer moments")
    return chosen[position]


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
@pytest.mark.parametrize("position", range(24))
def test_a_rival_run_at_any_moment_exactly_one_wins(model, reference, run_moments, tmp_path, force, position, monkeypatch):
    """A second conversion to OUT starts at moment k of the first: one wins, the other fails with OutputError."""
    k = moment(run_moments, force, position)
    out = tmp_path / "out"
    if force:
        old_output(model, out)
    outcome: dict[str, object] = {}

    def rival(i: int, _name: str) -> None:
        if i == k and "rival" not in outcome:
            outcome["rival"] = None
            try:
                convert(model, out, ConvertOptions(OLD, force=force))
                outcome["rival"] = "won"
            except OutputError as e:
                outcome["rival"] = str(e)

    moments.install(rival, monkeypatch.setattr)
    try:
        convert(model, out, ConvertOptions(NEW, force=force))
        outcome["first"] = "won"
    except OutputError as e:
        outcome["first"] = str(e)
    monkeypatch.undo()
    winners = [who for who in ("first", "rival") if outcome.get(who) == "won"]
    results = {"first": reference[NEW], "rival": reference[OLD]}
    if force:  # --force asks to replace: both may win one after the other, never at once
        assert winners and file_bytes(out) in [results[w] for w in winners], outcome
    else:
        assert len(winners) == 1, outcome
        assert file_bytes(out) == results[winners[0]], outcome
    for who in ("first", "rival"):
        if outcome.get(who) not in (None, "won"):
            assert any(s in outcome[who] for s in ("another npuconv run", "already exists", "while converting")), outcome
    assert not leftovers(out)


@pytest.mark.parametrize("position", range(20))
def test_a_directory_created_at_out_at_any_moment_is_never_clobbered(model, reference, run_moments, tmp_path, position, monkeypatch):
    k = moment(run_moments, False, position)
    out = tmp_path / "out"
    created = []

    def someone_else(i: int, _name: str) -> None:
        if i == k and not os.path.lexists(out):
            out.mkdir()
            (out / "thesis.tex").write_text("mine")
            created.append(i)

    moments.install(someone_else, monkeypatch.setattr)
    try:
        convert(model, out, ConvertOptions(NEW))
        error = None
    except OutputError as e:
        error = str(e)
    monkeypatch.undo()
    if created:
        assert error is not None and ("already exists" in error or "while converting" in error), error
        assert file_bytes(out) == {"thesis.tex": b"mine"}
    else:  # OUT was published before moment k
        assert error is None and file_bytes(out) == reference[NEW]
    assert not leftovers(out)


@pytest.mark.parametrize("position", range(20))
def test_force_refuses_an_output_replaced_by_user_data_at_any_moment(model, reference, run_moments, tmp_path, position, monkeypatch):
    """Under --force, OUT swapped for a user's directory mid-run is never replaced."""
    k = moment(run_moments, True, position)
    out = tmp_path / "out"
    old_output(model, out)
    swapped = []

    def swap_in_user_data(i: int, _name: str) -> None:
        if i == k and not swapped and (out / "npuconv.json").is_file() and json.loads((out / "npuconv.json").read_text())["target"] == OLD:
            shutil.rmtree(out)
            out.mkdir()
            (out / "thesis.tex").write_text("mine")
            swapped.append(i)

    moments.install(swap_in_user_data, monkeypatch.setattr)
    try:
        convert(model, out, ConvertOptions(NEW, force=True))
        error = None
    except OutputError as e:
        error = str(e)
    monkeypatch.undo()
    if swapped and file_bytes(out) != reference[NEW]:
        assert error is not None, "the user's directory was replaced"
        assert file_bytes(out) == {"thesis.tex": b"mine"}
    else:
        assert error is None and file_bytes(out) == reference[NEW]
    assert not leftovers(out)


STOP_AT_FIRST_WRITE = """
import os, signal, sys
from npuconv.io import safetensors_io
write = safetensors_io.StreamingWriter.write
def stop_once(self, *args):
    if not getattr(stop_once, "done", False):
        stop_once.done = True
        os.kill(os.getpid(), signal.SIGSTOP)
    return write(self, *args)
safetensors_io.StreamingWriter.write = stop_once
sys.argv = ["npuconv", *sys.argv[1:]]
from npuconv.__main__ import main
main()
"""


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_two_real_processes_to_one_out_exactly_one_wins(model, reference, tmp_path):
    """The lock is a real flock between processes: the first run is stopped in the middle of writing
    while a second one runs to the end (no --force): the second exits 2, the first publishes."""
    import time

    out = tmp_path / "out"
    args = ["convert", str(model), str(out), "-q", "--to"]
    first = subprocess.Popen([sys.executable, "-c", STOP_AT_FIRST_WRITE, *args, NEW], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=process_env())
    deadline = time.monotonic() + 120
    while not stopped(first.pid):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    try:
        second = subprocess.run([sys.executable, "-m", "npuconv", *args, OLD], capture_output=True, text=True,
                                env=process_env(), timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    clean_error(second.returncode, second.stdout, second.stderr, ("another npuconv run",))
    assert file_bytes(out) == reference[NEW]
    assert not leftovers(out)


# ================================================================================ leftovers and markers
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_container(out: Path, suffix: str, owner: dict | None, content: str = "partial shard") -> Path:
    container = out.parent / f".{out.name}.npuconv-tmp-{suffix}"
    (container / "build").mkdir(parents=True)
    (container / "build" / "model.safetensors").write_text(content)
    if owner is not None:
        (container / "owner.json").write_text(json.dumps(owner))
    return container


def test_a_later_run_removes_only_its_own_abandoned_temporary_directories(model, reference, tmp_path):
    out = tmp_path / "out"
    from npuconv.io import publish

    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "start": publish._process_start(os.getpid())}
    abandoned = make_container(out, "dead", {"pid": dead_pid(), "host": host, "start": 1})
    reused = make_container(out, "reused", {**me, "start": (me["start"] or 0) + 12345})  # our pid, another start: reused
    kept = {
        "unmarked": make_container(out, "user", None, "not npuconv's"),
        "live": make_container(out, "live", me),
        "other-host": make_container(out, "remote", {"pid": dead_pid(), "host": host + "-elsewhere", "start": 1}),
        "garbled": make_container(out, "garbled", None),
    }
    (kept["garbled"] / "owner.json").write_text("{not json")
    before = {name: tree_state(path) for name, path in kept.items()}
    convert(model, out, ConvertOptions(NEW))
    assert not abandoned.exists() and not reused.exists()
    assert {name: tree_state(path) for name, path in kept.items()} == before
    assert file_bytes(out) == reference[NEW]


def test_an_interrupted_fallback_swap_puts_the_previous_output_back(model, reference, tmp_path):
    """Fallback swap (no renameat2) killed between its renames: the next run restores OUT first."""
    out = tmp_path / "out"
    old_output(model, out)
    container = make_container(out, "swap", {"pid": dead_pid(), "host": socket.gethostname(), "start": 1})
    out.rename(container / "old")
    cli_error(run_cli("convert", model, out, "--to", NEW), ("already exists",))  # the previous output is back, kept
    assert file_bytes(out) == reference[OLD]
    assert not leftovers(out)


@pytest.mark.parametrize("force", [False, True])
def test_portable_fallback_publishes_and_never_replaces_data(model, reference, tmp_path, monkeypatch, force):
    from npuconv.io import publish

    monkeypatch.setattr(publish, "_RENAMEAT2", None)
    out = tmp_path / "out"
    if force:
        old_output(model, out)
    convert(model, out, ConvertOptions(NEW, force=force))
    assert file_bytes(out) == reference[NEW]
    assert not leftovers(out)

    other = tmp_path / "other"

    def appear(i: int, name: str) -> None:
        if name == "before renameat2" and not other.exists():
            other.mkdir()
            (other / "thesis.tex").write_text("mine")

    with pytest.MonkeyPatch.context() as patch:
        moments.install(appear, patch.setattr)
        with pytest.raises(OutputError, match="while converting"):
            convert(model, other, ConvertOptions(NEW))
    assert file_bytes(other) == {"thesis.tex": b"mine"}
    assert not leftovers(other)


def test_sigkill_leftovers_are_removed_by_the_next_run(model, reference, tmp_path):
    """A killed run cannot clean up; the next run to the same OUT removes its container (and lock file)."""
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from npuconv import interrupts\nfrom npuconv.io import safetensors_io\n"
        "interrupts.install()\n"
        "write = safetensors_io.StreamingWriter.write\n"
        "def die(self, *a):\n"
        "    write(self, *a)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "safetensors_io.StreamingWriter.write = die\n"
        "from npuconv.convert import convert, ConvertOptions\n"
        f"convert({str(model)!r}, {str(out)!r}, ConvertOptions({NEW!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and leftovers(out)
    convert(model, out, ConvertOptions(NEW))
    assert file_bytes(out) == reference[NEW]
    assert not leftovers(out)


# ============================================================================================= zoo
def test_zoo_outputs_that_alias_one_directory_are_refused(model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "out")
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(
        f"[defaults]\ntarget = 'float'\n[[model]]\nsource = '{model}'\noutput = 'out/m'\n"
        f"[[model]]\nsource = '{model}'\noutput = 'alias/m'\n"
    )
    cli_error(run_cli("zoo", zoo, "--jobs", "2"), ("is also the output of model[0]",))
    assert_no_output(tmp_path / "out" / "m")
