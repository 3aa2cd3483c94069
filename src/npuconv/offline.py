"""Offline quantization of float checkpoints: the float linears of a bf16/fp16/fp32 model, quantized for one target.

Opt-in. A float checkpoint has no quantized linears, and ``inspect`` keeps showing none. A target
that can quantize float linears declares its :class:`Recipe` (``Target.offline_recipe``); only when a
conversion (or the ``verify`` of its output) hands that recipe to the reader
(:meth:`npuconv.readers.base.Reader.quantize_float_linears`) does the float reader expose its linears:
each one as the canonical quantized layer :meth:`Recipe.quantize` makes. The target then writes it like
any other source of that scheme. ``verify`` hands the same recipe to the source reader, so its layout
check compares the written tensors with a fresh quantization of the float weights (bit-exact: the
rule is deterministic) and its kernel check uses the quantized weights as the reference.

:meth:`Recipe.quantize` returns an explicit :class:`OfflineResult` (the canonical layer and the
quantization error against the float weight); the reader reports the error per layer
(:meth:`Reader.layer_report` → the manifest's ``offline_quantization`` block, :func:`report`).

Which tensors are linears (:func:`float_linears`): 2-D floating ``<p>.weight`` tensors whose name
ends with ``_proj.weight`` or ``.fc1/.fc2/.dense/.query_key_value/.c_attn/.w1/.w2/.w3.weight``
(:data:`LINEAR_WEIGHT_SUFFIXES`), except any name with a component containing ``embed`` or ``norm``
or equal to ``lm_head``/``wte``/``wpe`` (:data:`EXCLUDED_PARTS`), and except every tensor of a model
whose ``model_type`` stores linears as ``Conv1D`` ``[in, out]`` (GPT-2, :data:`CONV1D_MODEL_TYPES`).
``<p>.bias`` is taken along when present. Layers the recipe cannot take (e.g. odd dims for FP4)
stay float, with a warning.

Rules:

- ``npu-mxfp8`` / ``npu-mxfp4``: :func:`npuconv.layouts.mx_quantize` along K on the ``[N, K]``
  weight, exactly the ``npu_dynamic_mx_quant`` scale_alg 0 rule (ops §5.2) with round mode
  :data:`MX_ROUND_MODE`, so the offline result equals the op applied to the weight online. The layer
  is declared with MX FP8 dynamic activations (W8A8_MXFP8, and W4A8_MXFP for FP4 weights:
  :data:`MXFP4_ACTIVATION`).
- ``npu-mxfp4-dual``: :func:`npuconv.layouts.dual_level_mx_quantize` along K, the
  ``npu_dynamic_dual_level_mx_quant`` rule (fp32 level-0 scale per 512, E8M0 level-1 per 32); FP4
  dual-level activations (:class:`DualLevelRecipe`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.errors import InputError
from npuconv.model import (
    FP4_E2M1,
    FP8_E4M3,
    SCALE_E8M0,
    SCALE_FLOAT,
    ActivationQuant,
    LinearSpec,
    QuantizedLinear,
    dequantize,
)

LINEAR_WEIGHT_SUFFIXES = (
    "_proj.weight", ".fc1.weight", ".fc2.weight", ".dense.weight", ".query_key_value.weight", ".c_attn.weight",
    ".w1.weight", ".w2.weight", ".w3.weight",
)
EXCLUDED_PARTS = ("embed", "norm")  # substrings of a name component
EXCLUDED_COMPONENTS = ("lm_head", "wte", "wpe")
CONV1D_MODEL_TYPES = ("gpt2", "imagegpt", "decision_transformer")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # dtype names

#: ``source_scheme`` prefix of every layer made here (writers use it to add ``offline_quantization``).
SOURCE_PREFIX = "float:"
#: FP4 round mode of the offline weight quantization (``npu_dynamic_mx_quant`` default ``"rint"``).
MX_ROUND_MODE = "rint"
#: Activation quantization declared for offline MXFP4 weights: MXFP8 (the W4A8_MXFP linear both
#: engines run, loaders §3.12). ``FP4_E2M1`` would declare W4A4_MXFP4 instead.
MXFP4_ACTIVATION = FP8_E4M3


@dataclass(frozen=True)
class FloatLinear:
    prefix: str
    out_features: int
    in_features: int
    dtype: str  # dtype name of the stored weight ("bfloat16")
    weight: str
    bias: str | None


def is_linear_weight(name: str) -> bool:
    """The name rule of the module docstring (shape and dtype are checked by :func:`float_linears`)."""
    if not name.endswith(LINEAR_WEIGHT_SUFFIXES):
        return False
    parts = name.split(".")
    return not any(p in EXCLUDED_COMPONENTS or any(x in p for x in EXCLUDED_PARTS) for p in parts)


def float_linears(checkpoint) -> list[FloatLinear]:
    """Every float linear of a checkpoint, in checkpoint order (see the module docstring)."""
    if str(checkpoint.config.get("model_type", "")) in CONV1D_MODEL_TYPES:
        return []
    out = []
    for name in checkpoint.names():
        if not is_linear_weight(name):
            continue
        info = checkpoint.info(name)
        if len(info.shape) != 2 or info.dtype_name not in FLOAT_DTYPES:
            continue
        prefix = name.removesuffix(".weight")
        bias = f"{prefix}.bias" if checkpoint.has(f"{prefix}.bias") else None
        out.append(FloatLinear(prefix, info.shape[0], info.shape[1], info.dtype_name, name, bias))
    return out


def relative_l2(quantized: torch.Tensor, weight: torch.Tensor) -> float:
    """``‖dequant − w‖ / ‖w‖`` in float64 (0 for an all-zero weight quantized exactly)."""
    w = weight.double()
    diff = (quantized.double() - w).norm().item()
    norm = w.norm().item()
    return diff / norm if norm else diff


@dataclass(frozen=True)
class OfflineResult:
    """What offline quantization of one float linear produced."""

    layer: QuantizedLinear  # the canonical layer (codes + scales, effective fp32 scales for dual-level)
    rel_l2: float  # ‖dequant(layer) − w‖ / ‖w‖, float64 (:func:`relative_l2`)


@dataclass(frozen=True)
class Recipe:
    """How one target quantizes float linears: the canonical spec it declares and the quantizer."""

    target: str
    label: str  # short name in source_scheme, e.g. "mxfp8"
    weight_format: str
    activation: ActivationQuant

    @property
    def rule(self) -> str:
        return f"npu_dynamic_mx_quant scale_alg 0 along K, round_mode {MX_ROUND_MODE!r} (layouts.mx_quantize)"

    def unsupported_reason(self, linear: FloatLinear) -> str | None:
        if self.weight_format == FP4_E2M1 and (linear.in_features % 2 or linear.out_features % 2):
            return "FP4 needs even K and N"
        return None

    def spec(self, linear: FloatLinear) -> LinearSpec:
        return LinearSpec(
            name=linear.prefix,
            out_features=linear.out_features,
            in_features=linear.in_features,
            bits=4 if self.weight_format == FP4_E2M1 else 8,
            group_size=32,
            symmetric=True,
            weight_format=self.weight_format,
            scale_format=SCALE_E8M0,
            scale_dtype="uint8",
            activation=self.activation,
            has_bias=linear.bias is not None,
            bias_dtype=linear.dtype if linear.bias is not None else None,
            source_scheme=f"{SOURCE_PREFIX}{linear.dtype}:offline-{self.label}",
            source_tensors=(linear.weight,) + ((linear.bias,) if linear.bias else ()),
        )

    def quantize(self, spec: LinearSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> OfflineResult:
        """The canonical layer of ``weight`` ``[N, K]`` and its error against the float weight."""
        check_finite(spec.name, weight)
        element = "e2m1" if self.weight_format == FP4_E2M1 else "e4m3fn"
        codes, scale = layouts.mx_quantize(weight, element, layouts.MX_BLOCK, MX_ROUND_MODE)
        layer = QuantizedLinear(spec, codes, scale, bias=bias)
        return OfflineResult(layer, relative_l2(dequantize(layer), weight))


class DualLevelRecipe(Recipe):
    """``npu-mxfp4-dual``: :func:`npuconv.layouts.dual_level_mx_quantize` (``npu_dynamic_dual_level_mx_quant``).

    The canonical layer is FP4 codes with the effective fp32 scale of every 32-block
    (``level0 · 2**(level1 − 127)``, :func:`npuconv.layouts.dual_level_scale`); the target splits it
    back into the two levels the rule made (:func:`npuconv.layouts.split_dual_level_scale`).
    """

    @property
    def rule(self) -> str:
        return f"npu_dynamic_dual_level_mx_quant along K (level0 fp32 per 512, level1 E8M0 per 32), round_mode {MX_ROUND_MODE!r}"

    def unsupported_reason(self, linear: FloatLinear) -> str | None:
        return "FP4 needs an even K" if linear.in_features % 2 else None

    def spec(self, linear: FloatLinear) -> LinearSpec:
        return replace(super().spec(linear), scale_format=SCALE_FLOAT, scale_dtype="float32")

    def quantize(self, spec: LinearSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> OfflineResult:
        check_finite(spec.name, weight)
        codes, level0, level1 = layouts.dual_level_mx_quantize(weight, MX_ROUND_MODE)
        scale = layouts.dual_level_scale(level0, level1, spec.in_features)
        layer = QuantizedLinear(spec, codes, scale, bias=bias)
        return OfflineResult(layer, relative_l2(dequantize(layer), weight))


def check_finite(name: str, weight: torch.Tensor) -> None:
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        raise InputError(f"tensor '{name}.weight': {int(bad.sum())} NaN/inf value(s); cannot quantize it")


MXFP8_RECIPE = Recipe("npu-mxfp8", "mxfp8", FP8_E4M3, ActivationQuant(FP8_E4M3, 8, True, "group"))
MXFP4_RECIPE = Recipe("npu-mxfp4", "mxfp4", FP4_E2M1,
                      ActivationQuant(MXFP4_ACTIVATION, 8 if MXFP4_ACTIVATION == FP8_E4M3 else 4, True, "group"))
MXFP4_DUAL_RECIPE = DualLevelRecipe("npu-mxfp4-dual", "mxfp4-dual", FP4_E2M1, ActivationQuant(FP4_E2M1, 4, True, "group"))


def report(recipe: Recipe, spec: LinearSpec, rel_l2: float | None) -> dict:
    """The manifest's ``offline_quantization`` block of a layer ``recipe`` made (``rel_l2`` None until it is written)."""
    return {"source_dtype": spec.source_scheme.split(":")[1], "rule": recipe.rule, "rel_l2": rel_l2}
