"""safetensors files: a validating header parser, a tensor-at-a-time reader and a streaming writer.

File layout (https://github.com/huggingface/safetensors, "Format"):
``[u64 little-endian header length N][N bytes of UTF-8 JSON header][data]``. The header maps each
tensor name to ``{"dtype": str, "shape": [int...], "data_offsets": [begin, end]}`` with offsets
relative to the start of the data section, plus an optional ``"__metadata__"`` str→str map.
Tensor bytes are little-endian, row-major.

Reading is one tensor at a time with ``readinto`` into a fresh buffer, so memory is bounded by the
tensor, not the file. Writing computes the header from the planned tensors up front and then
streams each tensor's bytes as it is produced.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from npuconv.lazy_torch import torch

from npuconv.errors import InputError, OutputError

MAX_HEADER_BYTES = 100 * 1024 * 1024

#: safetensors dtype code → (torch dtype name, bytes per element, ``struct`` format of one element or
#: None): the one dtype table. Names are torch's attribute names (``torch.float16`` → ``"float16"``), so
#: headers, specs and manifests carry names and torch is imported only where a tensor is made
#: (:func:`torch_dtype`). The format is None where ``struct`` has none: bfloat16 (:func:`iter_values`
#: reads it as the high half of a float32) and the float8 types (read with torch only).
DTYPES: dict[str, tuple[str, int, str | None]] = {
    "BOOL": ("bool", 1, "?"),
    "U8": ("uint8", 1, "B"),
    "I8": ("int8", 1, "b"),
    "I16": ("int16", 2, "h"),
    "U16": ("uint16", 2, "H"),
    "I32": ("int32", 4, "i"),
    "U32": ("uint32", 4, "I"),
    "I64": ("int64", 8, "q"),
    "U64": ("uint64", 8, "Q"),
    "F16": ("float16", 2, "e"),
    "BF16": ("bfloat16", 2, None),
    "F32": ("float32", 4, "f"),
    "F64": ("float64", 8, "d"),
    "F8_E4M3": ("float8_e4m3fn", 1, None),
    "F8_E5M2": ("float8_e5m2", 1, None),
}
_CODES: dict[str, str] = {name: code for code, (name, _, _) in DTYPES.items()}
_FORMATS: dict[str, str] = {name: fmt for name, _, fmt in DTYPES.values() if fmt}
_FORMATS["bfloat16"] = "f"  # after widening to float32 (iter_values)
VALUES_PER_CHUNK = 1 << 16  # iter_values: Python objects made at a time
TORCH_FREE_VALUES = 1 << 16  # integer_range: tensors up to this many values are read without torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name (``"float16"`` → ``torch.float16``); imports torch."""
    return getattr(torch, name)


def name_of(dtype: torch.dtype) -> str:
    """The name of a torch dtype (``torch.float16`` → ``"float16"``)."""
    return str(dtype).removeprefix("torch.")


def is_float(name: str) -> bool:
    """Whether a dtype name is a floating-point type (``torch.dtype.is_floating_point``)."""
    return name.startswith(("float", "bfloat"))


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors dtype string of a torch dtype (``torch.int32`` → ``"I32"``)."""
    try:
        return _CODES[name_of(dtype)]
    except KeyError:
        raise OutputError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte span in the file."""

    name: str
    path: Path
    dtype_name: str  # a name of :data:`DTYPES` ("float16"): headers are parsed without torch
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header.

    Checks: header length within the file, UTF-8 JSON object without duplicate keys or lone
    surrogates, string metadata, known dtypes, non-negative integer shapes,
    ``end - begin == numel * itemsize``, and spans that tile the data section exactly (no
    overlap, hole or trailing byte) — what the safetensors library accepts. Raises
    :class:`InputError` naming the file (and tensor) otherwise.
    Returns (tensors in file-offset order, metadata).
    """
    name = path.name
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the open() below
            raise InputError(f"{name}: not a regular file")
        size = info.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{name}: file is too short to be safetensors ({size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise InputError(
                    f"{name}: header length {hlen} exceeds the file size {size} (truncated or not safetensors)"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror or e}") from None
    header = _parse_header(name, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{name}: __metadata__ is not an object of strings")
    data_start = 8 + hlen
    data_size = size - data_start
    infos = [_tensor_info(path, key, entry, data_start, data_size) for key, entry in header.items()]
    infos.sort(key=lambda t: (t.start, t.nbytes))
    _check_coverage(name, infos, data_start, data_size)
    return {t.name: t for t in infos}, dict(metadata)


def _parse_header(name: str, raw: bytes) -> dict:
    """The header JSON as the safetensors library reads it: UTF-8, no duplicate keys, no lone surrogates."""

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise InputError(f"{name}: the header names '{key}' twice")
            seen[key] = value
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # "\ud800" escapes decode to lone surrogates
    except UnicodeEncodeError:
        raise InputError(f"{name}: header holds a name that is not valid UTF-8 (a lone surrogate escape)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{name}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{name}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise InputError(f"{name}: header is not a JSON object")
    return header


def _check_coverage(name: str, infos: list[TensorInfo], data_start: int, data_size: int) -> None:
    """Tensors (sorted by offset) tile the data section exactly: no overlap, no gap, no trailing bytes.

    The safetensors format requires the byte buffer to be "entirely indexed, and cannot contain
    holes" (its README, "Format"); the library refuses such files, and so do we."""
    end, last = 0, None
    for info in infos:
        begin = info.start - data_start
        if begin < end:
            raise InputError(f"{name}: tensors '{last}' and '{info.name}' overlap")
        if begin > end:
            raise InputError(f"{name}: data bytes {end}..{begin} before tensor '{info.name}' belong to no tensor")
        end, last = begin + info.nbytes, info.name
    if end != data_size:
        raise InputError(f"{name}: {data_size - end} data bytes after the last tensor belong to no tensor")


def _printable(name: str) -> str:
    """A name as it can stand in a one-line message: control characters escaped (``'\\n'``)."""
    return name if name.isprintable() else repr(name)[1:-1]


def _tensor_info(path: Path, key: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path.name}: tensor '{_printable(key)}'"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: entry is not an object")
    dtype, itemsize, _ = DTYPES.get(entry.get("dtype"), (None, 0, None)) if isinstance(entry.get("dtype"), str) else (None, 0, None)
    if dtype is None:
        raise InputError(f"{where}: unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InputError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    expected = math.prod(shape) * itemsize
    if begin < 0 or end < begin:
        raise InputError(f"{where}: data_offsets {offsets} are not an increasing pair")
    if end - begin != expected:
        raise InputError(f"{where}: byte span {end - begin} != {expected} for dtype {entry['dtype']} x shape {shape}")
    if end > data_size:
        raise InputError(f"{where}: data ends at {end}, beyond the {data_size} data bytes of the file (truncated?)")
    return TensorInfo(key, path, dtype, tuple(shape), data_start + begin, end - begin)


MAP_MIN_BYTES = 1 << 20  # tensors of at least this many bytes are mapped from the file, not read


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor as a writable CPU tensor of its own.

    Tensors of :data:`MAP_MIN_BYTES` or more are mapped copy-on-write from the file (``mmap``
    ``ACCESS_COPY``): the tensor's pages are the page cache's, so there is no zero-filled buffer
    and no copy (45 MB tensors: 0.66 → 2.2 GB/s on the project machine); a write to the tensor
    stays private (the file never changes), and the mapping goes when the tensor is freed. A file
    truncated by another process while a mapped tensor is in use ends the process (SIGBUS), as it
    does for safetensors' own loader. Smaller tensors are read into a fresh buffer.
    """
    if info.nbytes >= MAP_MIN_BYTES:
        data = _map_bytes(info)
    else:
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            _read_into(info, memoryview(data.numpy()))
    return data.view(info.dtype).reshape(info.shape)


def _read_into(info: TensorInfo, buffer) -> None:
    """Read the tensor's ``nbytes`` stored bytes into a writable buffer of that size."""
    try:
        with open(info.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buffer)
    except OSError as e:
        raise _unreadable(info, e) from None
    if got != info.nbytes:
        raise _truncated(info, got)


def _unreadable(info: TensorInfo, error: OSError) -> InputError:
    return InputError(f"{info.path.name}: cannot read tensor '{info.name}': {error.strerror or error}")


def _truncated(info: TensorInfo, got: int) -> InputError:
    return InputError(f"{info.path.name}: tensor '{info.name}' is truncated ({got} of {info.nbytes} bytes)")


def _map_bytes(info: TensorInfo) -> torch.Tensor:
    """uint8 ``[nbytes]`` tensor over a private (copy-on-write) mapping of the tensor's bytes."""
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY  # mappings start on a granule
    try:
        with open(info.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < info.start + info.nbytes:
                raise _truncated(info, max(0, size - info.start))
            mapped = mmap.mmap(f.fileno(), info.start + info.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise _unreadable(info, e) from None
    return torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start - start)


def read_bytes(info: TensorInfo) -> bytearray:
    """The stored bytes of one tensor (row-major, little-endian), read without torch."""
    data = bytearray(info.nbytes)
    _read_into(info, data)
    return data


def _value_format(info: TensorInfo) -> str:
    """The ``struct`` format :func:`iter_values` reads ``info``'s elements with (bfloat16: widened to float32)."""
    fmt = _FORMATS.get(info.dtype_name)
    if fmt is None:
        raise InputError(
            f"{info.path.name}: tensor '{info.name}' is {info.dtype_name}; expected an integer, bool or "
            "float16/bfloat16/float32/float64 tensor"
        )
    return fmt


def iter_values(info: TensorInfo) -> Iterator[int | float | bool]:
    """The values of a tensor, flattened (row-major), as Python objects — read without torch, for
    the small tensors ``inspect`` looks at (GPTQ ``g_idx``, msModelSlim offsets). Integers and bool
    as stored; float16/32/64 exactly (``struct``); bfloat16 exactly, as the float32 whose high 16
    bits it is. Float8 types: :class:`InputError` (no Python type). Byte order: little-endian, as
    stored (the host's, as :func:`read_tensor` assumes too). Objects are made
    :data:`VALUES_PER_CHUNK` at a time: memory is the tensor's bytes plus one chunk."""
    fmt = _value_format(info)
    data = read_bytes(info)
    if info.dtype_name == "bfloat16":  # float32 bytes (0, 0, low, high) per bfloat16 (low, high)
        wide = bytearray(2 * len(data))
        wide[2::4], wide[3::4] = data[0::2], data[1::2]
        data = wide
    size = struct.calcsize(fmt)
    step = VALUES_PER_CHUNK * size
    chunks = (
        struct.unpack_from(f"<{min(step, len(data) - start) // size}{fmt}", data, start) for start in range(0, len(data), step)
    )
    return itertools.chain.from_iterable(chunks)


def integer_range(info: TensorInfo) -> tuple[int, int] | None:
    """(min, max) of a non-empty tensor's values when every value is an integer (float types: finite
    and integral), else None. Dtypes as :func:`iter_values`.

    Up to :data:`TORCH_FREE_VALUES` values are read without torch (per-channel vectors: ``inspect``
    stays torch-free); a larger tensor is read with torch, since one Python object per value
    (~60 ns) would make a model's per-group tensors (10^8 values) cost more than importing torch.
    """
    if info.numel <= TORCH_FREE_VALUES or info.dtype_name == "uint64":  # torch: no min/max of uint64
        distinct = set(iter_values(info))
        if is_float(info.dtype_name) and not all(value.is_integer() for value in distinct):
            return None
        return int(min(distinct)), int(max(distinct))
    _value_format(info)  # the same dtypes either way
    tensor = read_tensor(info)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.int64)  # exact; torch has no min/max of uint16/uint32
    elif not bool((torch.isfinite(tensor) & (tensor == tensor.round())).all()):
        return None
    return int(tensor.min()), int(tensor.max())


def read_ints(info: TensorInfo) -> list[int]:
    """The values of an integer (or bool) tensor, flattened, as Python ints (:func:`iter_values`)."""
    if is_float(info.dtype_name):
        raise InputError(f"{info.path.name}: tensor '{info.name}' is {info.dtype_name}, not an integer type")
    return list(iter_values(info))


@dataclass(frozen=True)
class TensorPlan:
    """A tensor that will be written: name, dtype and shape known before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def encode_header(plans: Iterable[TensorPlan], metadata: dict[str, str] | None = None) -> bytes:
    """The complete prefix of a safetensors file (length + JSON header), padded to 8 bytes.

    Tensors are laid out in the given order. JSON keys are emitted in that order too, so the
    bytes are deterministic for a given plan.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for plan in plans:
        if plan.name in header:
            raise OutputError(f"tensor '{plan.name}' is planned twice")
        try:
            plan.name.encode("utf-8")
        except UnicodeEncodeError:
            raise OutputError(f"tensor name {plan.name!r} is not valid UTF-8") from None
        header[plan.name] = {
            "dtype": dtype_name(plan.dtype),
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes a tensor is stored as in safetensors: CPU, row-major, native (little-endian) byte
    order, as a flat memoryview — of the tensor itself when it is already a contiguous CPU tensor."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(data.numpy())


class StreamingWriter:
    """Write one safetensors file whose tensors arrive one at a time, in plan order.

    Peak memory is the tensor being written; the header is written first from the plan, and
    each :meth:`write` checks that the tensor matches its planned dtype and shape. ``header``:
    the bytes written before the data section (length prefix, JSON, padding).
    """

    def __init__(self, path: Path, plans: list[TensorPlan], metadata: dict[str, str] | None = None):
        self.path = path
        self._plans = plans
        self._next = 0
        self.header = header = encode_header(plans, metadata)  # before opening: a bad plan leaves no open file
        try:
            self._file: BinaryIO = open(path, "wb")
        except OSError as e:
            raise OutputError(f"{path}: cannot create: {e.strerror or e}") from None
        try:
            self._emit(header)
        except BaseException:
            self.abort()
            raise

    def _emit(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise OutputError(f"{self.path}: write failed: {e.strerror or e}") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plans):
            raise OutputError(f"{self.path.name}: unplanned tensor '{name}'")
        plan = self._plans[self._next]
        if plan.name != name or plan.dtype != tensor.dtype or plan.shape != tuple(tensor.shape):
            raise OutputError(
                f"{self.path.name}: tensor '{name}' {tensor.dtype}{list(tensor.shape)} does not match "
                f"plan '{plan.name}' {plan.dtype}{list(plan.shape)}"
            )
        self._emit(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plans):
            missing = self._plans[self._next].name
            self.abort()
            raise OutputError(f"{self.path.name}: tensor '{missing}' was planned but never written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: write failed: {e.strerror or e}") from None

    def abort(self) -> None:
        """Close without raising: the file is being discarded, so a failed flush of its buffer
        (disk full, file-size limit) must not replace the error that caused the abort."""
        try:
            self._file.close()
        except OSError:
            pass


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of tensors in one go (tests and tiny files)."""
    plans = [TensorPlan(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = StreamingWriter(path, plans, metadata)
    for k, t in tensors.items():
        writer.write(k, t)
    writer.close()
