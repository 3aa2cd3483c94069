"""A checkpoint directory: its JSON side files and a name → tensor index over all weight shards.

Weight files, in order of preference:
1. the files named by a ``*.safetensors.index.json`` (HF ``model.safetensors.index.json``,
   msModelSlim ``quant_model_weight*.safetensors.index.json``); every index is checked against
   the shards it names (files exist, every tensor is where the index says);
2. otherwise ``model*.safetensors`` and ``quant_model_weight*.safetensors``;
3. otherwise every ``*.safetensors`` in the directory.

Files named ``reference_dequant*.safetensors`` (oracles shipped beside test fixtures) are never
weights. Tensors are read one at a time (:func:`npuconv.io.safetensors_io.read_tensor`).
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

from npuconv.lazy_torch import torch

from npuconv.errors import InputError
from npuconv.io.safetensors_io import TensorInfo, read_header, read_tensor

WEIGHT_PATTERNS = ("model*.safetensors", "quant_model_weight*.safetensors")
NOT_WEIGHTS_PREFIX = "reference_dequant"


class Checkpoint:
    """Read-only view of a local checkpoint directory."""

    def __init__(self, root: Path, source_id: str | None = None, revision: str | None = None):
        root = Path(root)
        if not root.exists():
            raise InputError(f"{root}: no such directory")
        if not root.is_dir():
            raise InputError(f"{root}: not a directory")
        self.root = root
        self.source_id = source_id or os.path.abspath(root)  # absolute: recorded in manifests, used from any cwd
        self.revision = revision
        self.weight_files = self._find_weight_files()
        self.tensors = self._index_tensors()

    # ---------------------------------------------------------------- side files
    def read_json(self, filename: str) -> dict | None:
        """Parse a JSON object file of the checkpoint, or None if absent."""
        path = self.root / filename
        if not path.is_file():
            return None
        self._check_inside(path)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{filename}: invalid JSON ({e})") from None
        except RecursionError:
            raise InputError(f"{filename}: invalid JSON (nested too deeply)") from None
        except OSError as e:
            raise InputError(f"{filename}: cannot read: {e.strerror or e}") from None
        if not isinstance(value, dict):
            raise InputError(f"{filename}: expected a JSON object")
        return value

    @cached_property
    def config(self) -> dict:
        """config.json (empty dict if the checkpoint has none)."""
        return self.read_json("config.json") or {}

    @property
    def quantization_config(self) -> dict:
        value = self.config.get("quantization_config") or {}
        if not isinstance(value, dict):
            raise InputError("config.json: quantization_config is not an object")
        return value

    def side_files(self) -> list[Path]:
        """Every regular file that is not a weight file or weight index (to be copied)."""
        weights = set(self.weight_files)
        out = []
        for path in sorted(self.root.rglob("*")):
            if path.is_dir() or path in weights:
                continue
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json"):
                continue
            self._check_inside(path)
            if not path.is_file():  # is_dir() was False: a FIFO, socket or device, or a dangling or looping symlink
                raise InputError(f"{rel}: not a regular file (or a broken symlink); remove it from the model directory")
            out.append(path)
        return out

    # ---------------------------------------------------------------- tensors
    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"tensor '{name}' is missing from the checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.info(name))

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    # ---------------------------------------------------------------- discovery
    def _check_inside(self, path: Path) -> None:
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.root))
        if real != root and root not in real.parents and not _is_hub_blob(real, root):
            raise InputError(f"{path.relative_to(self.root)}: symlink points outside the model directory")

    def _find_weight_files(self) -> list[Path]:
        indexes = sorted(self.root.glob("*.safetensors.index.json"))
        if indexes:
            files: list[Path] = []
            for index in indexes:
                files.extend(f for f in self._index_files(index) if f not in files)
            return files
        for pattern in WEIGHT_PATTERNS:
            found = sorted(self.root.glob(pattern))
            if found:
                return found
        found = [p for p in sorted(self.root.glob("*.safetensors")) if not p.name.startswith(NOT_WEIGHTS_PREFIX)]
        if not found:
            if not any(self.root.iterdir()):
                raise InputError(f"{self.root}: directory is empty")
            raise InputError(f"{self.root}: no *.safetensors weight files found")
        return found

    def _index_files(self, index: Path) -> list[Path]:
        data = self.read_json(index.name)
        weight_map = data.get("weight_map") if data else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index.name}: missing or empty 'weight_map'")
        files = []
        for tensor, filename in weight_map.items():
            if not isinstance(filename, str) or "/" in filename or filename.startswith("."):
                raise InputError(f"{index.name}: tensor '{tensor}' maps to an invalid file name {filename!r}")
            path = self.root / filename
            if path not in files:
                if not path.is_file():
                    raise InputError(f"{index.name}: tensor '{tensor}' is in '{filename}', which does not exist")
                files.append(path)
        self._expected_map = {**getattr(self, "_expected_map", {}), **weight_map}
        return files

    def _index_tensors(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for path in self.weight_files:
            self._check_inside(path)
            infos, _ = read_header(path)
            for name, info in infos.items():
                if name in tensors:
                    raise InputError(f"tensor '{name}' is stored twice: in {tensors[name].path.name} and {path.name}")
                tensors[name] = info
        expected = getattr(self, "_expected_map", None)
        if expected:
            for name, filename in expected.items():
                info = tensors.get(name)
                if info is None:
                    raise InputError(f"index names tensor '{name}' in '{filename}', but no shard contains it")
                if info.path.name != filename:
                    raise InputError(f"index puts tensor '{name}' in '{filename}', but it is in '{info.path.name}'")
            extra = [n for n in tensors if n not in expected]
            if extra:
                raise InputError(f"tensor '{extra[0]}' is in {tensors[extra[0]].path.name} but not in the index")
        return tensors


def _is_hub_blob(real: Path, root: Path) -> bool:
    """Hugging Face cache snapshots symlink into ``../../blobs``: those links are inside the repo cache."""
    repo_dir = root.parent.parent if root.parent.name == "snapshots" else None
    return repo_dir is not None and (repo_dir / "blobs") in real.parents


def config_dtype(config: dict) -> torch.dtype | None:
    """The model's activation dtype from config.json (``torch_dtype`` or transformers 5 ``dtype``)."""
    name = config.get("torch_dtype") or config.get("dtype")
    if not name and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("torch_dtype") or config["text_config"].get("dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None
