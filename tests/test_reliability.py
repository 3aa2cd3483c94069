"""Reliability: bad input never crashes, no half-written output, input untouched, output deterministic.

The checks go through the real CLI. The many small bad-input cases run in-process through
click's ``CliRunner`` (the same code path as ``npuconv``, without an interpreter start per case);
wherever the process itself matters — exit status of the interpreter, stderr of a real process,
signals, resource limits, hash seeds — the CLI runs in a subprocess (``python -m npuconv``). The
hypothesis fuzzers call the library directly (everything ``inspect`` and ``convert`` do, in memory)
to afford hundreds of examples; they accept only an ``NpuconvError`` or success.

Bad inputs are built in ``tmp_path`` by copying a real tool-written fixture and breaking exactly
one thing. Each must end with exit code 2 and one ``error:`` line on stderr that names the file,
tensor or field, with no traceback; a defect found while planning fails ``inspect`` and
``convert``, a defect found only when a layer is loaded passes ``inspect`` and fails ``convert``
(no output directory, no temporary directory left).

Scale policy (``Reader.check_scale``, every reader, checked when a layer is loaded): NaN or
infinite scales (E8M0 byte 255) are an error; zero or negative scales are converted as stored
with a warning; a scale used as a divisor (compressed-tensors global / input scale, msModelSlim
input scale) must be positive.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from spec_decoders import decode_layers
from npuconv.io.checkpoint import Checkpoint
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert, make_plan
from npuconv.errors import NpuconvError
from npuconv.inspect import inspect_checkpoint
from npuconv.model import dequantize
from npuconv.packing import pack_bitstream
from npuconv.io.safetensors_io import read_header, read_tensor, save_file

GPTQ = "gptq_v1_b4_g32_sym"
GPTQ_ACT = "gptq_v1_b4_g64_asym_descact"
AWQ = "awq_gemm_g128"
CT = "ct020_w4a16_g32_asym"
CT_W8A8 = "ct020_w8a8_int"
MS = "ms_w8a16_per_group32_asym"
MS_STATIC = "ms_w8a8_static_fp16"
MS_MX = "ms_w8a8_mxfp8"

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"  # K = 256: the first module of some files
K = "model.layers.0.self_attn.k_proj"
ST = "model.safetensors"
MS_ST = "quant_model_weights.safetensors"
MS_DESC = "quant_model_description.json"
INDEX = "model.safetensors.index.json"
QC = "quantize_config.json"


# ============================================================================================ helpers
def run_cli(*args):
    """The CLI in-process (click's runner); Python warnings are silenced so stderr is the CLI's own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cli, [str(a) for a in args])


def process_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **extra}


def run_process(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: ``python -m npuconv ...`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "npuconv", *map(str, args)],
        capture_output=True, text=True, env=process_env(), timeout=timeout, **kwargs,
    )


def clean_error(exit_code: int, stdout: str, stderr: str, needles=(), code: int = 2) -> str:
    """Assert a clean failure: the exit code, one ``error:`` line on stderr with every needle, no traceback."""
    context = f"exit {exit_code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert exit_code == code, context
    assert "Traceback" not in stdout + stderr, context
    lines = stderr.splitlines()
    assert len(lines) == 1, context
    message = lines[0]
    assert message.startswith("error: ") and "internal error" not in message, context
    for needle in needles:
        assert needle in message, f"{needle!r} is not in the message {message!r}"
    return message


def cli_error(result, needles=(), code: int = 2) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return clean_error(result.exit_code, result.stdout, result.stderr, needles, code)


def process_error(proc: subprocess.CompletedProcess, needles=(), code: int = 2) -> str:
    return clean_error(proc.returncode, proc.stdout, proc.stderr, needles, code)


def leftovers(out: Path) -> list[Path]:
    """Hidden temporary (or replaced) siblings that a conversion into ``out`` may leave behind."""
    return sorted(out.parent.glob(f".{out.name}.npuconv-*"))


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was published"
    assert not leftovers(out), f"left behind: {leftovers(out)}"


def make_writable(root: Path) -> None:
    """Fixtures are shipped read-only; a copy must be editable (also when not running as root)."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)


def copy_fixture(fixture: str, tmp_path: Path, name: str = "model") -> Path:
    dest = tmp_path / name
    shutil.copytree(FIXTURES / fixture, dest, ignore=shutil.ignore_patterns("reference_dequant*"))
    make_writable(dest)
    return dest


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (hidden ones included): kind, mode, size, mtime and content hash."""
    state = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir", info.st_mode, info.st_mtime_ns)
            elif not stat.S_ISREG(info.st_mode):
                state[rel] = ("special", info.st_mode, info.st_mtime_ns)
            else:
                state[rel] = ("file", info.st_mode, info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- mutations
Mutation = Callable[[Path], None]


def chain(*mutations: Mutation) -> Mutation:
    def mutate(model: Path) -> None:
        for m in mutations:
            m(model)

    return mutate


def remove(*filenames: str) -> Mutation:
    def mutate(model: Path) -> None:
        for filename in filenames:
            (model / filename).unlink()

    return mutate


def write_text(filename: str, text: str) -> Mutation:
    def mutate(model: Path) -> None:
        (model / filename).write_text(text)

    return mutate


def edit_bytes(filename: str, change: Callable[[bytes], bytes]) -> Mutation:
    def mutate(model: Path) -> None:
        path = model / filename
        path.write_bytes(change(path.read_bytes()))

    return mutate


def edit_json(filename: str, change: Callable[[object], object]) -> Mutation:
    """``change`` edits the parsed value in place (returns None) or returns a replacement."""

    def mutate(model: Path) -> None:
        path = model / filename
        value = json.loads(path.read_text())
        replaced = change(value)
        path.write_text(json.dumps(value if replaced is None else replaced))

    return mutate


def set_key(filename: str, keys: str | tuple[str, ...], value: object) -> Mutation:
    """Set a (nested) key; ``keys`` is dotted (``"a.b"``) or a tuple for keys that contain dots."""
    path = tuple(keys.split(".")) if isinstance(keys, str) else keys

    def change(data: dict) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit_json(filename, change)


def gptq_setting(key: str, value: object) -> Mutation:
    """Set a GPTQ setting in quantize_config.json and config.json's quantization_config alike
    (GPTQ tools write both; npuconv refuses a checkpoint where they contradict)."""
    return chain(set_key(QC, key, value), set_key("config.json", f"quantization_config.{key}", value))


def delete_key(filename: str, keys: str | tuple[str, ...]) -> Mutation:
    path = tuple(keys.split(".")) if isinstance(keys, str) else keys

    def change(data: dict) -> None:
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]

    return edit_json(filename, change)


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_safetensors(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def edit_header(filename: str, change: Callable[[dict, bytes], None]) -> Mutation:
    """Rewrite a safetensors header (``change(header, data)`` edits it in place); data bytes unchanged."""

    def rewrite(raw: bytes) -> bytes:
        header, data = split_safetensors(raw)
        change(header, data)
        return join_safetensors(header, data)

    return edit_bytes(filename, rewrite)


def edit_tensors(filename: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    """Load every tensor of a file, let ``change`` edit the dict in place, write the file again."""

    def mutate(model: Path) -> None:
        path = model / filename
        infos, metadata = read_header(path)
        tensors = {name: read_tensor(info) for name, info in infos.items()}
        change(tensors)
        save_file(tensors, path, metadata)

    return mutate


def set_tensor(filename: str, name: str, make: Callable[[torch.Tensor | None], torch.Tensor | None]) -> Mutation:
    """Replace (``make(old)``), add (old is None) or delete (``make`` returns None) one tensor."""

    def change(tensors: dict[str, torch.Tensor]) -> None:
        value = make(tensors.get(name))
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value

    return edit_tensors(filename, change)


def poke(filename: str, name: str, value: float, index=(0, 0)) -> Mutation:
    """Set one element of a tensor (e.g. a scale to NaN)."""

    def make(old: torch.Tensor) -> torch.Tensor:
        new = old.clone()
        new[index] = value
        return new

    return set_tensor(filename, name, make)


def add_index(change: Callable[[dict], None] | None = None) -> Mutation:
    """Give a single-file checkpoint a ``model.safetensors.index.json`` naming every tensor (then edit it)."""

    def mutate(model: Path) -> None:
        infos, _ = read_header(model / ST)
        index = {"metadata": {"total_size": sum(i.nbytes for i in infos.values())}, "weight_map": {n: ST for n in infos}}
        if change is not None:
            change(index)
        (model / INDEX).write_text(json.dumps(index))

    return mutate


def split_in_two_shards(change: Callable[[dict], None] | None = None) -> Mutation:
    """Split model.safetensors into two shards with a correct index (then edit the index)."""

    def mutate(model: Path) -> None:
        infos, metadata = read_header(model / ST)
        names = list(infos)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for filename, part in halves.items():
            save_file({n: read_tensor(infos[n]) for n in part}, model / filename, metadata)
            weight_map.update({n: filename for n in part})
        (model / ST).unlink()
        index = {"metadata": {}, "weight_map": weight_map}
        if change is not None:
            change(index)
        (model / INDEX).write_text(json.dumps(index))

    return mutate


def symlink_outside(filename: str) -> Mutation:
    """Move a file out of the model directory and leave a symlink to it in its place."""

    def mutate(model: Path) -> None:
        outside = model.parent / f"outside-{filename}"
        shutil.move(model / filename, outside)
        (model / filename).symlink_to(outside)

    return mutate


def first_tensor_by_offset(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def overlap_two_tensors(header: dict, data: bytes) -> None:
    """Point k_proj.qweight's span at the start of q_proj.qweight (both int32, same K)."""
    q, k = header[f"{Q}.qweight"], header[f"{K}.qweight"]
    start = q["data_offsets"][0]
    k["data_offsets"] = [start, start + k["data_offsets"][1] - k["data_offsets"][0]]


def span_beyond_data(header: dict, data: bytes) -> None:
    entry = header[f"{Q}.qweight"]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + size]


def two_descriptions(model: Path) -> None:
    shutil.copy(model / MS_DESC, model / "quant_model_description_w8a16.json")
    shutil.move(model / MS_DESC, model / "quant_model_description_w8a8.json")


# ============================================================================= 1. bad inputs, table
@dataclass(frozen=True)
class Bad:
    id: str
    fixture: str
    mutate: Mutation
    needles: tuple[str, ...]
    at: str = "scan"  # "scan": inspect and convert fail; "load": inspect passes, convert fails
    targets: tuple[str, ...] = ("float",)


def bad(id, fixture, mutate, *needles, at="scan", targets=("float",)) -> Bad:
    return Bad(id, fixture, mutate, tuple(needles), at, targets)


def header_field(tensor: str, key: str, value: object) -> Mutation:
    """Set one field of one tensor's safetensors header entry."""
    return edit_header(ST, lambda header, data: header[tensor].__setitem__(key, value))


def drop(filename: str, tensor: str) -> Mutation:
    return set_tensor(filename, tensor, lambda old: None)


def cut(filename: str, tensor: str, rows: int | None = None, cols: int | None = None) -> Mutation:
    """Keep the first ``rows`` / ``cols`` of a tensor (a shape inconsistent with its neighbours)."""
    return set_tensor(filename, tensor, lambda old: old[:rows, :cols].contiguous() if old.dim() == 2 else old[:rows].contiguous())


def quant_config(keys: str, value: object) -> Mutation:
    """Set a key under config.json ``quantization_config`` (dotted path)."""
    return set_key("config.json", f"quantization_config.{keys}", value)


def ct_weights(key: str, value: object) -> Mutation:
    return quant_config(f"config_groups.group_0.weights.{key}", value)


def ms_describe(tensor: str, qtype: str | None) -> Mutation:
    """Set (or with None delete) one tensor's entry of the msModelSlim description."""
    return set_key(MS_DESC, (tensor,), qtype) if qtype is not None else delete_key(MS_DESC, (tensor,))


def drop_all_g_idx(tensors: dict[str, torch.Tensor]) -> None:
    for name in [n for n in tensors if n.endswith(".g_idx")]:
        del tensors[name]


def symlink_loop(model: Path) -> None:
    (model / "a.txt").symlink_to("b.txt")
    (model / "b.txt").symlink_to("a.txt")


SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INT4, INT8 = ("float", "npu-int4"), ("float", "npu-int8")

BAD_INPUTS = [
    # ------------------------------------------------------------------ safetensors files
    bad("st-weights-missing", GPTQ, remove(ST), "no *.safetensors weight files"),
    bad("st-empty-file", GPTQ, write_text(ST, ""), ST, "too short"),
    bad("st-truncated-data", GPTQ, edit_bytes(ST, lambda b: b[:-1000]), ST, "tensor '", "truncated"),
    bad("st-truncated-in-header", GPTQ, edit_bytes(ST, lambda b: b[:200]), ST, "header length"),
    bad("st-header-length-huge", GPTQ, edit_bytes(ST, lambda b: struct.pack("<Q", 2**63) + b[8:]), ST, "header length"),
    bad("st-header-not-json", GPTQ, edit_bytes(ST, lambda b: b[:8] + b"{oops" + b[13:]), ST, "not valid JSON"),
    bad("st-header-not-utf8", GPTQ, edit_bytes(ST, lambda b: b[:8] + b"\xff\xfe" + b[10:]), ST, "not valid JSON"),
    bad("st-header-nested-too-deeply", GPTQ, edit_bytes(ST, lambda b: struct.pack("<Q", 100_000) + b"[" * 100_000 + b[8:]),
        ST, "nested too deeply"),
    bad("st-header-not-object", GPTQ, edit_bytes(ST, lambda b: struct.pack("<Q", 2) + b"[]"), ST, "not a JSON object"),
    bad("st-metadata-not-object", GPTQ, edit_header(ST, lambda h, d: h.__setitem__("__metadata__", [1])), ST, "__metadata__"),
    bad("st-entry-not-object", GPTQ, edit_header(ST, lambda h, d: h.__setitem__(f"{Q}.g_idx", 5)), ST, f"{Q}.g_idx", "not an object"),
    bad("st-unknown-dtype", GPTQ, header_field(f"{Q}.g_idx", "dtype", "Q4"), ST, f"{Q}.g_idx", "unknown dtype 'Q4'"),
    bad("st-negative-shape", GPTQ, header_field(f"{Q}.qweight", "shape", [-16, 128]), ST, f"{Q}.qweight", "shape"),
    bad("st-shape-not-list", GPTQ, header_field(f"{Q}.qweight", "shape", "16x128"), ST, f"{Q}.qweight", "shape"),
    bad("st-offsets-not-pair", GPTQ, header_field(f"{Q}.qweight", "data_offsets", [0]), ST, f"{Q}.qweight", "data_offsets"),
    bad("st-offsets-decreasing", GPTQ, header_field(f"{Q}.qweight", "data_offsets", [8192, 0]), ST, f"{Q}.qweight", "increasing"),
    bad("st-offsets-overlap", GPTQ, edit_header(ST, overlap_two_tensors), ST, f"{K}.qweight", "overlap"),
    bad("st-offsets-out-of-bounds", GPTQ, edit_header(ST, span_beyond_data), ST, f"{Q}.qweight", "beyond"),
    bad("st-span-not-dtype-x-shape", GPTQ, header_field(f"{Q}.qweight", "shape", [16, 64]), ST, f"{Q}.qweight", "byte span"),
    bad("st-tensor-in-two-files", GPTQ, lambda m: shutil.copy(m / ST, m / "model-extra.safetensors"), "stored twice"),
    bad("st-directory-named-like-shard", GPTQ, chain(remove(ST), lambda m: (m / ST).mkdir()), ST, "not a regular file"),
    bad("st-fifo-as-shard", GPTQ, lambda m: os.mkfifo(m / "model-00002.safetensors"), "model-00002.safetensors", "not a regular file"),
    bad("st-dangling-symlink", GPTQ, chain(remove(ST), lambda m: (m / ST).symlink_to(m / "gone.safetensors")), ST, "cannot read"),
    bad("st-symlink-outside", GPTQ, symlink_outside(ST), ST, "symlink points outside the model directory"),
    # ------------------------------------------------------------------ index
    bad("index-names-missing-file", GPTQ, add_index(lambda i: i["weight_map"].__setitem__(f"{Q}.qweight", SHARD_2)),
        INDEX, f"{Q}.qweight", SHARD_2, "does not exist"),
    bad("index-names-missing-tensor", GPTQ, add_index(lambda i: i["weight_map"].__setitem__("model.layers.9.mlp.up_proj.qweight", ST)),
        "model.layers.9.mlp.up_proj.qweight", "no shard contains it"),
    bad("index-omits-a-tensor", GPTQ, add_index(lambda i: i["weight_map"].pop(f"{Q}.scales")), f"{Q}.scales", "not in the index"),
    bad("index-wrong-shard", GPTQ, split_in_two_shards(lambda i: i["weight_map"].__setitem__(f"{Q}.qweight", SHARD_1)),
        f"{Q}.qweight", SHARD_1, "but it is in"),
    bad("index-invalid-json", GPTQ, chain(add_index(), write_text(INDEX, '{"weight_map": ')), INDEX, "invalid JSON"),
    bad("index-not-object", GPTQ, chain(add_index(), write_text(INDEX, "[]")), INDEX, "expected a JSON object"),
    bad("index-empty-weight-map", GPTQ, add_index(lambda i: i.__setitem__("weight_map", {})), INDEX, "weight_map"),
    bad("index-weight-map-list", GPTQ, add_index(lambda i: i.__setitem__("weight_map", [ST])), INDEX, "weight_map"),
    bad("index-path-traversal", GPTQ, add_index(lambda i: i["weight_map"].__setitem__(f"{Q}.qweight", "../model.safetensors")),
        INDEX, f"{Q}.qweight", "invalid file name"),
    bad("index-file-not-string", GPTQ, add_index(lambda i: i["weight_map"].__setitem__(f"{Q}.qweight", 3)),
        INDEX, "invalid file name 3"),
    # ------------------------------------------------------------------ config.json
    bad("config-invalid-json", CT, write_text("config.json", "{"), "config.json", "invalid JSON"),
    bad("config-nested-too-deeply", CT, write_text("config.json", "[" * 100_000), "config.json", "nested too deeply"),
    bad("config-not-object", CT, write_text("config.json", "[1, 2]"), "config.json", "expected a JSON object"),
    bad("config-unknown-quant-method", AWQ, quant_config("quant_method", "bitsandbytes"), "config.json", "quant_method 'bitsandbytes'"),
    bad("config-quantization-config-not-object", CT, set_key("config.json", "quantization_config", "int4"),
        "config.json", "quantization_config"),
    bad("config-missing-ct", CT, remove("config.json"), "weight_packed", "no quantization config"),
    bad("config-missing-awq", AWQ, remove("config.json"), "qweight", "no quantization config"),
    bad("config-missing-gptq", GPTQ, remove("config.json", QC), "qweight", "no quantization config"),
    bad("config-missing-modelslim-description", MS, remove(MS_DESC), "holds quantized data", "no quantization config"),
    bad("config-symlink-outside", CT, symlink_outside("config.json"), "config.json", "symlink points outside"),
    # ------------------------------------------------------------------ GPTQ
    bad("gptq-quantize-config-invalid-json", GPTQ, write_text(QC, "{'bits': 4}"), QC, "invalid JSON"),
    bad("gptq-bits-5", GPTQ, gptq_setting("bits", 5), QC, "bits 5 is not supported"),
    bad("gptq-bits-string", GPTQ, gptq_setting("bits", "4"), QC, "bits '4' is not an integer"),
    bad("gptq-group-size-not-dividing-k", GPTQ, gptq_setting("group_size", 48), f"{Q}.qweight", "group_size 48 does not divide"),
    bad("gptq-group-size-zero", GPTQ, gptq_setting("group_size", 0), QC, "group_size 0"),
    bad("gptq-sym-not-bool", GPTQ, gptq_setting("sym", "yes"), QC, "sym 'yes' is not a boolean"),
    bad("gptq-format-gptq_p", GPTQ, gptq_setting("checkpoint_format", "gptq_p"), QC, "'gptq_p'", "not supported"),
    bad("gptq-marlin", GPTQ, gptq_setting("is_marlin_format", True), QC, "'marlin'", "not supported"),
    bad("gptq-unknown-format", GPTQ, gptq_setting("checkpoint_format", "exl2"), QC, "'exl2'"),
    bad("gptq-pack-dtype-int16", GPTQ, gptq_setting("pack_dtype", "int16"), QC, "pack_dtype 'int16'"),
    bad("gptq-dynamic-bad-regex", GPTQ, gptq_setting("dynamic", {"+:(": {"bits": 8}}), QC, "dynamic", "regex"),
    bad("gptq-dynamic-excluded-but-quantized", GPTQ, gptq_setting("dynamic", {r"-:.*q_proj": {}}), f"{Q}.qweight", "excluded"),
    bad("gptq-bits-3-vs-packed-rows", GPTQ, gptq_setting("bits", 3), f"{Q}.qweight", "3-bit codes"),
    bad("gptq-bits-8-vs-scales", GPTQ, gptq_setting("bits", 8), f"{Q}.scales", "groups"),
    bad("gptq-qzeros-missing", GPTQ, drop(ST, f"{Q}.qzeros"), f"{Q}.qzeros", "missing"),
    bad("gptq-scales-missing", GPTQ, drop(ST, f"{Q}.scales"), f"{Q}.scales", "missing"),
    bad("gptq-qzeros-wrong-shape", GPTQ, cut(ST, f"{Q}.qzeros", cols=8), f"{Q}.qzeros", "expected [4, 16]"),
    bad("gptq-scales-wrong-columns", GPTQ, cut(ST, f"{Q}.scales", cols=64), f"{Q}.scales", "64 columns"),
    bad("gptq-empty-qweight", GPTQ, chain(gptq_setting("group_size", -1), cut(ST, f"{Q}.qweight", rows=0)),
        f"{Q}.qweight", "holds no weights"),
    bad("gptq-qweight-float", GPTQ, set_tensor(ST, f"{Q}.qweight", lambda t: t.float()), f"{Q}.qweight", "int32"),
    bad("gptq-g_idx-wrong-length", GPTQ, cut(ST, f"{Q}.g_idx", rows=100), f"{Q}.g_idx", "length K = 128"),
    bad("gptq-g_idx-out-of-range", GPTQ_ACT, poke(ST, f"{Q}.g_idx", 9, index=(5,)), f"{Q}.g_idx", "[0, 2)"),
    bad("gptq-g_idx-float", GPTQ, set_tensor(ST, f"{Q}.g_idx", lambda t: t.float()), f"{Q}.g_idx", "integer vector"),
    bad("gptq-desc-act-without-g_idx", GPTQ_ACT, edit_tensors(ST, drop_all_g_idx), ".g_idx", "desc_act"),
    bad("gptq-sym-but-zero-points-asym", GPTQ_ACT, gptq_setting("sym", True), ".qzeros", "symmetric", at="load", targets=INT4),
    bad("gptq-scale-nan", GPTQ, poke(ST, f"{Q}.scales", float("nan")), f"{Q}.scales", "NaN or infinite", at="load", targets=INT4),
    bad("gptq-scale-inf", GPTQ, poke(ST, f"{Q}.scales", float("inf"), index=(3, 100)), f"{Q}.scales", "NaN or infinite", "[3, 100]",
        at="load"),
    # ------------------------------------------------------------------ AWQ
    bad("awq-gemv_fast", AWQ, quant_config("version", "gemv_fast"), "config.json", "gemv_fast"),
    bad("awq-unknown-version", AWQ, quant_config("version", "exllama"), "config.json", "'exllama'"),
    bad("awq-version-not-string", AWQ, quant_config("version", 2), "config.json", "version 2"),
    bad("awq-bits-8", AWQ, quant_config("bits", 8), "config.json", "bits 8"),
    bad("awq-zero-point-false", AWQ, quant_config("zero_point", False), "config.json", "zero_point False"),
    bad("awq-group-size-not-dividing-k", AWQ, quant_config("group_size", 96), f"{DOWN}.qweight", "group_size 96"),
    bad("awq-modules-to-not-convert-string", AWQ, quant_config("modules_to_not_convert", "lm_head"),
        "config.json", "modules_to_not_convert"),
    bad("awq-excluded-but-quantized", AWQ, quant_config("modules_to_not_convert", ["q_proj"]), f"{Q}.qweight", "modules_to_not_convert"),
    bad("awq-qzeros-missing", AWQ, drop(ST, f"{Q}.qzeros"), f"{Q}.qzeros", "missing"),
    bad("awq-qzeros-wrong-shape", AWQ, cut(ST, f"{Q}.qzeros", cols=8), f"{Q}.qzeros", "expected [1, 16]"),
    bad("awq-empty-qweight", AWQ, cut(ST, f"{Q}.qweight", rows=0), f"{Q}.qweight", "holds no weights"),
    bad("awq-qweight-int16", AWQ, set_tensor(ST, f"{Q}.qweight", lambda t: t.to(torch.int16)), f"{Q}.qweight", "int32"),
    bad("awq-scale-nan", AWQ, poke(ST, f"{Q}.scales", float("nan")), f"{Q}.scales", "NaN or infinite", at="load", targets=INT4),
    # ------------------------------------------------------------------ compressed-tensors
    bad("ct-sparsity-config", CT, quant_config("sparsity_config", {"format": "sparse-24-bitmask"}), "config.json", "sparsity_config"),
    bad("ct-transform-config", CT, quant_config("transform_config", {"config_groups": {"r": {}}}), "config.json", "transform_config"),
    bad("ct-unknown-format", CT, quant_config("config_groups.group_0.format", "marlin-24"), "config.json", "'marlin-24'"),
    bad("ct-num-bits-16", CT, ct_weights("num_bits", 16), "config.json", "num_bits 16"),
    bad("ct-packed-shape-vs-bits", CT, ct_weights("num_bits", 8), f"{DOWN}.weight_packed", "expected [128, 64]"),
    bad("ct-group-size-not-dividing-k", CT, ct_weights("group_size", 48), f"{DOWN}.weight_packed", "group_size 48 does not divide"),
    bad("ct-group-size-string", CT, ct_weights("group_size", "32"), "config.json", "group_size"),
    bad("ct-output-activations", CT, quant_config("config_groups.group_0.output_activations", {"num_bits": 8}),
        "config.json", "output_activations"),
    bad("ct-config-groups-list", CT, quant_config("config_groups", ["group_0"]), "config.json", "config_groups"),
    bad("ct-target-bad-regex", CT, quant_config("config_groups.group_0.targets", ["re:(["]), "config.json", "invalid regex"),
    bad("ct-status-initialized", CT, quant_config("quantization_status", "initialized"),
        "config.json", "quantization_status 'initialized'"),
    bad("ct-quantized-but-ignored", CT, quant_config("ignore", ["lm_head", "re:.*q_proj$"]), f"{Q}.weight_packed", "'ignore'"),
    bad("ct-zero-point-missing-asym", CT, drop(ST, f"{Q}.weight_zero_point"), f"{Q}.weight_zero_point", "asymmetric"),
    bad("ct-weight-shape-missing", CT, drop(ST, f"{Q}.weight_shape"), f"{Q}.weight_shape", "missing"),
    bad("ct-weight-shape-disagrees", CT, set_tensor(ST, f"{Q}.weight_shape", lambda t: torch.tensor([64, 128])),
        f"{Q}.weight_shape", "[64, 128]"),
    bad("ct-scale-missing", CT, drop(ST, f"{Q}.weight_scale"), f"{Q}.weight_scale", "missing"),
    bad("ct-scale-wrong-shape", CT, cut(ST, f"{Q}.weight_scale", cols=2), f"{Q}.weight_scale", "expected [128, 4]"),
    bad("ct-g_idx-wrong-length", CT, set_tensor(ST, f"{Q}.weight_g_idx", lambda t: torch.zeros(100, dtype=torch.int32)),
        f"{Q}.weight_g_idx", "[128]"),
    bad("ct-g_idx-out-of-range", CT, set_tensor(ST, f"{Q}.weight_g_idx", lambda t: torch.arange(128, dtype=torch.int32) // 4),
        f"{Q}.weight_g_idx", "outside [0, 4)"),
    bad("ct-empty-weight", CT_W8A8, cut(ST, f"{Q}.weight", cols=0), f"layer '{Q}'", "is empty"),
    bad("ct-scale-nan", CT, poke(ST, f"{Q}.weight_scale", float("nan")), f"{Q}.weight_scale", "NaN or infinite", at="load", targets=INT4),
    bad("ct-input-scale-zero", "ct020_fp8_static", poke(ST, f"{Q}.input_scale", 0.0, index=(0,)), f"{Q}.input_scale", "not positive",
        at="load"),
    bad("ct-global-scale-zero", "ct020_nvfp4a16", poke(ST, f"{Q}.weight_global_scale", 0.0, index=(0,)), f"{Q}.weight_global_scale",
        "not positive", at="load"),
    # ------------------------------------------------------------------ msModelSlim
    bad("ms-description-invalid-json", MS, write_text(MS_DESC, "{"), MS_DESC, "invalid JSON"),
    bad("ms-description-not-object", MS, write_text(MS_DESC, '["W8A16"]'), MS_DESC, "expected a JSON object"),
    bad("ms-two-descriptions", MS, two_descriptions, "quant_model_description_w8a16.json", "several"),
    bad("ms-describes-missing-tensor", MS, ms_describe("model.layers.0.mlp.extra_proj.weight", "W8A16"),
        MS_DESC, "model.layers.0.mlp.extra_proj.weight", "not in the checkpoint"),
    bad("ms-undescribed-tensor", MS, ms_describe("model.norm.weight", None), "model.norm.weight", "no entry"),
    bad("ms-unknown-type", MS, ms_describe(f"{Q}.weight", "W3A5"), f"{Q}.weight", "'W3A5' is not supported"),
    bad("ms-sparse-type", MS, ms_describe(f"{Q}.weight", "W8A8S"), f"{Q}.weight", "'W8A8S' is not supported"),
    bad("ms-unexplained-tensor", MS, chain(set_tensor(MS_ST, f"{Q}.weight_dual_scale", lambda t: torch.ones(128, 1)),
                                           ms_describe(f"{Q}.weight_dual_scale", "W8A16")),
        f"{Q}.weight_dual_scale", "not understood"),
    bad("ms-offset-not-integer", MS, poke(MS_ST, f"{Q}.weight_offset", 0.5), f"{Q}.weight_offset", "0.5"),
    bad("ms-scale-missing", MS, chain(drop(MS_ST, f"{Q}.weight_scale"), ms_describe(f"{Q}.weight_scale", None)),
        f"{Q}.weight_scale", "missing"),
    bad("ms-scale-rows-mismatch", MS, chain(cut(MS_ST, f"{Q}.weight_scale", rows=64), cut(MS_ST, f"{Q}.weight_offset", rows=64)),
        f"{Q}.weight", "64"),
    bad("ms-empty-weight", MS, cut(MS_ST, f"{Q}.weight", cols=0), f"layer '{Q}'", "is empty"),
    bad("ms-static-input-scale-zero", MS_STATIC, poke(MS_ST, f"{Q}.input_scale", 0.0, index=(0,)),
        f"{Q}.input_scale", "not a positive number"),
    bad("ms-static-deq-scale-missing", MS_STATIC, chain(drop(MS_ST, f"{Q}.deq_scale"), ms_describe(f"{Q}.deq_scale", None)),
        f"{Q}.deq_scale", "missing"),
    bad("ms-mx-scale-wrong-shape", MS_MX, cut(MS_ST, f"{Q}.weight_scale", cols=3), f"{Q}.weight_scale", "[128, 4]"),
    bad("ms-scale-nan", MS, poke(MS_ST, f"{Q}.weight_scale", float("nan")), f"{Q}.weight_scale", "NaN or infinite",
        at="load", targets=INT8),
    bad("ms-mx-scale-e8m0-nan", MS_MX, poke(MS_ST, f"{Q}.weight_scale", 255), f"{Q}.weight_scale", "255 (NaN)",
        at="load", targets=("float", "npu-mxfp8")),
    bad("ms-static-deq-scale-inf", MS_STATIC, set_tensor(MS_ST, f"{Q}.deq_scale", lambda t: torch.full_like(t, 0x7F800000)),
        f"{Q}.deq_scale", "NaN or infinite", at="load", targets=("float", "npu-w8a8")),
    # ------------------------------------------------------------------ side files (only a conversion copies them)
    bad("side-file-symlink-outside", GPTQ, symlink_outside("tokenizer.json"), "tokenizer.json", "symlink points outside", at="load"),
    bad("side-file-fifo", GPTQ, lambda m: os.mkfifo(m / "notes.txt"), "notes.txt", "not a regular file", at="load"),
    bad("side-file-dangling-symlink", GPTQ, lambda m: (m / "README.md").symlink_to(m / "gone.md"),
        "README.md", "not a regular file", at="load"),
    bad("side-file-symlink-loop", GPTQ, symlink_loop, ".txt", "not a regular file", at="load"),
]


def test_bad_input_table_is_large_and_distinct():
    assert len(BAD_INPUTS) >= 40
    assert len({case.id for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.id)
def test_bad_input_is_a_clean_error(case: Bad, tmp_path):
    model = copy_fixture(case.fixture, tmp_path)
    case.mutate(model)
    before = tree_state(model)
    inspected = run_cli("inspect", model)
    if case.at == "scan":
        cli_error(inspected, case.needles)
    else:
        assert inspected.exit_code == 0, inspected.output
    for target in case.targets:
        out = tmp_path / f"out-{target}"
        cli_error(run_cli("convert", model, out, "--to", target, "-q"), case.needles)
        assert_no_output(out)
    assert tree_state(model) == before


def test_bad_input_json_mode_reports_one_object(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    gptq_setting("bits", 5)(model)
    for args in (("inspect", model, "--json"), ("convert", model, tmp_path / "out", "--to", "float", "--json")):
        result = run_cli(*args)
        assert result.exit_code == 2 and result.stderr == ""
        report = json.loads(result.stdout)
        assert report["ok"] is False and report["exit_code"] == 2 and "bits 5 is not supported" in report["error"]


# A sample of the table through a real interpreter: the process's own exit status and stderr.
# (one interpreter start costs ~2 s, so a sample: a file defect, a config defect, a load-time defect)
PROCESS_SAMPLE = [("st-header-not-json", "inspect"), ("gptq-format-gptq_p", "convert"), ("ct-scale-nan", "convert")]


@pytest.mark.parametrize("case_id, command", PROCESS_SAMPLE)
def test_bad_input_in_a_real_process(case_id, command, tmp_path):
    case = next(c for c in BAD_INPUTS if c.id == case_id)
    model = copy_fixture(case.fixture, tmp_path)
    case.mutate(model)
    out = tmp_path / "out"
    args = ("inspect", model) if command == "inspect" else ("convert", model, out, "--to", case.targets[-1])
    process_error(run_process(*args), case.needles)
    assert_no_output(out)


# ---------------------------------------------------------------------- zero / negative scales: warned
@pytest.mark.parametrize(
    "fixture, filename, tensor, target",
    [
        (GPTQ, ST, f"{Q}.scales", "npu-int4"),
        (AWQ, ST, f"{Q}.scales", "npu-int4"),
        (CT, ST, f"{Q}.weight_scale", "npu-int4"),
        (MS, MS_ST, f"{Q}.weight_scale", "npu-int8"),
    ],
)
def test_zero_and_negative_scales_convert_with_a_warning(fixture, filename, tensor, target, tmp_path):
    model = copy_fixture(fixture, tmp_path)
    chain(poke(filename, tensor, 0.0), poke(filename, tensor, -0.5, index=(0, 1)))(model)
    out = tmp_path / "out"
    result = run_cli("convert", model, out, "--to", target, "-q")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and tensor in warning[0] and "2 scale value(s) are zero or negative" in warning[0], result.stderr
    assert (out / "npuconv.json").is_file()


# ============================================================== 1b. command line, paths, verify
@pytest.fixture(scope="module")
def converted_gptq(tmp_path_factory) -> tuple[Path, Path]:
    """(source copy, its npu-int4 output), made once; tests copy the output before editing it."""
    root = tmp_path_factory.mktemp("converted")
    model = copy_fixture(GPTQ, root)
    out = root / "npu"
    convert(model, out, ConvertOptions("npu-int4"))
    return model, out


def copy_output(converted_gptq, tmp_path) -> Path:
    out = tmp_path / "npu"
    shutil.copytree(converted_gptq[1], out)
    return out


def test_model_path_does_not_exist(tmp_path):
    cli_error(run_cli("inspect", tmp_path / "nothing-here"), ("nothing-here", "no such directory"))


def test_model_path_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    cli_error(run_cli("inspect", tmp_path / "model.safetensors"), ("model.safetensors", "not a directory"))


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    cli_error(run_cli("inspect", tmp_path / "empty"), ("empty", "directory is empty"))
    cli_error(run_cli("convert", tmp_path / "empty", tmp_path / "out", "--to", "float"), ("empty", "directory is empty"))
    assert_no_output(tmp_path / "out")


def test_output_equal_to_model(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    before = tree_state(model)
    cli_error(run_cli("convert", model, model, "--to", "float", "--force"), ("must not be the model directory",))
    assert tree_state(model) == before


def test_output_inside_model(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    before = tree_state(model)
    cli_error(run_cli("convert", model, model / "sub" / "out", "--to", "float"), ("must not be the model directory or inside it",))
    assert tree_state(model) == before


def test_output_containing_model(tmp_path):
    model = copy_fixture(GPTQ, tmp_path / "parent")
    cli_error(run_cli("convert", model, tmp_path / "parent", "--to", "float", "--force"), ("must not contain the model directory",))
    assert model.is_dir()


def test_output_exists_without_force(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli_error(run_cli("convert", model, out, "--to", "float"), (str(out), "already exists", "--force"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not leftovers(out)


def test_output_is_a_dangling_symlink(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    cli_error(run_cli("convert", model, out, "--to", "float"), (str(out), "symbolic link"))  # refused before any work
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    assert not leftovers(out)


def test_unknown_target(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    cli_error(run_cli("convert", model, tmp_path / "out", "--to", "npu-int3"), ("unknown target 'npu-int3'",))
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("size", ["5XB", "0", "-1GB", "lots", "1.5.2GB"])
def test_bad_max_shard_size(size, tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    cli_error(run_cli("convert", model, tmp_path / "out", "--to", "float", "--max-shard-size", size), (repr(size),))
    assert_no_output(tmp_path / "out")


def test_target_that_cannot_take_the_layers(tmp_path):
    model = copy_fixture("ct020_nvfp4a16", tmp_path)
    cli_error(run_cli("convert", model, tmp_path / "out", "--to", "npu-int4"), ("cannot be written as npu-int4",))
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "MODEL"],  # OUT missing
        ["convert", "MODEL", "OUT", "--to", "float", "--dtype", "int3"],
        ["convert", "MODEL", "FILE", "--to", "float", "--force"],  # OUT is an existing file
        ["verify", "MODEL", "--tokens", "0"],
        ["inspect"],
        ["frobnicate"],
    ],
    ids=["out-missing", "bad-dtype", "out-is-a-file", "tokens-zero", "model-missing", "unknown-command"],
)
def test_usage_errors_exit_2_without_traceback(args, tmp_path):
    """click's own usage errors: exit 2 and an ``Error:`` line after the usage text (not our one-liner)."""
    model = copy_fixture(GPTQ, tmp_path)
    (tmp_path / "file").write_text("x")
    args = [{"MODEL": model, "OUT": tmp_path / "out", "FILE": tmp_path / "file"}.get(a, a) for a in args]
    result = run_cli(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: "), result.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_verify_without_manifest(converted_gptq, tmp_path):
    out = copy_output(converted_gptq, tmp_path)
    (out / "npuconv.json").unlink()
    cli_error(run_cli("verify", out), ("npuconv.json", "missing"))


def test_verify_manifest_names_no_source(converted_gptq, tmp_path):
    out = copy_output(converted_gptq, tmp_path)
    delete_key("npuconv.json", "source.id")(out)
    cli_error(run_cli("verify", out), ("npuconv.json names no source", "--source"))


def test_verify_source_is_gone(converted_gptq, tmp_path):
    out = copy_output(converted_gptq, tmp_path)
    set_key("npuconv.json", "source.id", str(tmp_path / "deleted-model"))(out)
    cli_error(run_cli("verify", out), ("deleted-model", "not found; pass --source MODEL"))


def test_verify_manifest_invalid_json(converted_gptq, tmp_path):
    out = copy_output(converted_gptq, tmp_path)
    (out / "npuconv.json").write_text('{"target": ')
    cli_error(run_cli("verify", out), ("npuconv.json", "invalid JSON"))


def test_verify_layers_matching_nothing(converted_gptq, tmp_path):
    out = copy_output(converted_gptq, tmp_path)
    cli_error(run_cli("verify", out, "--layers", "*.no_such_proj"), ("--layers '*.no_such_proj' matches no quantized layer",))
    cli_error(run_cli("verify", FIXTURES / GPTQ, "--layers", "nothing"), ("matches no quantized layer",))


def test_verify_with_nothing_to_verify(tmp_path):
    """A float output (no quantized layers, no kernel) and no --source: nothing can be checked."""
    out = tmp_path / "float"
    convert(FIXTURES / AWQ, out, ConvertOptions("float"))
    cli_error(run_cli("verify", out), ("no quantized layer",))


def test_verify_modified_shard_is_a_failure_not_a_crash(converted_gptq, tmp_path):
    out = copy_output(converted_gptq, tmp_path)
    with open(out / ST, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    cli_error(run_cli("verify", out), (ST, "sha256 differs"), code=1)


# ============================================================================ 2. input untouched
def test_input_untouched_by_inspect_convert_and_verify(tmp_path):
    model = copy_fixture(GPTQ_ACT, tmp_path)
    before = tree_state(model)
    assert run_cli("inspect", model, "--layers").exit_code == 0
    assert run_cli("inspect", model, "--json").exit_code == 0
    out = tmp_path / "out"
    assert run_cli("convert", model, out, "--to", "npu-int4", "-q").exit_code == 0
    assert run_cli("convert", model, tmp_path / "float", "--to", "float", "--max-shard-size", "50KB", "-q").exit_code == 0
    assert run_cli("convert", model, out, "--to", "npu-int4", "--force", "-q").exit_code == 0  # replace
    assert run_cli("convert", model, out, "--to", "float", "-q").exit_code == 2  # fails: OUT exists
    assert run_cli("convert", model, tmp_path / "dry", "--to", "npu-int4", "--dry-run").exit_code == 0
    assert not (tmp_path / "dry").exists()
    output_before = tree_state(out)
    assert run_cli("verify", out, "-q").exit_code == 0  # reads the output and the source
    assert run_cli("verify", model, "-q").exit_code == 0  # checks the source against itself
    assert tree_state(out) == output_before
    assert tree_state(model) == before


def test_input_untouched_by_a_conversion_that_fails_mid_write(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    poke(ST, "model.layers.0.mlp.down_proj.scales", float("nan"))(model)  # the last layer: fails after others were written
    before = tree_state(model)
    out = tmp_path / "out"
    cli_error(run_cli("convert", model, out, "--to", "npu-int4"), ("down_proj.scales", "NaN"))
    assert_no_output(out)
    assert tree_state(model) == before


def test_failed_force_conversion_keeps_the_previous_output(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    out = tmp_path / "out"
    assert run_cli("convert", model, out, "--to", "float", "-q").exit_code == 0
    previous = tree_state(out)
    poke(ST, f"{Q}.scales", float("nan"))(model)
    cli_error(run_cli("convert", model, out, "--to", "float", "--force"), (f"{Q}.scales",))
    assert tree_state(out) == previous
    assert not leftovers(out)


def test_read_only_input_converts(tmp_path):
    """MODEL needs no write permission (fixtures are shipped read-only; as root this is a no-op check)."""
    model = copy_fixture(AWQ, tmp_path)
    for path in [*model.iterdir(), model]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    try:
        before = tree_state(model)
        assert run_cli("convert", model, tmp_path / "out", "--to", "npu-int4", "-q").exit_code == 0
        assert tree_state(model) == before
    finally:
        make_writable(model)


# ======================================================================= 3. atomic under signals
BIG_LAYERS, BIG_K, BIG_N, BIG_GROUP = 48, 4096, 2048, 128  # ~210 MB of GPTQ tensors


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A valid 4-bit symmetric GPTQ v1 checkpoint of ~210 MB (random codes), built once per module."""
    root = tmp_path_factory.mktemp("big") / "model"
    root.mkdir()
    generator = torch.Generator().manual_seed(0)
    groups = BIG_K // BIG_GROUP
    qzeros = pack_bitstream(torch.full((groups, BIG_N), 7, dtype=torch.uint8), 4)  # v1 symmetric: field 2**3 - 1
    g_idx = torch.arange(BIG_K, dtype=torch.int32) // BIG_GROUP
    tensors = {}
    for i in range(BIG_LAYERS):
        prefix = f"model.layers.{i}.mlp.down_proj"
        # random words are random 4-bit codes
        tensors[f"{prefix}.qweight"] = torch.randint(-(2**31), 2**31 - 1, (BIG_K * 4 // 32, BIG_N), dtype=torch.int32, generator=generator)
        tensors[f"{prefix}.qzeros"] = qzeros
        tensors[f"{prefix}.scales"] = (torch.rand(groups, BIG_N, generator=generator) * 1e-2 + 1e-3).half()
        tensors[f"{prefix}.g_idx"] = g_idx
    tensors["model.norm.weight"] = torch.ones(BIG_K, dtype=torch.float16)
    save_file(tensors, root / ST)
    del tensors
    (root / QC).write_text(json.dumps({"bits": 4, "group_size": BIG_GROUP, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16", "num_hidden_layers": BIG_LAYERS}))
    (root / "tokenizer_config.json").write_text("{}")
    assert (root / ST).stat().st_size > 200_000_000
    return root


def start_convert(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "npuconv", "convert", str(model), str(out), "--to", "npu-int4", "-q", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env(),
    )


def bytes_written(out: Path) -> int:
    """Bytes in the files of the temporary sibling(s) of ``out`` (``.out.npuconv-tmp-*/build/…``)."""
    total = 0
    for tmp in leftovers(out):
        for directory, _, files in os.walk(tmp):
            for name in files:
                try:
                    total += os.stat(os.path.join(directory, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def wait_until_writing(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 120) -> None:
    """Block until the conversion has written ``at_least`` bytes into its temporary directory."""
    deadline = time.monotonic() + timeout
    while bytes_written(out) < at_least:
        assert proc.poll() is None, f"conversion ended (exit {proc.returncode}) before it could be interrupted: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "conversion did not start writing"
        time.sleep(0.005)


@pytest.mark.parametrize("workers", ["1", "4"])
def test_sigint_mid_conversion_leaves_nothing(big_model, workers, tmp_path):
    before = tree_state(big_model)
    out = tmp_path / "out"
    proc = start_convert(big_model, out, "--max-shard-size", "60MB", "--workers", workers)
    wait_until_writing(proc, out, 70_000_000)  # past the first shard, inside the second
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    message = clean_error(proc.returncode, stdout, stderr, ("interrupted",), code=130)
    assert "nothing was published" in message
    assert_no_output(out)
    assert tree_state(big_model) == before


def test_sigkill_mid_conversion_publishes_nothing_and_a_rerun_completes(big_model, tmp_path):
    before = tree_state(big_model)
    out = tmp_path / "out"
    proc = start_convert(big_model, out)
    wait_until_writing(proc, out, 20_000_000)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = leftovers(out)  # a killed process cannot clean up: its temporary directory and lock file stay
    assert len(stale) <= 2

    rerun = run_process("convert", big_model, out, "--to", "npu-int4", "-q", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert out.is_dir() and leftovers(out) == []  # the rerun removed what the killed run left (its owner is dead)
    manifest = json.loads((out / "npuconv.json").read_text())
    assert len(manifest["layers"]) == BIG_LAYERS
    # checksums of every shard, then one layer through the kernel check (verify is the completeness proof)
    result = run_cli("verify", out, "--layers", "model.layers.47.*", "-q")
    assert result.exit_code == 0, result.output
    assert tree_state(big_model) == before


@pytest.mark.parametrize("sig, code", [(signal.SIGHUP, 129), (signal.SIGTERM, 143)], ids=["SIGHUP", "SIGTERM"])
def test_hangup_and_terminate_mid_conversion_exit_cleanly(big_model, tmp_path, sig, code):
    """A closed terminal (SIGHUP) is handled like SIGTERM: one line, 128 + signal, nothing left."""
    out = tmp_path / "out"
    proc = start_convert(big_model, out)
    wait_until_writing(proc, out, 20_000_000)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    clean_error(proc.returncode, stdout, stderr, (signal.Signals(sig).name,), code=code)
    assert_no_output(out)


def test_a_second_ctrl_c_during_cleanup_is_ignored(big_model, tmp_path):
    """Ctrl-C twice (the second while the first unwinds the worker threads): still one line, 130, nothing left."""
    out = tmp_path / "out"
    proc = start_convert(big_model, out, "--workers", "4", "--max-shard-size", "60MB")
    wait_until_writing(proc, out, 70_000_000)
    proc.send_signal(signal.SIGINT)
    for _ in range(5):
        time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    clean_error(proc.returncode, stdout, stderr, ("interrupted",), code=130)
    assert_no_output(out)


# ======================================================================= 4. disk full, write errors
def limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("limit", [100, 20_000], ids=["in-header", "mid-tensor"])
def test_file_size_limit_is_a_clean_write_error(limit, tmp_path):
    """RLIMIT_FSIZE makes writes past ``limit`` fail with EFBIG (the CLI ignores SIGXFSZ): disk full in miniature."""
    model = copy_fixture(MS, tmp_path)
    out = tmp_path / "out"
    proc = run_process("convert", model, out, "--to", "npu-int8", preexec_fn=limit_file_size(limit))
    process_error(proc, ("write failed", "File too large"))
    assert_no_output(out)


def test_file_size_limit_on_a_big_conversion(big_model, tmp_path):
    out = tmp_path / "out"
    proc = run_process("convert", big_model, out, "--to", "npu-int4", preexec_fn=limit_file_size(30_000_000))
    process_error(proc, ("model.safetensors", "write failed"))
    assert_no_output(out)
    assert run_process("convert", FIXTURES / GPTQ, out, "--to", "float").returncode == 0  # the same OUT works afterwards


def test_write_error_on_a_side_file_is_a_clean_error(tmp_path):
    model = copy_fixture(MS, tmp_path)
    (model / "tokenizer.json").write_text(json.dumps({"padding": "x" * 1_000_000}))  # bigger than any shard
    out = tmp_path / "out"
    proc = run_process("convert", model, out, "--to", "npu-int8", preexec_fn=limit_file_size(600_000))
    process_error(proc, ("tokenizer.json",))
    assert_no_output(out)


def test_parent_of_output_is_a_file(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    (tmp_path / "plain-file").write_text("x")
    out = tmp_path / "plain-file" / "out"
    cli_error(run_cli("convert", model, out, "--to", "float"), ("plain-file", "cannot create the output directory"))
    assert (tmp_path / "plain-file").read_text() == "x"


def test_parent_of_output_is_not_writable_even_for_root(tmp_path):
    """/proc refuses new entries whatever the permission bits (so this holds when running as root)."""
    model = copy_fixture(GPTQ, tmp_path)
    out = Path("/proc") / f"npuconv-test-{os.getpid()}" / "out"
    cli_error(run_cli("convert", model, out, "--to", "float"), ("/proc", "cannot create the output directory"))
    assert not out.parent.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (see the /proc test)")
def test_parent_of_output_is_read_only(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        cli_error(run_cli("convert", model, parent / "out", "--to", "float"), ("locked", "cannot create the output directory"))
        assert list(parent.iterdir()) == []
    finally:
        os.chmod(parent, 0o755)


# =========================================================================== 5. deterministic output
DETERMINISM_RUNS = [
    (GPTQ_ACT, ["--to", "npu-int4", "--nz"]),
    (CT_W8A8, ["--to", "npu-w8a8"]),
    (MS_STATIC, ["--to", "npu-w8a8"]),
    (AWQ, ["--to", "float", "--max-shard-size", "100KB"]),  # several shards and an index
]
CHILD = """import json, sys
from npuconv.cli import cli
for args in json.loads(sys.argv[1]):
    cli.main(args=args, prog_name="npuconv", standalone_mode=False)
"""


def test_output_is_byte_identical_across_runs_and_hash_seeds(tmp_path):
    """Each conversion runs twice in fresh interpreters with different PYTHONHASHSEEDs (set/dict order)."""
    outputs = {}
    for seed in ("1", "2"):
        runs = [["convert", str(FIXTURES / f), str(tmp_path / seed / f), *opts, "-q"] for f, opts in DETERMINISM_RUNS]
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], capture_output=True, text=True,
                              env=process_env(PYTHONHASHSEED=seed), timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs[seed] = {f: file_bytes(tmp_path / seed / f) for f, _ in DETERMINISM_RUNS}
    for fixture, _ in DETERMINISM_RUNS:
        first, second = outputs["1"][fixture], outputs["2"][fixture]
        assert "npuconv.json" in first and "config.json" in first
        assert sorted(first) == sorted(second), fixture
        for name in first:
            assert first[name] == second[name], f"{fixture}: {name} differs between runs"
    assert INDEX in outputs["1"][AWQ] and len([n for n in outputs["1"][AWQ] if n.endswith(".safetensors")]) > 1


# ============================================================================================ 6. fuzz
# fixed examples by default (a stable CI); NPUCONV_FUZZ_EXAMPLES=5000 runs that many fresh random ones
FUZZ_EXAMPLES = os.environ.get("NPUCONV_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(FUZZ_EXAMPLES or 100), deadline=None, database=None, derandomize=FUZZ_EXAMPLES is None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def exercise(model: Path, targets: tuple[str, ...] = ("float",)) -> None:
    """Everything inspect and convert do to a checkpoint, in memory, and the outcome checked: either an
    NpuconvError whose one-line message names the input (a file, tensor or layer of it), or an output whose
    layers, decoded by the spec decoders of tests/spec_decoders.py, are the reader's dequantization."""
    try:
        inspect_checkpoint(Checkpoint(model))
        for target in targets:
            plan = make_plan(Checkpoint(model), ConvertOptions(target))
            stored: dict[str, torch.Tensor] = {}
            for shard in plan.shards:
                for unit in shard.units:
                    stored.update(unit.produce())
            check_output(plan, stored)
    except NpuconvError as error:
        assert_names_the_input(str(error), model)


def assert_names_the_input(message: str, model: Path) -> None:
    assert message and "\n" not in message.strip(), f"not a one-line message: {message!r}"
    names = {p.name for p in model.iterdir()} | {str(model), "config.json", "quantization_config", "quantize_config"}
    for path in model.glob("*.safetensors"):
        try:
            tensors = list(read_header(path)[0])
        except NpuconvError:
            continue
        names.update(tensors)
        names.update(t.rsplit(".", 1)[0] for t in tensors)
    assert any(name and name in message for name in names), f"the error names no file, tensor or layer: {message!r}"


def check_output(plan, stored: dict[str, torch.Tensor]) -> None:
    """Silent acceptance is not allowed: what was written decodes (independently of the writer) to the
    weights the reader read, shapes included."""
    for spec in plan.layers:
        entry = plan.writer.layer_manifest(spec)
        decoded = decode_layers({spec.name: entry}, stored)[spec.name]
        expected = dequantize(plan.reader.load(spec), torch.float32).double()
        assert decoded.shape == expected.shape, (spec.name, decoded.shape, expected.shape)
        rtol = 1e-2 if entry["kernel"] == "torch.nn.functional.linear" else 2e-6  # the float target: stored in bf16
        torch.testing.assert_close(decoded, expected, rtol=rtol, atol=1e-30, equal_nan=True, msg=spec.name)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fuzz_model(fuzz_root: Path, fixture: str) -> Path:
    model = fuzz_root / fixture
    if not model.exists():
        copy_fixture(fixture, fuzz_root, fixture)
    return model


def gptq_tensor_names() -> list[str]:
    return list(read_header(FIXTURES / GPTQ / ST)[0])


@FUZZ
@given(data=st.data())
def test_fuzz_index_json(fuzz_root, data):
    model = fuzz_model(fuzz_root, GPTQ)
    names = gptq_tensor_names()
    files = st.sampled_from([ST, "model-00002-of-00002.safetensors", "", ".hidden", "../x", "sub/model.safetensors"])
    entry_value = files | JSON
    weight_map = st.dictionaries(st.sampled_from(names) | st.text(max_size=20), entry_value, max_size=len(names) + 3)
    full_map = st.builds(lambda drop, extra: {**{n: ST for n in names if n not in drop}, **extra},
                         st.sets(st.sampled_from(names), max_size=2), st.dictionaries(st.text(max_size=8), entry_value, max_size=2))
    index = data.draw(st.one_of(
        st.fixed_dictionaries({"weight_map": weight_map | full_map}, optional={"metadata": JSON}),
        JSON,
    ))
    (model / INDEX).write_text(json.dumps(index))
    try:
        exercise(model)
    finally:
        (model / INDEX).unlink()


@FUZZ
@given(data=st.data())
def test_fuzz_quantize_config(fuzz_root, data):
    model = fuzz_model(fuzz_root, GPTQ_ACT)
    base = json.loads((FIXTURES / GPTQ_ACT / QC).read_text())
    values = {
        "bits": st.sampled_from([2, 3, 4, 8, 0, -1, 5, 16, 4.0, "4", None, True]),
        "group_size": st.sampled_from([-1, 0, 1, 16, 32, 48, 64, 128, 256, 1024, -2, "64", None, 64.5]),
        "sym": st.sampled_from([True, False, None, "true", 1]),
        "desc_act": st.sampled_from([True, False, None, "false", 0]),
        "checkpoint_format": st.sampled_from(["gptq", "gptq_v2", "GPTQ", "gptq_p", "marlin", "bitblas", "", None, 2, ["gptq"]]),
        "pack_dtype": st.sampled_from(["int32", "torch.int32", "int16", None, 32]),
        "lm_head": st.sampled_from([True, False, None, "yes"]),
        "dynamic": st.one_of(JSON, st.dictionaries(st.sampled_from([r"-:.*q_proj", r"+:.*mlp.*", r".*", "(", "+:["]),
                                                   st.dictionaries(st.sampled_from(["bits", "group_size", "sym", "desc_act"]),
                                                                   st.sampled_from([2, 3, 4, 8, 5, 32, 64, -1, True, None, "x"])),
                                                   max_size=3)),
        "is_marlin_format": st.sampled_from([False, True, None]),
        "quant_method": st.sampled_from(["gptq", "GPTQModel", "awq", 7]),
    }
    config = dict(base)
    for key in data.draw(st.sets(st.sampled_from(sorted(values)), min_size=1, max_size=4)):
        if data.draw(st.booleans().map(lambda drop: drop and key in config)):
            del config[key]
        else:
            config[key] = data.draw(values[key])
    if data.draw(st.integers(0, 9)) == 0:
        config = data.draw(JSON)
    (model / QC).write_text(json.dumps(config))
    exercise(model, ("float", "npu-int4"))


@FUZZ
@given(data=st.data())
def test_fuzz_modelslim_description(fuzz_root, data):
    fixture = data.draw(st.sampled_from([MS, MS_STATIC, "ms_w4a8_dynamic", MS_MX]))
    model = fuzz_model(fuzz_root, fixture)
    description = json.loads((FIXTURES / fixture / MS_DESC).read_text())
    keys = sorted(description)
    types = st.sampled_from(["FLOAT", "W8A16", "W8A8", "W8A8_DYNAMIC", "W4A16", "W4A8_DYNAMIC", "W4A4_DYNAMIC", "W8A8_MIX",
                             "WFP8AFP8_DYNAMIC", "W8A8_MXFP8", "W4A8_MXFP", "W4A16_MXFP4", "C8", "W8A8S", "NF4", "", "w8a16"])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["retype", "drop", "add", "junk"]))
        if action == "retype":
            description[data.draw(st.sampled_from(keys))] = data.draw(types | JSON)
        elif action == "drop":
            description.pop(data.draw(st.sampled_from(keys)), None)
        elif action == "add":
            suffix = data.draw(st.sampled_from([".weight", ".weight_scale", ".weight_offset", ".bias", ".deq_scale", ".module.weight", ""]))
            description[data.draw(st.sampled_from([Q, "model.layers.0.mlp.new_proj", "x"])) + suffix] = data.draw(types)
        else:
            key = data.draw(st.sampled_from(["version", "model_quant_type", "group_size", "metadata", "kv_quant_type"]))
            description[key] = data.draw(JSON)
    if data.draw(st.integers(0, 9)) == 0:
        description = data.draw(JSON)
    (model / MS_DESC).write_text(json.dumps(description))
    exercise(model, ("float",))


@FUZZ
@given(data=st.data())
def test_fuzz_compressed_tensors_quantization_config(fuzz_root, data):
    model = fuzz_model(fuzz_root, CT)
    config = json.loads((FIXTURES / CT / "config.json").read_text())
    qc = config["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    values = {
        "num_bits": st.sampled_from([1, 2, 3, 4, 8, 0, 16, -4, "4", None, 4.0]),
        "group_size": st.sampled_from([None, -1, 0, 16, 32, 48, 128, 256, "32", 7]),
        "strategy": st.sampled_from(["group", "channel", "tensor", "block", "token", "tensor_group", "attn_head", None, 3]),
        "symmetric": st.sampled_from([True, False, None, "no"]),
        "type": st.sampled_from(["int", "float", "uint", None]),
        "block_structure": st.sampled_from([None, [128, 128], "64x32", [0, 1], [1], "x"]),
        "actorder": st.sampled_from([None, "group", "weight", True]),
        "dynamic": st.sampled_from([False, True, "local", None]),
    }
    for key in data.draw(st.sets(st.sampled_from(sorted(values)), min_size=1, max_size=3)):
        weights[key] = data.draw(values[key])
    top = {
        "format": st.sampled_from(["pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "mixed-precision",
                                   "nvfp4-pack-quantized", "mxfp4-pack-quantized", "dense", "marlin-24", None]),
        "version": st.sampled_from(["0.17.1", "0.20.0", "v1", "", None, 18]),
        "ignore": st.sampled_from([["lm_head"], [], None, "lm_head", ["re:("], ["re:.*"]]),
        "quantization_status": st.sampled_from(["compressed", "frozen", None, "initialized"]),
        "sparsity_config": st.sampled_from([{}, None, {"format": "dense"}, {"format": "sparse-24"}, "x"]),
        "kv_cache_scheme": st.sampled_from([None, {"num_bits": 8}]),
    }
    for key in data.draw(st.sets(st.sampled_from(sorted(top)), max_size=2)):
        qc[key] = data.draw(top[key])
    if data.draw(st.booleans()):
        group = qc["config_groups"]["group_0"]
        group[data.draw(st.sampled_from(["targets", "format", "input_activations", "weights"]))] = data.draw(JSON)
    (model / "config.json").write_text(json.dumps(config))
    exercise(model, ("float", "npu-int4"))


SAFETENSORS_DTYPES = ["F16", "BF16", "F32", "I32", "U8", "I8", "BOOL", "F8_E4M3", "Q4", "", "f16"]


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(fuzz_root, data):
    """Random headers over a fixed data section: reading only raises InputError (also with a float reader on top)."""
    model = fuzz_root / "st-fuzz"
    model.mkdir(exist_ok=True)
    data_size = data.draw(st.integers(0, 64))
    entry = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(SAFETENSORS_DTYPES) | JSON,
            "shape": st.lists(st.integers(-2, 8), max_size=3) | JSON,
            "data_offsets": st.lists(st.integers(-4, 80), min_size=2, max_size=2) | JSON,
        },
    )
    header = data.draw(st.dictionaries(st.text(min_size=1, max_size=8), entry | JSON, max_size=4)
                       | st.builds(lambda h, m: {**h, "__metadata__": m}, st.dictionaries(st.text(max_size=4), entry, max_size=2), JSON))
    raw = json.dumps(header).encode()
    (model / ST).write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_size))
    exercise(model)


# ======================================================= messages are printed verbatim, not as Rich markup
def test_message_with_a_closing_markup_tag_is_printed_verbatim(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    edit_header(ST, lambda h, d: h.__setitem__("[/x]", {"dtype": "Q4", "shape": [], "data_offsets": [0, 0]}))(model)
    cli_error(run_cli("inspect", model), ("tensor '[/x]'", "unknown dtype"))


def test_message_with_brackets_keeps_them(tmp_path):
    model = copy_fixture(CT, tmp_path)
    set_tensor(ST, f"{Q}.weight_shape", lambda t: t.float())(model)
    cli_error(run_cli("inspect", model), (f"{Q}.weight_shape", "[out, in]"))


TENSOR_FUZZ_FIXTURES = {
    GPTQ_ACT: (ST, "npu-int4"),
    AWQ: (ST, "npu-int4"),
    CT: (ST, "npu-int4"),
    CT_W8A8: (ST, "npu-w8a8"),
    "ct020_nvfp4a16": (ST, "float"),
    MS: (MS_ST, "npu-int8"),
    MS_STATIC: (MS_ST, "npu-w8a8"),
    "ms_w4a8_dynamic": (MS_ST, "npu-int4"),
    MS_MX: (MS_ST, "npu-mxfp8"),
}
FUZZ_DTYPES = [torch.int32, torch.int8, torch.uint8, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def random_tensor(data, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=generator) * data.draw(st.sampled_from([1e-3, 1.0, 100.0]))
        return values.to(dtype)
    high = {torch.uint8: 256, torch.int8: 128}.get(dtype, 2**31 - 1)
    low = 0 if dtype == torch.uint8 else -high
    return torch.randint(low, high, shape, generator=generator).to(dtype)


@FUZZ
@given(data=st.data())
def test_fuzz_tensor_shapes_and_dtypes(fuzz_root, data):
    """One tensor of q_proj replaced by a random dtype/shape (0-sized dims included), or dropped."""
    fixture = data.draw(st.sampled_from(sorted(TENSOR_FUZZ_FIXTURES)))
    filename, target = TENSOR_FUZZ_FIXTURES[fixture]
    model = fuzz_model(fuzz_root, fixture)
    infos, metadata = read_header(FIXTURES / fixture / filename)
    tensors = {name: read_tensor(info) for name, info in infos.items()}
    name = data.draw(st.sampled_from(sorted(n for n in tensors if n.startswith(Q + "."))))
    original = tensors[name]
    if data.draw(st.integers(0, 9)) == 0:
        del tensors[name]
    else:
        dtype = data.draw(st.sampled_from([original.dtype] * 3 + FUZZ_DTYPES))
        dims = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 100, 128, 256]) | st.sampled_from(list(original.shape) or [1])
        shape = data.draw(st.lists(dims, min_size=0, max_size=3) | st.just(list(original.shape)))
        tensors[name] = random_tensor(data, dtype, shape)
    save_file(tensors, model / filename, metadata)
    try:
        exercise(model, ("float", target))
    finally:
        shutil.copy(FIXTURES / fixture / filename, model / filename)
        os.chmod(model / filename, 0o644)


def test_force_never_replaces_an_unrelated_directory(tmp_path):
    model = copy_fixture(GPTQ, tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    cli_error(run_cli("convert", model, precious, "--to", "float", "--force"), ("not an npuconv output",))
    assert (precious / "notes.txt").read_text() == "keep me"
