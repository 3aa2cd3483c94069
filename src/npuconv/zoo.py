"""Model-zoo mode: convert many checkpoints in one run, skip the outputs that are up to date, report as JSON.

A zoo file is TOML (``tomllib``; on Python 3.10 the ``tomli`` package if installed)::

    [defaults]                      # optional; applies to every [[model]] that does not set the key
    target = "npu-int4"
    verify = true

    [[model]]
    source = "./checkpoints/llama-gptq"    # local dir (relative to this file) or org/name[@revision]
    output = "out/llama-npu"               # relative to this file
    name = "llama"                         # optional label (default: output as written)

    [[model]]
    source = "org/qwen-w8a8@0123abcd…"
    output = "out/qwen-npu"
    target = "npu-w8a8"
    nz = false                             # also: dtype, mx_layout, max_shard_size

Keys (per ``[[model]]``; all but ``source``/``output``/``name`` may also be in ``[defaults]``):
``source`` and ``output`` (required), ``name``, ``target`` (default ``npu``, as ``convert``),
``nz`` (bool; default: the target's), ``dtype`` (``float32|bfloat16|float16``, float target),
``mx_layout`` (``vllm-ascend|sglang``), ``max_shard_size`` (``"5GB"`` or an integer of bytes),
``verify`` (bool, default false), ``model`` (bool, default false: also run the whole-model parity
check, ``npuconv verify OUT --model``, which needs ``npuconv[model]``). Unknown keys are errors. There is no ``layers_skip``:
conversion always writes every quantized linear of a model (``npuconv convert`` has no per-layer
skip either).

Each entry runs in a fresh worker process (forkserver where available, else spawn), at most
``jobs`` at a time; see :func:`run_zoo` for statuses and the report, and docs/ci.md.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import npuconv
from npuconv.errors import InputError, NpuconvError
from npuconv.io.fingerprint import check_output
from npuconv.io.source import looks_like_hub_id
from npuconv.io.output import DEFAULT_MAX_SHARD, MANIFEST

ENTRY_ONLY_KEYS = ("source", "output", "name")
OPTION_KEYS = ("target", "nz", "dtype", "mx_layout", "max_shard_size", "verify", "model")
DTYPES = ("float32", "bfloat16", "float16")
MX_LAYOUTS = ("vllm-ascend", "sglang")
STATUSES = ("converted", "skipped", "failed", "verify-failed", "not-run")
DRY_RUN_STATUSES = ("would-convert", "would-skip", "failed")
EXIT_INTERNAL = 3
DEFAULT_TARGET = "npu"  # as `npuconv convert` without --to
PROGRESS_INTERVAL = 1.0  # seconds between a worker's progress messages
HEARTBEAT = 30.0  # default seconds between "still running" events of a long entry


class ZooFileError(InputError):
    """The zoo file cannot be read or is invalid (exit code 2, nothing is run)."""


@dataclass(frozen=True)
class ZooEntry:
    index: int  # position in the zoo file, 0-based
    name: str
    source: str  # absolute local path, or a Hub id org/name[@revision]
    output: Path  # absolute
    output_key: str  # output as written in the zoo file (what --shard-by hash hashes)
    target: str
    nz: bool | None = None
    dtype: str | None = None
    mx_layout: str = "vllm-ascend"
    max_shard_bytes: int = DEFAULT_MAX_SHARD
    verify: bool = False
    model: bool = False  # whole-model parity (npuconv.parity) after conversion

    def convert_options(self, force: bool = False, dry_run: bool = False):
        import torch

        from npuconv.convert import ConvertOptions
        from npuconv.writers import WriterOptions

        writer = WriterOptions(dtype=getattr(torch, self.dtype) if self.dtype else None, nz=self.nz, mx_layout=self.mx_layout)
        return ConvertOptions(self.target, writer, self.max_shard_bytes, force=force, dry_run=dry_run, hash_source=True)


# ------------------------------------------------------------------------------------ zoo file
def _toml_module():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ZooFileError(
                "reading a zoo file needs Python >= 3.11 (tomllib) or, on Python 3.10, the tomli package "
                "(pip install tomli)"
            ) from None
    return tomllib


def load_zoo(path: str | Path) -> list[ZooEntry]:
    """Parse and validate a zoo file; every problem is a one-line :class:`ZooFileError`."""
    from npuconv.io.output import parse_size
    from npuconv.registry import target_names

    path = Path(path)
    tomllib = _toml_module()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooFileError(f"{path}: no such zoo file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ZooFileError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ZooFileError(f"{path}: invalid TOML: {e}") from None
    unknown = sorted(set(data) - {"defaults", "model"})
    if unknown:
        raise ZooFileError(f"{path}: unknown top-level key {unknown[0]!r} (expected a 'defaults' table and 'model' entries)")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ZooFileError(f"{path}: 'defaults' must be a table")
    models = data.get("model")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise ZooFileError(f"{path}: no models: add one 'model' entry (an array-of-tables item) per checkpoint, with source, output and target")
    _check_keys(path, "defaults", defaults, OPTION_KEYS)
    base = path.resolve().parent
    entries: list[ZooEntry] = []
    seen: dict[Path, int] = {}
    for i, raw in enumerate(models):
        where = f"model[{i}]"
        _check_keys(path, where, raw, ENTRY_ONLY_KEYS + OPTION_KEYS)
        merged = {**defaults, **raw}

        def get(key: str, kind: type | tuple, required: bool = False, choices: tuple = ()):
            value = merged.get(key)
            if value is None:
                if required:
                    raise ZooFileError(f"{path}: {where}: missing {key!r}")
                return None
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ZooFileError(f"{path}: {where}: {key!r} must be a {names}, got {value!r}")
            if choices and value not in choices:
                raise ZooFileError(f"{path}: {where}: {key} {value!r} is not one of {', '.join(choices)}")
            return value

        source_text = get("source", str, required=True)
        output_text = get("output", str, required=True)
        target = get("target", str, choices=tuple(sorted(target_names()))) or DEFAULT_TARGET
        if not source_text.strip() or not output_text.strip():
            raise ZooFileError(f"{path}: {where}: 'source' and 'output' must not be empty")
        local = base / Path(source_text).expanduser()
        # an existing path (relative to the zoo file) wins; otherwise org/name[@rev] is a Hub id
        source = str(local) if local.exists() or not looks_like_hub_id(source_text) else source_text
        output = Path(os.path.abspath(base / Path(output_text).expanduser()))
        real = Path(os.path.realpath(output))  # two spellings of one directory (a symlink alias) are one output
        if real in seen:
            raise ZooFileError(f"{path}: {where}: output {output_text!r} is also the output of model[{seen[real]}]")
        seen[real] = i
        size = get("max_shard_size", (str, int))
        try:
            max_shard_bytes = DEFAULT_MAX_SHARD if size is None else parse_size(size) if isinstance(size, str) else int(size)
        except InputError as e:
            raise ZooFileError(f"{path}: {where}: max_shard_size: {e}") from None
        if max_shard_bytes <= 0:
            raise ZooFileError(f"{path}: {where}: max_shard_size must be positive")
        entries.append(
            ZooEntry(
                index=i,
                name=get("name", str) or output_text,
                source=source,
                output=output,
                output_key=Path(output_text).as_posix(),
                target=target,
                nz=get("nz", bool),
                dtype=get("dtype", str, choices=DTYPES),
                mx_layout=get("mx_layout", str, choices=MX_LAYOUTS) or "vllm-ascend",
                max_shard_bytes=max_shard_bytes,
                verify=bool(get("verify", bool)),
                model=bool(get("model", bool)),
            )
        )
    return entries


def _check_keys(path: Path, where: str, table: dict, allowed: tuple) -> None:
    for key in table:
        if key not in allowed:
            raise ZooFileError(f"{path}: {where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → ``(2, 4)``; 1 ≤ i ≤ n."""
    i, sep, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = (0, 0)
    if not sep or not 1 <= shard[0] <= shard[1]:
        raise InputError(f"--shard: expected i/n with 1 <= i <= n (e.g. 1/4), got {text!r}")
    return shard


def select_shard(entries: list[ZooEntry], shard: tuple[int, int] | None, by: str = "index") -> list[ZooEntry]:
    """The entries of shard i of n: by ``index`` (position ≡ i−1 mod n) or by ``hash`` of the output as written."""
    if shard is None:
        return list(entries)
    i, n = shard

    def bucket(entry: ZooEntry) -> int:
        if by == "hash":
            return int.from_bytes(hashlib.sha256(entry.output_key.encode("utf-8")).digest()[:8], "big") % n
        return entry.index % n

    return [e for e in entries if bucket(e) == i - 1]


# ------------------------------------------------------------------------------------ one entry
def _result(entry: ZooEntry, status: str, **values) -> dict:
    return {
        "index": entry.index,
        "name": entry.name,
        "source": entry.source,
        "output": str(entry.output),
        "target": entry.target,
        "status": status,
        "reason": values.get("reason", ""),
        "seconds": values.get("seconds", 0.0),
        "bytes_in": values.get("bytes_in", 0),
        "bytes_out": values.get("bytes_out", 0),
        "peak_rss_bytes": values.get("peak_rss_bytes"),
        "error": values.get("error"),
        "exit_code": values.get("exit_code", 0),
        "verify": values.get("verify"),
        "model": values.get("model"),
        "warnings": values.get("warnings", []),
    }


def _error_text(error: BaseException) -> tuple[str, int]:
    if isinstance(error, NpuconvError):
        return " ".join(str(error).split()), error.exit_code
    return " ".join(f"internal error: {type(error).__name__}: {error}".split()), EXIT_INTERNAL


def run_entry(
    entry: ZooEntry, force: bool = False, dry_run: bool = False, on_progress: Callable[[int, int], None] | None = None
) -> dict:
    """Check, convert (unless up to date) and optionally verify one entry; never raises (but KeyboardInterrupt).

    With ``dry_run`` the conversion is only planned (status ``would-skip`` / ``would-convert``)
    and nothing is verified or written. ``on_progress(bytes_done, bytes_total)``: as ``convert``'s.
    """
    from npuconv.convert import convert, manifest_options

    started = time.perf_counter()
    values: dict = {}
    try:
        options = entry.convert_options(force=True, dry_run=dry_run)
        freshness = check_output(entry.output, entry.source, entry.target, manifest_options(options))
        if freshness.up_to_date and not force:
            status = "would-skip" if dry_run else "skipped"
            values["reason"] = freshness.reason
        else:
            values["reason"] = "forced" if force else freshness.reason
            report = convert(entry.source, entry.output, options, on_progress)
            if dry_run:
                status = "would-convert"
                values.update(bytes_out=report["plan"]["total_bytes"], warnings=report["plan"]["warnings"])
            else:
                status = "converted"
                values.update(bytes_in=report["bytes_in"], bytes_out=report["bytes_out"], warnings=report["warnings"])
    except Exception as e:
        values["error"], values["exit_code"] = _error_text(e)
        status = "failed"
    if status != "failed" and entry.verify and not dry_run:
        status = _verify_entry(entry, values, status)
    if status not in ("failed", "verify-failed") and entry.model and not dry_run:
        status = _model_entry(entry, values, status)
    values["seconds"] = round(time.perf_counter() - started, 3)
    return _result(entry, status, **values)


def _verify_entry(entry: ZooEntry, values: dict, status: str) -> str:
    """Verify the output (converted or skipped alike); STATUS stays, or becomes ``verify-failed``."""
    from npuconv.verify import VerifyOptions, verify

    report = _check(values, "verify", lambda: verify(entry.output, VerifyOptions(source=_converted_source(entry))))
    if report is None:
        return "verify-failed"
    values["verify"] = {k: report[k] for k in ("ok", "passed", "failed", "skipped", "backend", "seconds")}
    if report["ok"]:
        return status
    if not report["failed"]:  # nothing could be checked
        values.update(error=f"verify: {report['error']}", exit_code=report["exit_code"])
        return "verify-failed"
    worst = next(layer for layer in report["layers"] if layer["status"] == "fail")
    values.update(
        error=f"verify: {report['failed']} of {report['passed'] + report['failed']} layers failed "
        f"(worst {worst['name']}: rel L2 {worst['rel_l2']}, cosine {worst['cosine']}{', ' + worst['note'] if worst['note'] else ''})",
        exit_code=1,
    )
    return "verify-failed"


def _model_entry(entry: ZooEntry, values: dict, status: str) -> str:
    """Whole-model parity of the output; STATUS stays, or becomes ``verify-failed``."""
    from npuconv.parity import ParityOptions, check_model, parity_summary

    report = _check(values, "model", lambda: check_model(entry.output, ParityOptions(source=_converted_source(entry))))
    if report is None:
        return "verify-failed"
    values["model"] = {k: report.get(k) for k in ("ok", "family", "metrics", "decode", "problems", "seconds")}
    if report["ok"]:
        return status
    values.update(error=f"verify --model: {parity_summary(report)}", exit_code=1)
    return "verify-failed"


def _check(values: dict, key: str, run: Callable[[], dict]) -> dict | None:
    """Run a check; on an error record it under ``key`` (exit code 1) and return None."""
    try:
        return run()
    except Exception as e:
        message, _ = _error_text(e)
        label = "verify" if key == "verify" else "verify --model"
        values.update(error=f"{label}: {message}", exit_code=1, **{key: {"ok": False, "error": message}})
        return None


def _converted_source(entry: ZooEntry) -> str:
    """The source to check an output against: for a Hub source the commit converted, not where a branch is now."""
    fingerprint = _read_manifest(entry.output).get("source_fingerprint") or {}
    if fingerprint.get("kind") == "hub" and fingerprint.get("repo") and fingerprint.get("commit"):
        return f"{fingerprint['repo']}@{fingerprint['commit']}"
    return entry.source


def _read_manifest(output: Path) -> dict:
    try:
        value = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _peak_rss_bytes() -> int | None:
    """High-water resident set size of this process (getrusage RUSAGE_SELF; KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _worker(entry: ZooEntry, force: bool, env: dict, threads: int | None, conn) -> None:
    """Body of a worker process: run one entry and send its result back."""
    os.environ.clear()
    os.environ.update(env)  # the zoo command's environment now, not the forkserver's at its start
    from npuconv import interrupts
    from npuconv.memory import tune_allocator

    interrupts.install()  # SIGINT / SIGTERM / SIGHUP: clean up the entry's temporary output, then report
    tune_allocator()  # what `npuconv convert` does at start (glibc only)
    if threads:
        import torch

        torch.set_num_threads(threads)
    last = 0.0

    def progress(done: int, total: int) -> None:  # at most one message a second to the parent
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL or done == total:
            last = now
            conn.send(("progress", done, total))

    try:
        result = run_entry(entry, force, on_progress=progress)
    except (KeyboardInterrupt, interrupts.Interrupted) as e:
        result = _result(entry, "failed", error=str(e) or "interrupted", exit_code=getattr(e, "exit_code", 130))
    result["peak_rss_bytes"] = _peak_rss_bytes()
    conn.send(result)
    conn.close()


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # the server imports npuconv (and torch) once; each worker is a cheap fork of it
        context.set_forkserver_preload(["npuconv.zoo", "npuconv.convert", "npuconv.verify", "npuconv.cli"])
        return context
    return multiprocessing.get_context("spawn")


@dataclass
class _Running:
    entry: ZooEntry
    process: object
    conn: object
    started: float
    result: dict | None = None
    conn_open: bool = True
    progress: tuple[int, int] | None = None  # latest (bytes done, bytes total) of the conversion


@dataclass(frozen=True)
class ZooOptions:
    force: bool = False
    fail_fast: bool = False
    jobs: int = 1
    dry_run: bool = False
    shard: tuple[int, int] | None = None
    shard_by: str = "index"
    heartbeat: float = HEARTBEAT  # seconds between "running" events of each entry still running (0: none)


# ("start" | "running" | "done", entry, result on "done" / {"seconds", "done", "total"} on "running")
Event = Callable[[str, ZooEntry, dict | None], None]


def _run_workers(entries: list[ZooEntry], options: ZooOptions, on_event: Event | None) -> dict[int, dict]:
    from multiprocessing.connection import wait

    context = _context()
    pending = deque(entries)
    running: list[_Running] = []
    results: dict[int, dict] = {}
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // options.jobs) if options.jobs > 1 else None
    stop = False
    beat = time.perf_counter()
    try:
        while pending or running:
            while pending and not stop and len(running) < options.jobs:
                entry = pending.popleft()
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker, args=(entry, options.force, env, threads, send), name=f"npuconv-zoo-{entry.index}", daemon=True
                )
                process.start()
                send.close()
                running.append(_Running(entry, process, receive, time.perf_counter()))
                if on_event:
                    on_event("start", entry, None)
            if stop:
                for entry in pending:
                    results[entry.index] = _result(entry, "not-run", reason="--fail-fast: an earlier entry failed")
                pending.clear()
            if not running:
                break
            timeout = max(0.0, beat + options.heartbeat - time.perf_counter()) if options.heartbeat > 0 else None
            ready = set(wait([r.conn for r in running if r.conn_open] + [r.process.sentinel for r in running], timeout))
            if options.heartbeat > 0 and time.perf_counter() >= beat + options.heartbeat:
                beat = time.perf_counter()
                for run in running:
                    if on_event:
                        done, total = run.progress or (0, 0)
                        on_event("running", run.entry, {"seconds": round(beat - run.started, 1), "done": done, "total": total})
            for run in list(running):
                if run.conn_open and run.conn in ready:
                    _receive(run)
                if run.process.sentinel not in ready:
                    continue
                run.process.join()
                while run.conn_open and run.conn.poll():
                    _receive(run)
                run.conn.close()
                running.remove(run)
                result = run.result or _result(
                    run.entry,
                    "failed",
                    error=_death(run.process.exitcode),
                    exit_code=EXIT_INTERNAL,
                    seconds=round(time.perf_counter() - run.started, 3),
                )
                results[run.entry.index] = result
                if on_event:
                    on_event("done", run.entry, result)
                if options.fail_fast and result["status"] in ("failed", "verify-failed"):
                    stop = True
    finally:
        for run in running:  # interrupted: workers got SIGINT too and clean up; give them a moment
            run.process.join(timeout=10)
            if run.process.is_alive():
                run.process.terminate()
                run.process.join()
    return results


def _receive(run: _Running) -> None:
    """One message of a worker: a ``("progress", done, total)`` tuple, or its result (then the pipe is done)."""
    try:
        message = run.conn.recv()
    except (EOFError, OSError):
        run.conn_open = False
        return
    if isinstance(message, tuple) and message and message[0] == "progress":
        run.progress = (message[1], message[2])
        return
    run.result = message
    run.conn_open = False


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode} without a result"


# ------------------------------------------------------------------------------------ the run
def run_zoo(
    entries: list[ZooEntry],
    options: ZooOptions,
    on_event: Event | None = None,
    zoo_file: str | Path | None = None,
    zoo_entries: int | None = None,
) -> dict:
    """Run the (already shard-selected) entries; returns the report (see docs/ci.md for its schema).

    Statuses: ``converted``, ``skipped`` (output up to date), ``failed`` (conversion or its
    checks failed; ``error`` says why), ``verify-failed`` (``verify = true`` and verification
    failed), ``not-run`` (after a failure with ``fail_fast``); with ``dry_run``: ``would-convert``,
    ``would-skip``, ``failed``. Exit code: the worst entry's (0 for converted/skipped/not-run and
    the would-* statuses, 1 for verify-failed, 2 for a failure on bad input, 3 for an internal
    error).
    """
    started = time.perf_counter()
    if options.dry_run:
        results = {}
        for entry in entries:
            if on_event:
                on_event("start", entry, None)
            results[entry.index] = run_entry(entry, options.force, dry_run=True)
            if on_event:
                on_event("done", entry, results[entry.index])
    else:
        results = _run_workers(entries, options, on_event)
    ordered = [results[e.index] for e in entries if e.index in results]
    statuses = DRY_RUN_STATUSES if options.dry_run else STATUSES
    peaks = [r["peak_rss_bytes"] for r in ordered if r["peak_rss_bytes"] is not None]
    exit_code = max((r["exit_code"] for r in ordered), default=0)
    return {
        "npuconv_version": npuconv.__version__,
        "zoo": str(zoo_file) if zoo_file is not None else None,
        "zoo_entries": zoo_entries if zoo_entries is not None else len(entries),
        "shard": f"{options.shard[0]}/{options.shard[1]}" if options.shard else None,
        "shard_by": options.shard_by,
        "jobs": options.jobs,
        "force": options.force,
        "fail_fast": options.fail_fast,
        "dry_run": options.dry_run,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "entries": ordered,
        "totals": {
            "entries": len(ordered),
            **{status: sum(r["status"] == status for r in ordered) for status in statuses},
            "seconds": round(time.perf_counter() - started, 3),
            "bytes_in": sum(r["bytes_in"] for r in ordered),
            "bytes_out": sum(r["bytes_out"] for r in ordered),
            "peak_rss_bytes": max(peaks) if peaks else None,
        },
    }
