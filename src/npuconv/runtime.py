"""Run converted layers on the Ascend kernels: the loader side of npuconv outputs.

``load_output(OUT)`` checks the manifest checksums, reads each converted layer's tensors by role and
puts them on the kernel backend's device (NZ tiles restored: on an NPU with the ND +
``npu_format_cast(t, 29)`` fallback described in docs/layouts.md, in the emulation as plain ND);
``NpuLinear.forward(x)`` calls the kernel exactly as vLLM-Ascend / SGLang do, through the layer's
target (:meth:`npuconv.writers.base.Target.run`). ``verify`` uses the same call, so what is verified
is what a loader would run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from npuconv.model import LinearSpec
from npuconv.registry import layer_target

if TYPE_CHECKING:  # pragma: no cover
    from npuconv.writers.base import Target


@dataclass
class NpuLinear:
    """One converted layer ready for its kernel: manifest entry, spec, ND tensors by role on the backend's device."""

    spec: LinearSpec
    entry: dict
    tensors: dict[str, torch.Tensor]
    backend: object

    tp: int = 1  # tensor-parallel degree emulated for layers whose kernel tensors depend on it (W4A8 scale_bias)
    target: Target | None = None  # the layer's Target (default: layer_target of the entry)

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = layer_target({}, self.entry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.run(self.backend, self.entry, self.spec, self.tensors, x, tp=self.tp)[0]


def load_output(path: str | Path, device: str | None = None, check_checksums: bool = True) -> dict[str, NpuLinear]:
    """Every converted linear of an npuconv output, keyed by module name, ready to run."""
    from npuconv.io.checkpoint import Checkpoint
    from npuconv.errors import InputError
    from npuconv.kernels import get_backend
    from npuconv.readers import open_reader
    from npuconv.io.digests import check_shards
    from npuconv.readers.npuconv_output import NpuconvReader

    backend = get_backend(device)
    checkpoint = Checkpoint(Path(path))
    reader = open_reader(checkpoint)
    if not isinstance(reader, NpuconvReader):
        raise InputError(f"{path}: not an npuconv output (no npuconv.json with quant_method npuconv)")
    if check_checksums:
        check_shards(checkpoint.root, reader.manifest)
    return {spec.name: load_layer(reader, spec, backend) for spec in reader.linear_specs()}


def load_layer(reader, spec: LinearSpec, backend) -> NpuLinear:
    """One converted layer of an npuconv output (``reader``: its NpuconvReader), on the backend's device."""
    entry = reader.manifest["layers"][spec.name]
    tensors = {role: to_backend(t, entry["tensors"][role], backend) for role, t in reader.tensors_of(spec).items()}
    return NpuLinear(spec, entry, tensors, backend, target=reader.target_of(spec))


def to_backend(tensor: torch.Tensor, entry: dict, backend) -> torch.Tensor:
    """Move an ND tensor to the backend; on a real NPU, NZ entries become NZ tensors again."""
    tensor = tensor.to(backend.device)
    if entry.get("layout") == "nz" and backend.name == "npu":
        if entry.get("packing") == "int4pack":
            # int4pack NZ tiles are 16 rows × 32 bytes: cast the bytes as int8 (C0 = 32), then view as
            # int32, as vLLM-Ascend does (npu_loaders.md §3.6); npu_format_cast on int32 would use C0 = 16
            return backend.ops.npu_format_cast(tensor.view(torch.int8), 29).view(torch.int32)
        tensor = backend.ops.npu_format_cast(tensor, 29)
    return tensor


def run_kernel(
    backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor, *, tp: int | None = None, manifest: dict | None = None,
    group_list: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the layer's kernel as the engines do; returns (y, the activations the reference must use).

    A thin dispatch: ``layer_target(manifest, entry).run(...)`` (see :meth:`npuconv.writers.base.Target.run`).
    ``manifest`` is only needed for entries written before every layer recorded its ``target``;
    ``group_list``: routed expert rows (tokens per expert, ``x`` sorted by expert).
    """
    return layer_target(manifest or {}, entry).run(backend, entry, spec, t, x, tp=tp, group_list=group_list)
