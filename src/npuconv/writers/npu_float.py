"""``--to npu-float``: a float checkpoint with MoE expert weights (``--nz``: every linear) in FRACTAL_NZ.

Engines cast float MoE weights to NZ at load (loaders §3.14: SGLang ``NPUUnquantMoEMethod`` casts the
untransposed ``[E, N, K]``; vLLM-Ascend casts ``[E, K, N]`` under fused MC2 or ``weight_nz_mode`` 2).
This target does that cast offline, in SGLang's orientation (:data:`FLOAT_NZ_LAYOUT`): the tensor keeps
its checkpoint shape ``[..., N, K]`` as its logical ND shape and is stored as NZ tiles
``[..., ceil(K/C0), ceil(N/16), 16, C0]`` with ``C0 = 16`` for fp16/bf16/fp32 (ops §3.2). Batch
dims stay in front, so stacking per-expert tensors along a new leading dim gives the NZ of the stack,
and gate/up rows fuse by concatenating storages along dim −3 (rows are tiled 16 at a time, so this
needs ``N % 16 == 0``, which the alignment rule below guarantees).

Tensors cast: every float tensor under ``.experts.`` that is 2-D ``<...>.experts.<e>.<proj>.weight``
or 3-D (stacked experts); with ``--nz`` also every float linear (:func:`npuconv.offline.float_linears`'s
name rule). Like SGLang (``_is_nz_aligned``) a tensor is cast only when its last two dims are
multiples of 16; others stay ND, with a warning. Everything else is copied unchanged. The source
must be a float checkpoint (quantized layers are refused: use ``float`` first).

The tiles cannot be described per layer in ``npuconv.json`` (a float model has no quantized layers),
so the writer lists them in ``npuconv_nz.json``: ``{"layout": "sglang", "tensors": {name: {"layout":
"nz", "dtype", "shape" (logical ND), "storage_shape", "c0", "split"}}}``; :func:`load_nd` undoes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.model import LinearSpec
from npuconv.offline import FLOAT_DTYPES, is_linear_weight
from npuconv.io.safetensors_io import TensorInfo, TensorPlan
from npuconv.writers.base import Target

SIDE_FILE = "npuconv_nz.json"
#: Orientation of the NZ tiles: SGLang casts the checkpoint's ``[E, N, K]`` (no transpose).
FLOAT_NZ_LAYOUT = "sglang"
NZ_ALIGN = 16
_EXPERT = re.compile(r"\.experts\.\d+\.[^.]+\.weight$")


class NpuFloatTarget(Target):
    name = "npu-float"
    summary = "float checkpoint with MoE expert weights (--nz: all linears) pre-cast to FRACTAL_NZ"

    def __init__(self, options):
        super().__init__(options)
        self.nz_entries: dict[str, dict] = {}

    def accepts(self, spec: LinearSpec) -> str | None:
        return "npu-float takes float checkpoints; convert quantized ones with --to float first"

    def wants_nz(self, info: TensorInfo) -> bool:
        if info.dtype_name not in FLOAT_DTYPES:
            return False
        if ".experts." in info.name and (len(info.shape) == 3 or (len(info.shape) == 2 and _EXPERT.search(info.name))):
            return True
        return bool(self.options.nz) and len(info.shape) == 2 and is_linear_weight(info.name)

    def plan_passthrough(self, info: TensorInfo) -> TensorPlan:
        if not self.wants_nz(info):
            return super().plan_passthrough(info)
        rows, cols = info.shape[-2:]
        if rows % NZ_ALIGN or cols % NZ_ALIGN:
            self.warn(f"{info.name}: kept ND ({rows}×{cols} is not 16-aligned)")
            return super().plan_passthrough(info)
        entry = tensor_entry(info.name, info.dtype, tuple(info.shape), nz_c0=layouts.nz_c0(info.dtype), n=-2, k=-1)
        self.nz_entries[info.name] = entry
        return TensorPlan(info.name, info.dtype, tuple(entry["storage_shape"]))

    def write_passthrough(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        entry = self.nz_entries.get(name)
        return tensor if entry is None else layouts.nd_to_nz(tensor, entry["c0"])

    def extra_files(self, manifest: dict) -> dict[str, object]:
        return {SIDE_FILE: {"layout": FLOAT_NZ_LAYOUT, "tensors": dict(sorted(self.nz_entries.items()))}}


def load_nd(directory: str | Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of an ``npu-float`` output back in its ND checkpoint shape (unchanged if it is not NZ)."""
    listing = json.loads((Path(directory) / SIDE_FILE).read_text())
    entry = listing["tensors"].get(name)
    if entry is None:
        return tensor
    rows, cols = entry["shape"][-2:]
    return layouts.nz_to_nd(tensor, rows, cols)

