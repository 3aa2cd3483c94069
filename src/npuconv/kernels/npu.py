"""Thin wrappers that call the real ``torch_npu`` ops with the signatures of :mod:`npuconv.kernels.emulated`.

``torch_npu`` is imported on first use, so this module imports fine where it is absent. Optional
keyword arguments that are ``None`` (or at their default) are left out of the call when older torch_npu
releases lack them (``x1_dtype``, ``group_sizes``, ``weight_dtype``, ``customize_dtype``, …; ops §9.9:
the wheel's docs lag the C++). dtype markers given as names (``"float4_e2m1fn_x2"``) become the
``torch_npu`` attribute of that name, or else its numeric id (ops §0.2). ints and torch dtypes pass through
unchanged. Inputs must already be on the NPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch

from npuconv.layouts import NPU_DTYPE_IDS


def torch_npu() -> ModuleType:
    """The ``torch_npu`` module (imported lazily; raises ImportError where it is not installed)."""
    return importlib.import_module("torch_npu")


def is_available() -> bool:
    """True when ``torch_npu`` imports and reports at least one NPU device."""
    try:
        module = torch_npu()
    except Exception:  # noqa: BLE001 - a broken torch_npu install simply means "no NPU"
        return False
    npu = getattr(module, "npu", None) or getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available() and npu.device_count() > 0)
    except Exception:  # noqa: BLE001
        return False


def _marker(value: object) -> object:
    """A dtype marker for torch_npu: names → ``torch_npu.<name>`` (or the id), others unchanged."""
    if isinstance(value, str):
        name = value.removeprefix("torch_npu.")
        return getattr(torch_npu(), name, NPU_DTYPE_IDS.get(name, value))
    return value


def _optional(**kwargs: object) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if v is not None}


def npu_weight_quant_batchmatmul(
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
    return torch_npu().npu_weight_quant_batchmatmul(
        x,
        weight,
        antiquant_scale,
        antiquant_offset=antiquant_offset,
        quant_scale=quant_scale,
        quant_offset=quant_offset,
        bias=bias,
        antiquant_group_size=antiquant_group_size,
        inner_precise=inner_precise,
        **_optional(weight_dtype=_marker(weight_dtype)),
    )


def npu_quant_matmul(
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
    return torch_npu().npu_quant_matmul(
        x1,
        x2,
        scale,
        offset=offset,
        pertoken_scale=pertoken_scale,
        bias=bias,
        output_dtype=output_dtype,
        **_optional(
            x1_dtype=_marker(x1_dtype),
            x2_dtype=_marker(x2_dtype),
            pertoken_scale_dtype=_marker(pertoken_scale_dtype),
            scale_dtype=_marker(scale_dtype),
            group_sizes=None if group_sizes is None else list(group_sizes),
        ),
    )


def npu_dynamic_quant(
    x: torch.Tensor,
    *,
    smooth_scales: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    dst_type: object = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_npu.npu_dynamic_quant`` (ops §5.1)."""
    return torch_npu().npu_dynamic_quant(
        x, **_optional(smooth_scales=smooth_scales, group_index=group_index), dst_type=_marker(dst_type)
    )


def npu_dynamic_mx_quant(
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
    extra = _optional(
        scale_alg=scale_alg or None, dst_type_max=dst_type_max or None, max_low_bound=max_low_bound or None
    )
    return torch_npu().npu_dynamic_mx_quant(
        x, axis=axis, round_mode=round_mode, dst_type=_marker(dst_type), block_size=block_size, **extra
    )


def npu_quantize(
    x: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    dtype: torch.dtype,
    axis: int = 1,
    div_mode: bool = True,
) -> torch.Tensor:
    """``torch_npu.npu_quantize`` (ops §8)."""
    return torch_npu().npu_quantize(x, scales, zero_points, dtype, axis, div_mode)


def npu_trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0) -> torch.Tensor:
    """``torch_npu.npu_trans_quant_param`` (ops §4.3). ``round_mode`` is passed only when non-zero."""
    return torch_npu().npu_trans_quant_param(scale, offset, **_optional(round_mode=round_mode or None))


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """``torch_npu.npu_convert_weight_to_int4pack`` (ops §1)."""
    return torch_npu().npu_convert_weight_to_int4pack(weight, inner_k_tiles=inner_k_tiles)


def npu_format_cast(t: torch.Tensor, acl_format: int, customize_dtype: object = None, input_dtype: object = None) -> torch.Tensor:
    """``torch_npu.npu_format_cast`` (ops §3). ``customize_dtype``/``input_dtype`` are passed only when given."""
    return torch_npu().npu_format_cast(
        t, acl_format, **_optional(customize_dtype=_marker(customize_dtype), input_dtype=_marker(input_dtype))
    )


def npu_grouped_matmul(
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
    extra = _optional(
        bias=bias,
        scale=scale,
        offset=offset,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        per_token_scale=per_token_scale,
        group_list=group_list,
        activation_input=activation_input,
        activation_quant_scale=activation_quant_scale,
        activation_quant_offset=activation_quant_offset,
        group_type=group_type,
        output_dtype=output_dtype,
        tuning_config=tuning_config,
    )
    return torch_npu().npu_grouped_matmul(
        list(x), list(weight), split_item=split_item, group_list_type=group_list_type, act_type=act_type, **extra
    )


def npu_dynamic_dual_level_mx_quant(
    x: torch.Tensor, *, smooth_scale: torch.Tensor | None = None, round_mode: str = "rint"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch_npu.npu_dynamic_dual_level_mx_quant`` (ops §5.3, Ascend 950)."""
    return torch_npu().npu_dynamic_dual_level_mx_quant(x, **_optional(smooth_scale=smooth_scale), round_mode=round_mode)


def npu_dual_level_quant_matmul(
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
    return torch_npu().npu_dual_level_quant_matmul(
        x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale,
        **_optional(bias=bias), output_dtype=output_dtype,
    )
