"""Output side: a sharded, streaming safetensors sink (published atomically by :mod:`npuconv.io.publish`).

Atomicity, locking, ``--force`` and cleanup rules: see :mod:`npuconv.io.publish`.

Sharding: tensors are grouped into *units* (all tensors of one layer stay together); units are
assigned to shards greedily in order, starting a new shard when the next unit would exceed
``max_shard_bytes``. One shard is named ``model.safetensors``; several are
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": …}, "weight_map": {tensor: file}}``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from npuconv.errors import InputError
from npuconv.io.digests import sha256_hex, shard_record
from npuconv.io.publish import MANIFEST, AtomicDirectory  # noqa: F401  (re-exported: the output API)
from npuconv.io.safetensors_io import StreamingWriter, TensorPlan, tensor_bytes

DEFAULT_MAX_SHARD = 5 * 1000**3
SHARD_METADATA = {"format": "pt"}


def parse_size(text: str) -> int:
    """``"5GB"`` → 5_000_000_000; accepts B, KB, MB, GB, TB (powers of 1000) and KiB… (1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise InputError(f"invalid size {text!r} (examples: 500MB, 5GB, 2GiB)")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
    powers = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
              "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}
    if unit not in powers:
        raise InputError(f"invalid size unit in {text!r}")
    size = int(number * powers[unit])
    if size <= 0:
        raise InputError(f"size must be positive, got {text!r}")
    return size


@dataclass
class Unit:
    """A group of tensors written together (one layer), produced by one call of ``produce``."""

    plans: list[TensorPlan]
    produce: Callable[[], dict[str, torch.Tensor]]
    label: str = ""
    #: bytes the unit holds at its peak while produced (its inputs, temporaries and output), as its
    #: target estimates it (:meth:`npuconv.writers.base.Target.production_cost`); the producer queue
    #: charges at least twice the output bytes (:func:`unit_cost`)
    cost: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.plans)


@dataclass
class Shard:
    filename: str
    units: list[Unit] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def plans(self) -> list[TensorPlan]:
        return [p for u in self.units for p in u.plans]


def plan_shards(units: list[Unit], max_shard_bytes: int, prefix: str = "model") -> list[Shard]:
    """Greedy split of units into shards in order (a unit larger than the limit gets its own shard)."""
    groups: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if groups[-1] and size + unit.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += unit.nbytes
    if len(groups) == 1:
        return [Shard(f"{prefix}.safetensors", groups[0])]
    n = len(groups)
    return [Shard(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def index_json(shards: list[Shard], prefix: str = "model") -> tuple[str, dict] | None:
    """The ``<prefix>.safetensors.index.json`` file name and content, or None for a single shard."""
    if len(shards) == 1:
        return None
    weight_map = {p.name: s.filename for s in shards for p in s.plans}
    total = sum(s.nbytes for s in shards)
    return f"{prefix}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}


MIN_BYTES_AHEAD = 128 * 1024**2  # the producer queue's byte budget is at least this (see write_shards)


def write_shards(
    directory: Path,
    shards: list[Shard],
    on_unit: Callable[[Unit], None] | None = None,
    workers: int = 1,
    bytes_ahead: int | None = None,
) -> dict[str, dict]:
    """Stream every shard to ``directory``; returns ``{filename: checksum record}`` for the
    manifest (:func:`npuconv.io.digests.shard_record`).

    Units are produced (read + repack + sha256 of each tensor's bytes) by ``workers`` background
    threads ahead of the one being written, while the calling thread writes in plan order — so
    reading, repacking, hashing and writing overlap, and hashing runs on every worker. The queue
    is bounded by bytes, not by count: a unit starts only while the units produced, in production
    or being written hold at most ``bytes_ahead`` (each counted as :func:`unit_cost`: its inputs,
    temporaries and output; default budget: the largest unit cost, at least :data:`MIN_BYTES_AHEAD`),
    or when nothing else is in flight. So peak memory is about the largest unit's cost (twice the
    largest tensor) whatever ``workers`` is.
    ``workers=0`` produces each unit in the calling thread just before writing it. torch and
    file I/O and hashlib release the GIL, so the threads run in parallel.
    """
    units = [u for s in shards for u in s.units]
    if bytes_ahead is None:
        bytes_ahead = max([MIN_BYTES_AHEAD, *(unit_cost(u) for u in units)])
    records = {}
    produced = _produce_in_order(units, workers, bytes_ahead)
    try:
        for shard in shards:
            writer = StreamingWriter(directory / shard.filename, shard.plans, SHARD_METADATA)
            digests: dict[str, str] = {}
            try:
                for unit in shard.units:
                    done, (tensors, unit_digests) = next(produced)
                    assert done is unit
                    for plan in unit.plans:
                        writer.write(plan.name, tensors[plan.name])
                    del tensors
                    digests.update(unit_digests)
                    if on_unit:
                        on_unit(unit)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            parts = [(plan.name, digests[plan.name]) for plan in shard.plans]  # file order
            records[shard.filename] = shard_record(writer.header, parts, len(writer.header) + shard.nbytes)
    finally:
        produced.close()
    return records


Produced = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, sha256 hex of each one's bytes


def _produce_hashed(unit: Unit) -> Produced:
    """``unit.produce()`` with each tensor made a contiguous CPU tensor — the bytes the writer
    will write — and the sha256 of those bytes, computed here, in the producing thread."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in unit.produce().items()}
    return tensors, {name: sha256_hex(tensor_bytes(t)) for name, t in tensors.items()}


def _produce_in_order(units: list[Unit], workers: int, bytes_ahead: int) -> Iterator[tuple[Unit, Produced]]:
    """Yield ``(unit, _produce_hashed(unit))`` in order, computing up to ``workers`` units ahead within
    ``bytes_ahead`` bytes of :func:`unit_cost` (the unit being consumed counts until the consumer asks
    for the next)."""
    if workers <= 0:
        for unit in units:
            yield unit, _produce_hashed(unit)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npuconv-produce")
    pending: deque = deque()
    upcoming = iter(units)
    following = next(upcoming, None)
    in_flight = 0

    def admit() -> None:
        nonlocal following, in_flight
        while following is not None and len(pending) < workers and (
            in_flight == 0 or in_flight + unit_cost(following) <= bytes_ahead
        ):
            pending.append((following, pool.submit(_produce_hashed, following)))
            in_flight += unit_cost(following)
            following = next(upcoming, None)

    try:
        admit()
        while pending:
            unit, future = pending.popleft()
            admit()  # keep the workers busy while this unit is written (it still counts as in flight)
            tensors = future.result()
            yield unit, tensors
            del tensors
            in_flight -= unit_cost(unit)
            admit()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def unit_cost(unit: Unit) -> int:
    """Bytes the producer queue charges for a unit from its start until it is written: its target's
    estimate (``unit.cost``), at least twice its output bytes (the output plus about as much again of
    input: a passthrough tensor or a layer without an estimate)."""
    return max(unit.cost, 2 * unit.nbytes)


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    """sha256 hex of a whole file (source fingerprints; shard checksums: :mod:`npuconv.io.digests`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, value: object) -> None:
    """Deterministic JSON: sorted keys, 2-space indent, trailing newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
