"""``npuconv.json`` tensor entries: the contract between the targets that write them and whoever reads
them back (the npuconv-output reader, verify, the runtime loader, the engine integrations).

Manifest tensor entry (``npuconv.json`` → ``layers[p].tensors[role]``)::

    {"name": "<p>.weight", "dtype": "int32", "layout": "nd" | "nz",
     "shape": [logical ND shape], "storage_shape": [shape as stored],
     "packing": "int4pack" | "int4x2" | "fp4x2" | null, "c0": 8 (nz only),
     "split": {"n": axis | null, "k": axis | null}}

``split`` (tensor parallelism, :meth:`npuconv.writers.base.Target.split`): the axis of the stored
dtype's ND form (NZ tiles undone, packing kept; batch dims such as experts counted) that holds the
output features N, and the one that holds the input features K, or null when the tensor has no such
axis (it is then replicated). Features per element along the axis = ``shape / ND storage shape``
there (the packing factor: 8 for int4pack, 2 for FP4 pairs), or the group size for group scales.

``layout: "nz"`` means the tensor holds FRACTAL_NZ *storage order* of its logical ND matrix
(:func:`npuconv.layouts.nd_to_nz`); a loader copies the bytes into an NPU tensor created with
ACL format 29, or falls back to ND + one ``npu_format_cast(t, 29)``
(see docs/layouts.md, "Loading NZ tensors").
"""

from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.io.safetensors_io import TensorPlan, name_of


def dtype_label(dtype: torch.dtype | str) -> str:
    """The name of a dtype (a name is returned as it is)."""
    return dtype if isinstance(dtype, str) else name_of(dtype)


def tensor_entry(
    name: str,
    dtype: torch.dtype | str,
    shape: tuple[int, ...],
    *,
    nz_c0: int | None = None,
    packing: str | None = None,
    logical_shape: tuple[int, ...] | None = None,
    n: int | None = None,
    k: int | None = None,
) -> dict:
    """Manifest entry of one written tensor; ``shape`` is the ND shape of the stored dtype; ``n`` / ``k``:
    the axes holding output / input features (negative counts from the end), recorded non-negative."""
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
    rank = len(shape)
    entry["split"] = {"n": None if n is None else n % rank, "k": None if k is None else k % rank}
    return entry


def entry_plan(entry: dict) -> TensorPlan:
    """The TensorPlan of a manifest entry (stored dtype and storage shape)."""
    return TensorPlan(entry["name"], getattr(torch, entry["dtype"]), tuple(entry["storage_shape"]))


def from_storage(tensor: torch.Tensor, entry: dict) -> torch.Tensor:
    """A stored tensor back in its ND form (undoes NZ tiling; packing is left to the caller)."""
    if entry.get("layout") != "nz":
        return tensor
    *_, rows, cols = nd_shape_of_storage(entry)
    return layouts.nz_to_nd(tensor, rows, cols)


def nd_shape_of_storage(entry: dict) -> list[int]:
    """The stored dtype's ND shape behind an NZ entry (packed columns for int4pack / FP4 pairs)."""
    *batch, rows, cols = entry["shape"]
    if entry.get("packing") == "int4pack":
        cols //= 8
    elif entry.get("packing") == "fp4x2":
        cols //= 2
    return [*batch, rows, cols]
