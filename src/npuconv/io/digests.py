"""Shard checksums of an npuconv output: one sha256 per tensor, computed while converting, checked in parallel.

``npuconv.json`` records, under ``"shards"``, one entry per safetensors file of the output::

    "shards": {"model.safetensors": {
        "scheme": "sha256-parts-1",
        "size": 3891234816,                    # bytes of the file
        "header": "<sha256 hex>",              # bytes [0, 8 + H)
        "tensors": {"<name>": "<sha256 hex>"}, # bytes [8 + H + begin, 8 + H + end), one per tensor
        "digest": "<sha256 hex>"}}             # the shard digest, defined from the parts below

- ``H`` is the safetensors header length: the unsigned 64-bit little-endian integer in bytes
  ``[0, 8)``. The *header part* is the length prefix, the JSON header and its padding.
- A *tensor part* is the tensor's data: ``(begin, end)`` is its ``data_offsets`` in that header,
  relative to the data section, which starts at byte ``8 + H``. safetensors tensors tile the data
  section, so the parts cover every byte of the file exactly once.
- ``digest`` = sha256 of the concatenated 32-byte binary digests of the header part, then of the
  tensor parts in file order (ascending ``(begin, end)``; tensors that tie are empty and have the
  same digest). Re-check a shard without npuconv::

      import hashlib, json, struct
      def shard_digest(path):
          data = open(path, "rb").read()
          (h,) = struct.unpack("<Q", data[:8])
          header = json.loads(data[8 : 8 + h]); header.pop("__metadata__", None)
          spans = sorted(tuple(t["data_offsets"]) for t in header.values())
          parts = [data[: 8 + h]] + [data[8 + h + b : 8 + h + e] for b, e in spans]
          return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()

  or per part with ``head -c $((8 + H)) FILE | sha256sum`` and
  ``tail -c +$((8 + H + begin + 1)) FILE | head -c $((end - begin)) | sha256sum``.

Why parts and not the sha256 of the whole file (what npuconv recorded before, and still checks):
one sha256 stream is sequential (~0.75 GB/s on a server core without SHA instructions), longer
than reading and writing the shard. Per-tensor digests are computed by the producer threads on the
bytes they produced, so conversion hashes on every core at once; checking hashes the tensors on
every core too, and a mismatch names the tensor that changed.

Old manifests map each file to the sha256 hex of the whole file (``"shards": {"f": "<hex>"}``);
:func:`check_shards` accepts both forms.
"""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from npuconv.errors import InputError, VerificationFailed
from npuconv.io.publish import MANIFEST
from npuconv.memory import usable_cores

SCHEME = "sha256-parts-1"
READ_CHUNK = 8 * 1024 * 1024  # bytes read and hashed at a time while checking
LISTED = 3  # changed tensors named in a message before "and N more"


class ChecksumMismatch(VerificationFailed):
    """A shard's bytes differ from the checksum recorded at conversion (``verify --skip-checksum``
    skips the check; the CLI adds that advice, zoo and the library do not offer the option)."""


def sha256_hex(data) -> str:
    """sha256 hex of a bytes-like object (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(data).hexdigest()


def combine(header: str, tensors: list[str]) -> str:
    """The shard digest: sha256 of the binary header digest, then the tensor digests in file order."""
    return sha256_hex(b"".join(bytes.fromhex(d) for d in [header, *tensors]))


def shard_record(header: bytes, tensors: list[tuple[str, str]], size: int) -> dict:
    """The manifest entry of a shard of ``size`` bytes written as ``header`` followed by the
    tensors, whose ``(name, sha256 hex)`` are given in file order."""
    header_digest = sha256_hex(header)
    return {
        "scheme": SCHEME,
        "size": size,
        "header": header_digest,
        "tensors": dict(tensors),
        "digest": combine(header_digest, [d for _, d in tensors]),
    }


@dataclass(frozen=True)
class _Part:
    """A byte range of a shard to hash and the digest it must have."""

    filename: str
    path: Path
    start: int
    nbytes: int
    expected: str
    tensor: str | None  # None: the whole file (an old manifest)


def check_shards(root: Path, manifest: dict, workers: int | None = None) -> None:
    """Compare every shard under ``root`` with its checksum in the manifest, hashing the parts of
    all shards on ``workers`` threads (default: every usable core).

    Raises :class:`ChecksumMismatch` naming each file (and, for per-tensor records, each tensor)
    whose bytes differ, :class:`VerificationFailed` for a missing shard, :class:`InputError` for a
    manifest without (readable) checksums.
    """
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise InputError(f"{MANIFEST}: no shard checksums recorded")
    parts: list[_Part] = []
    for filename, record in sorted(shards.items()):
        path = root / filename
        if not path.is_file():
            raise VerificationFailed(f"{filename}: listed in {MANIFEST} but missing")
        if isinstance(record, str):  # npuconv before sha256-parts-1: the sha256 of the whole file
            parts.append(_Part(filename, path, 0, _size(path), record, None))
        else:
            parts.extend(_tensor_parts(filename, path, record))
    largest_first = sorted(parts, key=lambda p: -p.nbytes)  # the longest hashes start first
    with ThreadPoolExecutor(max_workers=max(1, min(workers or usable_cores(), len(parts)))) as pool:
        results = list(pool.map(_matches, largest_first))
    changed = [p for p, ok in zip(largest_first, results) if not ok]
    if changed:
        raise ChecksumMismatch(_mismatch_message(parts, changed))


def _tensor_parts(filename: str, path: Path, record: object) -> list[_Part]:
    """The tensor parts of a per-tensor record, after checking size, header and the record itself."""
    if not _well_formed(record):
        raise InputError(f"{MANIFEST}: the checksum entry of '{filename}' is not a {SCHEME} record")
    size = _size(path)
    if size != record["size"]:
        raise ChecksumMismatch(f"{filename}: {size} bytes where {MANIFEST} records {record['size']} (modified after conversion)")
    header = _read_header_part(path, size)
    if header is None or sha256_hex(header) != record["header"]:
        raise ChecksumMismatch(f"{filename}: sha256 differs from {MANIFEST} for the safetensors header (modified after conversion)")
    spans = _spans(header)  # the header is the one npuconv wrote: its JSON is trusted from here on
    if {name for name, _, _ in spans} != set(record["tensors"]):
        raise ChecksumMismatch(f"{filename}: the tensors differ from those {MANIFEST} lists (manifest edited)")
    if combine(record["header"], [record["tensors"][name] for name, _, _ in spans]) != record["digest"]:
        raise ChecksumMismatch(f"{MANIFEST}: the digest of '{filename}' does not match its parts (manifest edited)")
    start = len(header)
    return [_Part(filename, path, start + b, e - b, record["tensors"][name], name) for name, b, e in spans]


def _spans(header: bytes) -> list[tuple[str, int, int]]:
    """``(name, begin, end)`` of every tensor of a safetensors header part, in file order."""
    entries = json.loads(header[8:])
    entries.pop("__metadata__", None)
    return sorted(((name, *e["data_offsets"]) for name, e in entries.items()), key=lambda s: (s[1], s[2]))


def _well_formed(record: object) -> bool:
    if not isinstance(record, dict) or record.get("scheme") != SCHEME:
        return False
    tensors = record.get("tensors")
    return (
        isinstance(record.get("size"), int)
        and all(_is_hex_digest(record.get(key)) for key in ("header", "digest"))
        and isinstance(tensors, dict)
        and all(_is_hex_digest(d) for d in tensors.values())
    )


def _is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise InputError(f"{path.name}: cannot read: {e.strerror or e}") from None


def _read_header_part(path: Path, size: int) -> bytes | None:
    """Bytes ``[0, 8 + H)`` of a safetensors file, or None when ``H`` does not fit the file."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return None
            (length,) = struct.unpack("<Q", prefix)
            if 8 + length > size:
                return None
            return prefix + f.read(length)
    except OSError as e:
        raise InputError(f"{path.name}: cannot read: {e.strerror or e}") from None


def _matches(part: _Part) -> bool:
    """Whether the sha256 of the part's bytes is the expected one (read in chunks; a short read differs)."""
    digest = hashlib.sha256()
    buffer = bytearray(min(READ_CHUNK, part.nbytes))
    view = memoryview(buffer)
    left = part.nbytes
    try:
        with open(part.path, "rb", buffering=0) as f:
            f.seek(part.start)
            while left:
                got = f.readinto(view[: min(left, len(buffer))])
                if not got:
                    return False
                digest.update(view[:got])
                left -= got
    except OSError as e:
        raise InputError(f"{part.filename}: cannot read: {e.strerror or e}") from None
    return digest.hexdigest() == part.expected


def _mismatch_message(parts: list[_Part], changed: list[_Part]) -> str:
    """One line: per file (in name order), the changed tensors (in file order)."""
    order = {id(p): i for i, p in enumerate(parts)}
    by_file: dict[str, list[_Part]] = {}
    for part in sorted(changed, key=lambda p: order[id(p)]):
        by_file.setdefault(part.filename, []).append(part)
    lines = []
    for filename, bad in by_file.items():
        if bad[0].tensor is None:
            lines.append(f"{filename}: sha256 differs from {MANIFEST} (modified after conversion)")
            continue
        names = ", ".join(f"'{p.tensor}'" for p in bad[:LISTED])
        more = f" and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        noun = "tensor" if len(bad) == 1 else "tensors"
        lines.append(f"{filename}: sha256 differs from {MANIFEST} for {noun} {names}{more} (modified after conversion)")
    return "; ".join(lines)
