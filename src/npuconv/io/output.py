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
import queue
import threading
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from npuconv.errors import InputError, OutputError, VerificationFailed
from npuconv.io.publish import MANIFEST, AtomicDirectory  # noqa: F401  (re-exported: the output API)
from npuconv.io.safetensors_io import StreamingWriter, TensorPlan

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
) -> dict[str, str]:
    """Stream every shard to ``directory``; returns ``{filename: sha256}``.

    Units are produced (read + repack) by ``workers`` background threads ahead of the one being
    written, while the calling thread writes and hashes in plan order — so reading, repacking and
    writing overlap. The queue is bounded by bytes, not by count: a unit starts only while the
    units produced, in production or being written hold at most ``bytes_ahead`` (counted as twice
    their output bytes: input and temporaries; default budget: twice the largest unit, at least
    :data:`MIN_BYTES_AHEAD`), or when nothing else is in flight. So peak memory is about twice
    the largest unit whatever ``workers`` is.
    ``workers=0`` produces each unit in the calling thread just before writing it. torch and
    file I/O release the GIL, so the threads run in parallel.
    """
    units = [u for s in shards for u in s.units]
    if bytes_ahead is None:
        bytes_ahead = max([MIN_BYTES_AHEAD, *(_cost(u) for u in units)])
    digests = {}
    produced = _produce_in_order(units, workers, bytes_ahead)
    try:
        for shard in shards:
            path = directory / shard.filename
            writer = _HashingWriter(path, shard.plans)
            try:
                for unit in shard.units:
                    done, tensors = next(produced)
                    assert done is unit
                    for plan in unit.plans:
                        writer.write(plan.name, tensors[plan.name])
                    del tensors
                    if on_unit:
                        on_unit(unit)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            digests[shard.filename] = writer.hexdigest()
    finally:
        produced.close()
    return digests


def _produce_in_order(units: list[Unit], workers: int, bytes_ahead: int) -> Iterator[tuple[Unit, dict[str, torch.Tensor]]]:
    """Yield ``(unit, unit.produce())`` in order, computing up to ``workers`` units ahead within
    ``bytes_ahead`` output bytes (the unit being consumed counts until the consumer asks for the next)."""
    if workers <= 0:
        for unit in units:
            yield unit, unit.produce()
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npuconv-produce")
    pending: deque = deque()
    upcoming = iter(units)
    following = next(upcoming, None)
    in_flight = 0

    def admit() -> None:
        nonlocal following, in_flight
        while following is not None and len(pending) < workers and (
            in_flight == 0 or in_flight + _cost(following) <= bytes_ahead
        ):
            pending.append((following, pool.submit(following.produce)))
            in_flight += _cost(following)
            following = next(upcoming, None)

    try:
        admit()
        while pending:
            unit, future = pending.popleft()
            admit()  # keep the workers busy while this unit is written (it still counts as in flight)
            tensors = future.result()
            yield unit, tensors
            del tensors
            in_flight -= _cost(unit)
            admit()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _cost(unit: Unit) -> int:
    """Bytes a unit holds while produced: its output plus about as much again of input and temporaries."""
    return 2 * unit.nbytes


class _HashingWriter(StreamingWriter):
    """StreamingWriter that also sha256-hashes every byte it writes, in a background thread.

    hashlib releases the GIL on large buffers, so hashing runs beside the writes instead of after
    each of them. At most ``HASH_QUEUE`` buffers wait for the hasher (each stays alive until hashed).
    """

    HASH_QUEUE = 2

    def __init__(self, path: Path, plans: list[TensorPlan]):
        self._hash = hashlib.sha256()
        self._pending: queue.Queue = queue.Queue(maxsize=self.HASH_QUEUE)
        self._hasher = threading.Thread(target=self._consume, name="npuconv-sha256", daemon=True)
        super().__init__(path, plans, SHARD_METADATA)  # may raise: no thread is running yet
        self._hasher.start()

    def _consume(self) -> None:
        while (data := self._pending.get()) is not None:
            self._hash.update(data)

    def _emit(self, data) -> None:
        super()._emit(data)
        if self._hasher.is_alive():
            self._pending.put(data)
        else:  # the header, written by StreamingWriter.__init__ before the thread starts
            self._hash.update(data)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_hasher()

    def abort(self) -> None:
        try:
            super().abort()
        finally:
            self._stop_hasher()

    def _stop_hasher(self) -> None:
        if self._hasher.is_alive():
            self._pending.put(None)
            self._hasher.join()

    def hexdigest(self) -> str:
        self._stop_hasher()
        return self._hash.hexdigest()


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, value: object) -> None:
    """Deterministic JSON: sorted keys, 2-space indent, trailing newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_shards(root: Path, manifest: dict) -> None:
    """Compare each shard's sha256 under ``root`` with the manifest; a mismatch is a verification failure."""
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise InputError(f"{MANIFEST}: no shard checksums recorded")
    for filename, digest in sorted(shards.items()):
        path = root / filename
        if not path.is_file():
            raise VerificationFailed(f"{filename}: listed in {MANIFEST} but missing")
        if sha256_file(path) != digest:
            raise ChecksumMismatch(f"{filename}: sha256 differs from {MANIFEST} (modified after conversion)")


class ChecksumMismatch(VerificationFailed):
    """A shard's bytes differ from the checksum recorded at conversion (``verify --skip-checksum``
    skips the check; the CLI adds that advice, zoo and the library do not offer the option)."""
