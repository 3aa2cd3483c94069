"""The kernel ops, declared once: every backend (:mod:`npuconv.kernels.npu`, the real torch_npu ops;
:mod:`npuconv.kernels.emulated`, their pure-PyTorch emulation) implements :class:`KernelOps` with
exactly these names and signatures (tests/kernels/test_npu_backend.py checks both against it).
Targets call them as ``backend.ops.<op>(…)`` (:meth:`npuconv.writers.base.Target.run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class KernelOps(Protocol):
    """The torch_npu ops npuconv runs (ops §x: docs/research/torch_npu_ops.md)."""

    def npu_weight_quant_batchmatmul(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        antiquant_scale: torch.Tensor,
        antiquant_offset: torch.Tensor | None = None,
        quant_scale: torch.Tensor | None = None,
        quant_offset: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        antiquant_group_size: int = 0,
        inner_precise: int = 0,
        weight_dtype: object = None,
    ) -> torch.Tensor:
        """``torch_npu.npu_weight_quant_batchmatmul`` (ops §2)."""
        ...

    def npu_quant_matmul(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        scale: torch.Tensor,
        *,
        offset: torch.Tensor | None = None,
        pertoken_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        output_dtype: torch.dtype | None = None,
        x1_dtype: object = None,
        x2_dtype: object = None,
        pertoken_scale_dtype: object = None,
        scale_dtype: object = None,
        group_sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``torch_npu.npu_quant_matmul`` (ops §4)."""
        ...

    def npu_dynamic_quant(
        self,
        x: torch.Tensor,
        *,
        smooth_scales: torch.Tensor | None = None,
        group_index: torch.Tensor | None = None,
        dst_type: object = torch.int8,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``torch_npu.npu_dynamic_quant`` (ops §5.1)."""
        ...

    def npu_dynamic_mx_quant(
        self,
        x: torch.Tensor,
        *,
        axis: int = -1,
        round_mode: str = "rint",
        dst_type: object = 296,
        block_size: int = 32,
        scale_alg: int = 0,
        dst_type_max: float = 0.0,
        max_low_bound: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``torch_npu.npu_dynamic_mx_quant`` (ops §5.2). ``scale_alg``, ``dst_type_max`` and ``max_low_bound`` are passed only when non-default."""
        ...

    def npu_quantize(
        self,
        x: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor | None,
        dtype: torch.dtype,
        axis: int = 1,
        div_mode: bool = True,
    ) -> torch.Tensor:
        """``torch_npu.npu_quantize`` (ops §8)."""
        ...

    def npu_trans_quant_param(self, scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0) -> torch.Tensor:
        """``torch_npu.npu_trans_quant_param`` (ops §4.3). ``round_mode`` is passed only when non-zero."""
        ...

    def npu_convert_weight_to_int4pack(self, weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
        """``torch_npu.npu_convert_weight_to_int4pack`` (ops §1)."""
        ...

    def npu_format_cast(self, t: torch.Tensor, acl_format: int, customize_dtype: object = None, input_dtype: object = None) -> torch.Tensor:
        """``torch_npu.npu_format_cast`` (ops §3). ``customize_dtype``/``input_dtype`` are passed only when given."""
        ...

    def npu_grouped_matmul(
        self,
        x: Sequence[torch.Tensor],
        weight: Sequence[torch.Tensor],
        *,
        bias: Sequence[torch.Tensor] | None = None,
        scale: Sequence[torch.Tensor] | None = None,
        offset: Sequence[torch.Tensor] | None = None,
        antiquant_scale: Sequence[torch.Tensor] | None = None,
        antiquant_offset: Sequence[torch.Tensor] | None = None,
        per_token_scale: Sequence[torch.Tensor] | None = None,
        group_list: torch.Tensor | None = None,
        activation_input=None,
        activation_quant_scale=None,
        activation_quant_offset=None,
        split_item: int = 0,
        group_type: int | None = None,
        group_list_type: int = 0,
        act_type: int = 0,
        output_dtype: torch.dtype | None = None,
        tuning_config=None,
    ) -> list[torch.Tensor]:
        """``torch_npu.npu_grouped_matmul`` (ops §6.1). ``None`` keyword arguments are left out."""
        ...

    def npu_dynamic_dual_level_mx_quant(
        self,
        x: torch.Tensor, *, smooth_scale: torch.Tensor | None = None, round_mode: str = "rint"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``torch_npu.npu_dynamic_dual_level_mx_quant`` (ops §5.3, Ascend 950)."""
        ...

    def npu_dual_level_quant_matmul(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        x1_level0_scale: torch.Tensor,
        x2_level0_scale: torch.Tensor,
        x1_level1_scale: torch.Tensor,
        x2_level1_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        output_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """``torch_npu.npu_dual_level_quant_matmul`` (ops §5.4, Ascend 950; x2 must be FRACTAL_NZ)."""
        ...
