"""What every NPU target shares: FRACTAL_NZ storage, kernel limits, act-order, group-scale layout.

Tensor entries of ``npuconv.json`` (and NZ read-back) are in :mod:`npuconv.entries`.
"""
from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.errors import InputError

MAX_KERNEL_DIM = 65535  # K and N limit of npu_weight_quant_batchmatmul / npu_quant_matmul (A2/A3)


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


def moe_rows(x: torch.Tensor, experts: int, group_list: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and the counts (``group_list_type=1``) of the MoE ``npu_grouped_matmul`` call.

    Routed (``group_list`` int64 ``[E]``, tokens per expert; ``x`` ``[M, K]`` sorted by expert,
    ``M = sum(group_list)``): ``x`` and ``group_list`` as given, as the engines call it after their
    expert selection. Dense (no ``group_list``): ``x`` as ``[M, K]`` repeated for every expert and
    M tokens per expert — every token through every expert, what ``verify`` checks."""
    if group_list is not None:
        if x.dim() != 2 or tuple(group_list.shape) != (experts,) or int(group_list.sum()) != x.shape[0]:
            raise ValueError(f"routed experts: x {list(x.shape)} must be [sum(group_list), K], group_list [{experts}]")
        return x, group_list.to(device=x.device, dtype=torch.int64)
    rows = x.reshape(-1, x.shape[-1])
    counts = torch.full((experts,), rows.shape[0], dtype=torch.int64, device=x.device)
    return rows.repeat(experts, 1), counts
