"""Conversion orchestration: source → reader → plan (validated up front) → writer → atomic output.

Library API (the CLI is a thin shell over it)::

    from npuconv.convert import ConvertOptions, convert
    report = convert("org/model", "out_dir", ConvertOptions(target="npu-int4"))

Order of work: open and detect the source, plan every layer with the writer (kernel limits are
checked here, before anything is written), split into shards, then stream layer by layer into a
temporary directory that is renamed onto OUT at the end. OUT is locked from planning to publishing;
``--dry-run`` makes the same checks on MODEL and OUT as a real run (see :mod:`npuconv.io.publish`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

import npuconv
from npuconv.io.checkpoint import Checkpoint, config_dtype
from npuconv.errors import InputError, OutputError, UnsupportedError
from npuconv.io.fingerprint import source_fingerprint
from npuconv.model import LinearSpec, spec_to_dict
from npuconv.io.output import (
    DEFAULT_MAX_SHARD,
    MANIFEST,
    Shard,
    Unit,
    index_json,
    plan_shards,
    write_json,
    write_shards,
)
from npuconv.io.publish import FILES_KEY, AtomicDirectory, check_target, output_files
from npuconv.readers import open_reader
from npuconv.readers.base import Reader
from npuconv.io.source import open_source
from npuconv.memory import usable_cores
from npuconv.registry import get_target, target_names
from npuconv.writers import Target, WriterOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertOptions:
    target: str
    writer: WriterOptions = field(default_factory=WriterOptions)
    max_shard_bytes: int = DEFAULT_MAX_SHARD
    force: bool = False
    dry_run: bool = False
    workers: int | None = None  # threads producing layers ahead of the writer (0: none; None: default_workers())
    hash_source: bool = False  # record the sha256 of every source file in the manifest (zoo mode)
    revision: str | None = None  # Hub revision of MODEL (same as MODEL@revision)
    #: write layer types that no serving engine loads (npuconv.engines.support); the CLI passes False
    #: unless --allow-unservable, so `npuconv convert --to modelslim` refuses them before writing
    allow_unservable: bool = True


@dataclass
class ConversionPlan:
    checkpoint: Checkpoint
    reader: Reader
    writer: Target
    layers: list[LinearSpec]
    shards: list[Shard]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def describe(self) -> dict:
        """Machine-readable plan (``--dry-run``); ``layer_targets``: layers per target (several for ``npu``)."""
        layers = [
            {"name": s.name, "scheme": s.scheme, **self.writer.layer_manifest(s), **self.reader.layer_report(s)}
            for s in self.layers
        ]
        return {
            "source": self.checkpoint.source_id,
            "source_format": self.reader.format,
            "target": self.writer.name,
            "layers": layers,
            "layer_targets": dict(Counter(layer.get("target", self.writer.name) for layer in layers)),
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
    writer = get_target(options.target, writer_options)
    if writer.offline_recipe is not None:  # float sources: offline quantization (others ignore it)
        reader.quantize_float_linears(writer.offline_recipe)
    layers = reader.linear_specs()
    writer.prepare(layers)
    check_fit(writer, layers)
    units: list[Unit] = []
    for spec in layers:
        if not options.allow_unservable:
            from npuconv.engines.support import unservable_reason

            reason = unservable_reason(writer, spec)
            if reason:
                raise UnsupportedError(f"layer '{spec.name}' ({spec.scheme}) as {writer.name}: {reason}")
        plans = writer.plan_layer(spec)
        cost = writer.production_cost(spec, sum(plan.nbytes for plan in plans))
        units.append(Unit(plans, _layer_producer(reader, writer, spec), spec.name, cost))
    for name in reader.passthrough_names():
        info = checkpoint.info(name)
        units.append(Unit([writer.plan_passthrough(info)], _passthrough_producer(checkpoint, writer, name), name))
    _check_unique_names(units)
    shards = plan_shards(units, options.max_shard_bytes, writer.weight_prefix)
    log.info(
        "%s: %s format, %d quantized layers, %d other tensors → %s, %d shard(s)",
        checkpoint.source_id, reader.format, len(layers), len(units) - len(layers), writer.name, len(shards),
    )
    return ConversionPlan(checkpoint, reader, writer, layers, shards)


def check_fit(target: Target, layers: list[LinearSpec]) -> None:
    """Every layer the target refuses, in one :class:`UnsupportedError`: grouped by scheme and
    reason (each group names all its layers), then the targets that would take every layer."""
    refused: dict[tuple[str, str], list[str]] = {}
    for spec in layers:
        reason = target.accepts(spec)
        if reason:
            refused.setdefault((spec.scheme, reason), []).append(spec.name)
    if not refused:
        return
    count = sum(len(names) for names in refused.values())
    groups = "; ".join(
        f"{scheme} ({reason}): {len(names)} layer{'s' if len(names) > 1 else ''} {', '.join(names)}"
        for (scheme, reason), names in refused.items()
    )
    fit = fitting_targets(layers, target.options)
    raise UnsupportedError(
        f"{count} of {len(layers)} quantized layers cannot be written as {target.name} — {groups}. "
        f"Targets that take every layer: {', '.join(fit) if fit else 'none'}"
    )


def fitting_targets(layers: list[LinearSpec], options: WriterOptions) -> list[str]:
    """The registered targets that accept every one of ``layers`` with these options."""
    fit = []
    for name in target_names():
        candidate = get_target(name, options)
        candidate.prepare(layers)
        if all(candidate.accepts(spec) is None for spec in layers):
            fit.append(name)
    return fit


def convert(
    model: str | Path,
    out: str | Path,
    options: ConvertOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Convert MODEL into OUT; returns a report dict (and writes nothing on ``dry_run``)."""
    started = time.perf_counter()
    checkpoint = open_source(model, options.revision)
    out = Path(out)
    _check_paths(checkpoint.root, out)
    check_target(out, options.force)  # the same refusals for --dry-run as for a real run
    if options.dry_run:
        return {"plan": make_plan(checkpoint, options).describe()}
    with AtomicDirectory(out, force=options.force) as tmp:  # locks OUT for the rest of the run
        plan = make_plan(checkpoint, options)
        report = {"plan": plan.describe()}
        total = plan.total_bytes
        done = 0

        def advance(unit: Unit) -> None:
            nonlocal done
            done += unit.nbytes
            if on_progress:
                on_progress(done, total)

        workers = default_workers() if options.workers is None else options.workers
        with _intra_op_threads(workers):
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


def default_workers() -> int:
    """Producer threads for ``convert``: one per core (at most :data:`MAX_DEFAULT_WORKERS`). The
    producers read, repack and sha256-hash; the writing thread mostly waits on ``write()``, so it
    needs no core of its own (2 cores, GPTQ → npu-int4, 3.9 GB: 16.6 s with 1 producer, 14.8 s
    with 2; benchmarks/RESULTS.md). Memory does not grow with it: the producer queue is bounded by
    bytes (:func:`npuconv.output.write_shards`)."""
    return max(1, min(usable_cores(), MAX_DEFAULT_WORKERS))


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
    """Everything after the shards: side files, config.json, the writer's extra files, npuconv.json.

    npuconv.json is written last and lists every file of the output (``files``), itself included."""
    _copy_side_files(checkpoint, plan.reader, directory)
    write_json(directory / "config.json", plan.writer.update_config(checkpoint.config, manifest))
    for filename, value in plan.writer.extra_files(manifest).items():
        if isinstance(value, str):  # already serialized by the writer (e.g. a format's own key order)
            (directory / filename).write_text(value, encoding="utf-8")
        else:
            write_json(directory / filename, value)
    manifest[FILES_KEY] = sorted({*output_files(directory), MANIFEST})  # what --force may replace
    write_json(directory / MANIFEST, manifest)


def build_manifest(plan: ConversionPlan, options: ConvertOptions, digests: dict[str, dict]) -> dict:
    """``npuconv.json``: what was converted, how, and the checksums of every shard (``shards``:
    per-tensor sha256 and the shard digest, defined in :mod:`npuconv.io.digests`).

    ``source_fingerprint`` (see :mod:`npuconv.io.fingerprint`) together with ``npuconv_version``,
    ``target`` and ``options`` is what ``npuconv zoo`` compares to skip an up-to-date output.
    """
    return {
        "npuconv_version": npuconv.__version__,
        "target": plan.writer.name,
        "source": {
            "id": plan.checkpoint.source_id,
            "revision": plan.checkpoint.revision,
            "format": plan.reader.format,
            **{k: v for k, v in plan.reader.summary().items() if isinstance(v, (str, int, float, bool))},
        },
        "source_fingerprint": source_fingerprint(plan.checkpoint, options.hash_source),
        "options": manifest_options(options),
        "layers": {
            spec.name: {**plan.writer.layer_manifest(spec), **plan.reader.layer_report(spec), "spec": spec_to_dict(spec)}
            for spec in plan.layers
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


def _layer_producer(reader: Reader, writer: Target, spec: LinearSpec):
    def produce() -> dict[str, torch.Tensor]:
        log.debug("layer %s (%s)", spec.name, spec.scheme)
        return writer.write_layer(reader.load(spec))

    return produce


def _passthrough_producer(checkpoint: Checkpoint, writer: Target, name: str):
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
