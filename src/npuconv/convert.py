"""Conversion orchestration: source → reader → plan (validated up front) → writer → atomic output.

Library API (the CLI is a thin shell over it)::

    from npuconv.convert import ConvertOptions, convert
    report = convert("org/model", "out_dir", ConvertOptions(target="npu-int4"))

Order of work: open and detect the source, plan every layer with the writer (kernel limits are
checked here, before anything is written), split into shards, then stream layer by layer into a
temporary directory that is renamed onto OUT at the end (see :mod:`npuconv.output`).
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

import npuconv
from npuconv.checkpoint import Checkpoint
from npuconv.errors import InputError, OutputError, UnsupportedError
from npuconv.fingerprint import source_fingerprint
from npuconv.model import LinearSpec, spec_to_dict
from npuconv.output import (
    DEFAULT_MAX_SHARD,
    MANIFEST,
    AtomicDirectory,
    Shard,
    Unit,
    index_json,
    plan_shards,
    write_json,
    write_shards,
)
from npuconv.readers import open_reader
from npuconv.readers.base import Reader
from npuconv.source import open_source
from npuconv.writers import Writer, WriterOptions, writer_class



@dataclass(frozen=True)
class ConvertOptions:
    target: str
    writer: WriterOptions = field(default_factory=WriterOptions)
    max_shard_bytes: int = DEFAULT_MAX_SHARD
    force: bool = False
    dry_run: bool = False
    workers: int | None = None  # threads producing layers ahead of the writer (0: none; None: default_workers())
    hash_source: bool = False  # record the sha256 of every source file in the manifest (zoo mode)


@dataclass
class ConversionPlan:
    checkpoint: Checkpoint
    reader: Reader
    writer: Writer
    layers: list[LinearSpec]
    shards: list[Shard]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def describe(self) -> dict:
        """Machine-readable plan (``--dry-run``)."""
        return {
            "source": self.checkpoint.source_id,
            "source_format": self.reader.format,
            "target": self.writer.target,
            "layers": [
                {"name": s.name, "scheme": s.scheme, **self.writer.layer_manifest(s)} for s in self.layers
            ],
            "shards": [
                {"file": s.filename, "bytes": s.nbytes, "tensors": len(s.plans)} for s in self.shards
            ],
            "total_bytes": self.total_bytes,
            "warnings": self.reader.warnings + self.writer.warnings,
        }


def make_plan(checkpoint: Checkpoint, options: ConvertOptions) -> ConversionPlan:
    """Detect the format, plan every tensor of the output and check every layer against the target."""
    reader = open_reader(checkpoint)
    writer_options = options.writer
    if writer_options.model_dtype is None:
        writer_options = replace(writer_options, model_dtype=config_dtype(checkpoint.config))
    writer = writer_class(options.target)(writer_options)
    prepare = getattr(reader, "prepare_for_target", None)
    if prepare is not None:  # float sources: offline quantization for targets that have a recipe
        prepare(writer.target)
    layers = reader.linear_specs()
    units: list[Unit] = []
    for spec in layers:
        reason = writer.unsupported_reason(spec)
        if reason:
            raise UnsupportedError(f"layer '{spec.name}' ({spec.scheme}) cannot be written as {writer.target}: {reason}")
        units.append(Unit(writer.plan_layer(spec), _layer_producer(reader, writer, spec), spec.name))
    for name in reader.passthrough_names():
        info = checkpoint.info(name)
        units.append(Unit([writer.plan_passthrough(info)], _passthrough_producer(checkpoint, writer, name), name))
    _check_unique_names(units)
    shards = plan_shards(units, options.max_shard_bytes, writer.weight_prefix)
    return ConversionPlan(checkpoint, reader, writer, layers, shards)


def convert(
    model: str | Path,
    out: str | Path,
    options: ConvertOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Convert MODEL into OUT; returns a report dict (and writes nothing on ``dry_run``)."""
    started = time.perf_counter()
    checkpoint = open_source(model)
    out = Path(out)
    if not options.dry_run:
        _check_paths(checkpoint.root, out)
        _check_replaceable(out, options.force)
    plan = make_plan(checkpoint, options)
    report = {"plan": plan.describe()}
    if options.dry_run:
        return report
    total = plan.total_bytes
    done = 0

    def advance(unit: Unit) -> None:
        nonlocal done
        done += unit.nbytes
        if on_progress:
            on_progress(done, total)

    workers = default_workers() if options.workers is None else options.workers
    with AtomicDirectory(out, force=options.force) as tmp, _intra_op_threads(workers):
        digests = write_shards(tmp, plan.shards, advance, workers)
        index = index_json(plan.shards, plan.writer.weight_prefix)
        if index:
            write_json(tmp / index[0], index[1])
        manifest = build_manifest(plan, options, digests)
        try:
            _finish_output(tmp, checkpoint, plan, manifest)
        except OSError as e:
            raise OutputError(f"{out}: write failed: {e.filename or ''} {e.strerror or e}".strip()) from None
    report.update(
        {
            "output": str(out),
            "seconds": round(time.perf_counter() - started, 3),
            "bytes_in": checkpoint.total_bytes,
            "bytes_out": total,
            "warnings": plan.reader.warnings + plan.writer.warnings,
        }
    )
    return report


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Producer threads for ``convert``: one per core beside the writing thread (at least 1, at most
    :data:`MAX_DEFAULT_WORKERS`). Memory does not grow with it: the producer queue is bounded by
    bytes (:func:`npuconv.output.write_shards`)."""
    return max(1, min(usable_cores() - 1, MAX_DEFAULT_WORKERS))


MAX_DEFAULT_WORKERS = 16


@contextmanager
def _intra_op_threads(workers: int):
    """With several producer threads, give each torch op fewer threads, so that ``workers`` threads
    each running a multi-threaded op do not oversubscribe the cores (restored afterwards)."""
    before = torch.get_num_threads()
    if workers >= 2:
        torch.set_num_threads(max(1, usable_cores() // (workers + 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finish_output(directory: Path, checkpoint: Checkpoint, plan: ConversionPlan, manifest: dict) -> None:
    """Everything after the shards: side files, config.json, the writer's extra files, npuconv.json."""
    _copy_side_files(checkpoint, plan.reader, directory)
    write_json(directory / "config.json", plan.writer.update_config(checkpoint.config, manifest))
    for filename, value in plan.writer.extra_files(manifest).items():
        if isinstance(value, str):  # already serialized by the writer (e.g. a format's own key order)
            (directory / filename).write_text(value, encoding="utf-8")
        else:
            write_json(directory / filename, value)
    write_json(directory / MANIFEST, manifest)


def build_manifest(plan: ConversionPlan, options: ConvertOptions, digests: dict[str, str]) -> dict:
    """``npuconv.json``: what was converted, how, and a checksum of every shard.

    ``source_fingerprint`` (see :mod:`npuconv.fingerprint`) together with ``npuconv_version``,
    ``target`` and ``options`` is what ``npuconv zoo`` compares to skip an up-to-date output.
    """
    return {
        "npuconv_version": npuconv.__version__,
        "target": plan.writer.target,
        "source": {
            "id": plan.checkpoint.source_id,
            "revision": plan.checkpoint.revision,
            "format": plan.reader.format,
            **{k: v for k, v in plan.reader.summary().items() if isinstance(v, (str, int, float, bool))},
        },
        "source_fingerprint": source_fingerprint(plan.checkpoint, options.hash_source),
        "options": manifest_options(options),
        "layers": {
            spec.name: {**plan.writer.layer_manifest(spec), "spec": spec_to_dict(spec)} for spec in plan.layers
        },
        "shards": digests,
    }


def manifest_options(options: ConvertOptions) -> dict:
    """The conversion options as recorded in ``npuconv.json`` (``options``)."""
    writer_options = options.writer
    return {
        "dtype": str(writer_options.dtype).removeprefix("torch.") if writer_options.dtype else None,
        "nz": writer_options.nz,
        "mx_layout": writer_options.mx_layout,
        "max_shard_bytes": options.max_shard_bytes,
    }


def config_dtype(config: dict) -> torch.dtype | None:
    """The model's activation dtype from config.json (``torch_dtype`` or transformers 5 ``dtype``)."""
    name = config.get("torch_dtype") or config.get("dtype")
    if not name and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("torch_dtype") or config["text_config"].get("dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None


def _layer_producer(reader: Reader, writer: Writer, spec: LinearSpec):
    def produce() -> dict[str, torch.Tensor]:
        return writer.write_layer(reader.load(spec))

    return produce


def _passthrough_producer(checkpoint: Checkpoint, writer: Writer, name: str):
    def produce() -> dict[str, torch.Tensor]:
        return {name: writer.write_passthrough(name, checkpoint.get(name))}

    return produce


def _check_unique_names(units: list[Unit]) -> None:
    seen: set[str] = set()
    for unit in units:
        for plan in unit.plans:
            if plan.name in seen:
                raise InputError(f"output tensor '{plan.name}' would be written twice (a quantized layer and a float tensor share it)")
            seen.add(plan.name)


def _check_paths(source: Path, out: Path) -> None:
    src = Path(os.path.realpath(source))
    dst = Path(os.path.realpath(out))
    if dst == src or src in dst.parents:
        raise InputError(f"{out}: the output must not be the model directory or inside it")
    if dst in src.parents:
        raise InputError(f"{out}: the output must not contain the model directory")


def _check_replaceable(out: Path, force: bool) -> None:
    """``--force`` replaces an earlier output, never an unrelated directory (or one holding other data)."""
    if force and out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OutputError(f"{out}: exists and is not an npuconv output (no {MANIFEST}); refusing to replace it")


def _copy_side_files(checkpoint: Checkpoint, reader: Reader, directory: Path) -> None:
    """Copy config/tokenizer/etc.; skip config.json (rewritten) and the source format's own side files."""
    skip = {"config.json", *reader.consumed_files()}
    for path in checkpoint.side_files():
        rel = path.relative_to(checkpoint.root)
        if str(rel) in skip:
            continue
        dest = directory / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
