"""TEMPORARY — to be replaced by ``Target.split`` (issue 14, "One home per target").

Tensor-parallel split of one stored tensor of an npuconv output, written here only until each target
owns its split rule. Delete this module when ``npuconv.registry`` lands and call
``layer_target(manifest, entry).split(role, tensor, entry, spec, rank, world, parallel)`` instead
(:mod:`npuconv.engines.layers` is the only caller).

Rules (``parallel`` = ``"column"`` splits N, the output features; ``"row"`` splits K, the input features):

* Axes are found from the manifest's *logical* shape (``entry["shape"]``, experts ``E`` leading):
  ``[.., K, N]`` weights, ``[.., G, N]`` group tables (``G = ceil(K / g)``), ``[.., N]`` per-channel
  vectors; ``perm`` is ``[K]``; ``[1]`` per-tensor values and anything else replicate.
* ND storage: the storage axis is the logical axis; a packed axis (int4pack ``N/8``) splits in storage units.
* NZ storage ``[.., ceil(C/c0), ceil(R/16), 16, c0]`` of the stored ND ``[.., R=K, C]``: N splits whole
  column tiles (axis -4), K whole 16-row tiles (axis -3). A split that cuts a tile is refused.
* Group tables split K by whole groups only (``K / world`` a multiple of ``g``).
* ``perm`` (act-order, weight rows sorted by group): column-parallel keeps it whole. Row-parallel is exact
  only when rank ``r``'s weight rows ``[r·K/w, (r+1)·K/w)`` hold exactly its own input features; the
  rank then gets ``perm[rows] − r·K/w``. Otherwise refused: the kernel's uniform groups cannot follow
  the permutation across ranks.
* ``scale_bias`` W4A8 partials (``[.., N, 16]``) and other TP-dependent tensors are refused at
  ``world > 1`` (not served by this temporary rule).
* Additive terms (``bias``, ``quant_bias``) of a row-parallel layer: whole on every rank; the caller
  adds them on rank 0 only (:data:`ADDITIVE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npuconv.errors import InputError

#: roles added once after the row-parallel all-reduce (rank 0 only)
ADDITIVE = frozenset({"bias", "quant_bias"})


@dataclass(frozen=True)
class Axes:
    """Where one stored tensor holds N and K: storage axis and storage units per logical feature."""

    n: int | None  # storage axis holding output features
    k: int | None  # storage axis holding input features
    n_unit: int = 1  # logical features per storage index along ``n`` (int4pack 8, NZ c0 columns)
    k_unit: int = 1  # logical features per storage index along ``k`` (groups: g, NZ: 16 rows)


def axes(role: str, entry: dict, spec) -> Axes:
    """The N/K axes of ``entry``'s storage (see the module docstring)."""
    shape, storage = list(entry["shape"]), list(entry["storage_shape"])
    lead = 1 if spec.num_experts is not None else 0
    k, n = spec.in_features, spec.out_features
    body = shape[lead:]
    if role == "perm":
        return Axes(None, lead, 1, 1)
    if len(body) == 2 and body[1] == n and (body[0] == k or body[0] < k):
        if body[0] == k:
            if entry.get("layout") == "nz":
                return Axes(len(storage) - 4, len(storage) - 3, n // storage[-4], 16)
            return Axes(lead + 1, lead, n // storage[lead + 1], 1)
        group = spec.effective_group_size
        return Axes(lead + 1, lead, n // storage[lead + 1], group)  # a [G, N] group table
    if len(body) == 1 and body[0] == n and n > 1:
        return Axes(lead, None, 1, 1)
    return Axes(None, None)


def split(role: str, tensor: torch.Tensor, entry: dict, spec, rank: int, world: int, parallel: str) -> torch.Tensor:
    """Rank ``rank`` of ``world``'s piece of stored tensor ``role`` of the layer whose manifest entry is
    ``entry`` (storage layout, bytes unchanged)."""
    if world == 1 or parallel not in ("column", "row"):
        return tensor
    entry = entry["tensors"][role]
    name = entry.get("name", role)
    if role in ("scale_bias", "scale_bias_partials"):
        raise InputError(f"{name}: W4A8 scale_bias cannot be split for tensor parallelism yet (serve it at TP 1)")
    ax = axes(role, entry, spec)
    if parallel == "column":
        if ax.n is None:
            return tensor
        return _narrow(tensor, ax.n, ax.n_unit, spec.out_features, rank, world, name, "output features")
    if role == "perm":
        return _perm_rows(tensor, rank, world, name)
    if ax.k is None:
        return tensor
    return _narrow(tensor, ax.k, ax.k_unit, spec.in_features, rank, world, name, "input features")


def _narrow(tensor, axis, unit, features, rank, world, name, what) -> torch.Tensor:
    if features % world or (features // world) % unit:
        raise InputError(
            f"{name}: {features} {what} do not split into {world} equal parts of whole "
            f"{unit}-feature units (storage tiles, packing or groups); serve at a TP size that divides them"
        )
    size = features // world // unit
    return tensor.narrow(axis, rank * size, size)


def _perm_rows(perm: torch.Tensor, rank: int, world: int, name: str) -> torch.Tensor:
    k = perm.shape[-1]
    if k % world:
        raise InputError(f"{name}: {k} input features do not split into {world} ranks")
    size = k // world
    piece = perm.narrow(-1, rank * size, size).to(torch.int64) - rank * size
    if int(piece.min()) < 0 or int(piece.max()) >= size:
        raise InputError(
            f"{name}: act-order groups span tensor-parallel ranks, so this row-parallel layer cannot be "
            f"split exactly at TP {world} (convert a source without act-order, or serve at TP 1)"
        )
    return piece.to(perm.dtype)


class LegacyTarget:
    """The target API of issue 14 (``run``, ``split``) over today's ``runtime.run_kernel`` and the rules
    above. Used only while ``npuconv.registry`` does not exist."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, backend, entry, spec, tensors, x, tp=None, **kwargs):
        from npuconv.runtime import run_kernel

        return run_kernel(backend, entry, spec, tensors, x, tp=tp, **kwargs)

    def split(self, role, tensor, entry, spec, rank, world, parallel):
        return split(role, tensor, entry, spec, rank, world, parallel)


def layer_target(manifest: dict, entry: dict) -> LegacyTarget:
    """``npuconv.registry.layer_target`` until it exists: the layer's own target, else the output's."""
    return LegacyTarget(entry.get("target") or manifest["target"])
