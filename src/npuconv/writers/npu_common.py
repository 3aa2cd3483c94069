"""What every NPU target shares: manifest tensor entries, FRACTAL_NZ storage, kernel limits, act-order.

Manifest tensor entry (``npuconv.json`` → ``layers[p].tensors[role]``)::

    {"name": "<p>.weight", "dtype": "int32", "layout": "nd" | "nz",
     "shape": [logical ND shape], "storage_shape": [shape as stored],
     "packing": "int4pack" | "int4x2" | "fp4x2" | null, "c0": 8 (nz only)}

``layout: "nz"`` means the tensor holds FRACTAL_NZ *storage order* of its logical ND matrix
(:func:`npuconv.layouts.nd_to_nz`); a loader copies the bytes into an NPU tensor created with
ACL format 29, or falls back to ND + one ``npu_format_cast(t, 29)``
(see docs/layouts.md, "Loading NZ tensors").
"""

from __future__ import annotations

import torch

from npuconv import layouts
from npuconv.errors import InputError
from npuconv.safetensors_io import TensorPlan

MAX_KERNEL_DIM = 65535  # K and N limit of npu_weight_quant_batchmatmul / npu_quant_matmul (A2/A3)


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_entry(
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    *,
    nz_c0: int | None = None,
    packing: str | None = None,
    logical_shape: tuple[int, ...] | None = None,
) -> dict:
    """Manifest entry of one written tensor; ``shape`` is the ND shape of the stored dtype."""
    storage = layouts.nz_storage_shape(shape, nz_c0) if nz_c0 else shape
    entry = {
        "name": name,
        "dtype": dtype_label(dtype),
        "layout": "nz" if nz_c0 else "nd",
        "shape": list(logical_shape or shape),
        "storage_shape": list(storage),
        "packing": packing,
    }
    if nz_c0:
        entry["c0"] = nz_c0
    return entry


def entry_plan(entry: dict) -> TensorPlan:
    """The TensorPlan of a manifest entry (stored dtype and storage shape)."""
    return TensorPlan(entry["name"], getattr(torch, entry["dtype"]), tuple(entry["storage_shape"]))


def from_storage(tensor: torch.Tensor, entry: dict) -> torch.Tensor:
    """A stored tensor back in its ND form (undoes NZ tiling; packing is left to the caller)."""
    if entry.get("layout") != "nz":
        return tensor
    rows, cols = _nd_shape_of_storage(entry)
    return layouts.nz_to_nd(tensor, rows, cols)


def _nd_shape_of_storage(entry: dict) -> tuple[int, int]:
    """(R, C) of the stored dtype's ND matrix behind an NZ entry (packed columns for int4pack)."""
    *_, rows, cols = entry["shape"]
    if entry.get("packing") == "int4pack":
        cols //= 8
    elif entry.get("packing") == "fp4x2":
        cols //= 2
    return rows, cols


def maybe_nz(tensor: torch.Tensor, c0: int | None) -> torch.Tensor:
    return layouts.nd_to_nz(tensor, c0) if c0 else tensor


def act_order_perm(g_idx: torch.Tensor, group_size: int, where: str) -> torch.Tensor:
    """``perm = argsort(g_idx, stable)`` as int32 ``[K]``: the input columns sorted by group.

    Requires every group to hold exactly ``group_size`` columns (true for GPTQ act-order), else
    the sorted groups would not be ``k // group_size``.
    """
    perm = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(g_idx.shape[-1]) // group_size
    if not torch.equal(g_idx.long()[perm], expected):
        raise InputError(f"{where}: g_idx groups are not all of size {group_size}; cannot reorder for the NPU kernel")
    return perm.to(torch.int32)


def group_scale_layout(t: torch.Tensor) -> torch.Tensor:
    """``[..., N, G]`` → the kernel's ``[..., G, N]``, or ``[..., N]`` when G == 1 (per-channel)."""
    if t.shape[-1] == 1:
        return t[..., 0].contiguous()
    return t.transpose(-1, -2).contiguous()


def group_scale_shape(batch: tuple[int, ...], n: int, groups: int) -> tuple[int, ...]:
    return (*batch, n) if groups == 1 else (*batch, groups, n)
