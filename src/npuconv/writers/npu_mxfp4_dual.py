"""``--to npu-mxfp4-dual``: dual-level MXFP4 for ``npu_dual_level_quant_matmul`` (Ascend 950).

Two scale levels along K (torch_npu_ops.md §5.3, §5.4): an fp32 level-0 scale per 512 and an E8M0
level-1 scale per 32; weights FP4 E2M1. The kernel quantizes its activations the same way
(``npu_dynamic_dual_level_mx_quant``), so the layer runs FP4 × FP4 whatever the source declared.

Sources:

- float checkpoints (offline, :class:`npuconv.offline.DualLevelRecipe`): the weight is quantized by
  the ``npu_dynamic_dual_level_mx_quant`` rule; both levels are written exactly as that rule makes them;
- MX FP4 sources (FP4 codes + E8M0 per 32, e.g. compressed-tensors mxfp4, msModelSlim W4A8_MXFP /
  W4A4_MXFP4, an ``npu-mxfp4`` output): level 0 = 1.0, level 1 = the source's E8M0 bytes.

Written tensors per layer ``p``:

- ``p.weight`` uint8 ``[N, K/2]``: FP4 pairs along K (even k in the low nibble), the weight stored
  N × K as the kernel takes x2, in **FRACTAL_NZ** (the kernel requires it; the test in op-plugin casts
  with ``npu_format_cast(x2, 29, torch.int8)``): C0 = 32 bytes, storage ``[ceil(K/64), ceil(N/16), 16, 32]``.
  Its manifest ``shape`` is the logical ``[N, K]`` (FP4 elements); the stored ND matrix is uint8 ``[N, K/2]``.
- ``p.weight_scale_level0`` float32 ``[ceil(K/512), N]``.
- ``p.weight_scale_level1`` uint8 ``[N, ceil(K/64), 2]``: K-block ``j`` of row ``n`` at ``[n, j//2, j%2]``,
  the block count padded to even with byte 0.
- ``p.bias`` float32 ``[N]`` if the layer has one.

Canonical form (what :meth:`read_layer` returns and the layout check compares): FP4 codes with the
effective fp32 scale ``level0[k//512, n] · 2**(level1[n, k//32] − 127)``
(:func:`npuconv.layouts.dual_level_scale`), or, for a layer from an MX source, the E8M0 bytes
themselves when level 0 is 1 everywhere.

Kernel call::

    x_q, x_l0, x_l1 = npu_dynamic_dual_level_mx_quant(x)
    y = npu_dual_level_quant_matmul(x_q, weight, x_l0, weight_scale_level0, x_l1, weight_scale_level1,
                                    bias=bias, output_dtype=x.dtype)
"""

from __future__ import annotations

import math
from dataclasses import replace

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.errors import InputError
from npuconv.model import FP4_E2M1, SCALE_E8M0, SCALE_FLOAT, LinearSpec, QuantizedLinear
from npuconv.offline import MXFP4_DUAL_RECIPE, SOURCE_PREFIX
from npuconv.writers.base import ROW, Target
from npuconv.writers.npu_common import MAX_KERNEL_DIM, maybe_nz

KERNEL = "npu_dual_level_quant_matmul"
L0 = layouts.DUAL_L0_BLOCK
L1 = layouts.DUAL_L1_BLOCK
#: C0 of the NZ weight: the uint8 FP4 pairs are tiled as int8 bytes (32 per row of a tile, ops §3.2).
WEIGHT_NZ_C0 = 32


def _from_float_source(spec: LinearSpec) -> bool:
    return spec.source_scheme.startswith(SOURCE_PREFIX) and spec.source_scheme.endswith(":offline-mxfp4-dual")


def split_levels(scale: torch.Tensor, k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective fp32 block scales ``[..., N, Kb]`` → (level0 ``[..., N, ceil(K/512)]``, level1 bytes
    ``[..., N, Kb]``): :func:`npuconv.layouts.split_dual_level_scale`, its refusal as an InputError."""
    try:
        return layouts.split_dual_level_scale(scale, k)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


class DualLevelLayout(Target):
    """The layout and checks; :class:`NpuMxfp4DualTarget` adds the offline-quantization report."""

    def accepts(self, spec: LinearSpec) -> str | None:
        if spec.weight_format != FP4_E2M1 or spec.group_size != L1:
            return "needs FP4 E2M1 weights with block-32 scales (an MX fp4 source, or a float one)"
        if spec.scale_format == SCALE_FLOAT and not _from_float_source(spec):
            return "float block scales are taken only from the offline dual-level quantization of a float model"
        if spec.scale_format not in (SCALE_E8M0, SCALE_FLOAT):
            return f"scale format {spec.scale_format}"
        if spec.in_features % 2:
            return "FP4 needs an even K"
        if max(spec.in_features, spec.out_features) > MAX_KERNEL_DIM:
            return f"N and K must be ≤ {MAX_KERNEL_DIM}"
        if spec.num_experts is not None:
            return "expert stacks are not supported by npu_dual_level_quant_matmul"
        return None

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        p, n, k = spec.name, spec.out_features, spec.in_features
        weight = tensor_entry(f"{p}.weight", torch.uint8, (n, k // 2), nz_c0=WEIGHT_NZ_C0, packing="fp4x2",
                              logical_shape=(n, k), n=0, k=1)
        entries = {
            "weight": weight,
            "weight_scale_level0": tensor_entry(f"{p}.weight_scale_level0", torch.float32, (math.ceil(k / L0), n), n=1, k=0),
            "weight_scale_level1": tensor_entry(f"{p}.weight_scale_level1", torch.uint8,
                                                (n, math.ceil(math.ceil(k / L1) / 2), 2), n=0, k=1),
        }
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", torch.float32, (n,), n=0)
        return entries

    def describe_layer(self, spec: LinearSpec) -> dict:
        return {
            "scheme": "w4a4_mxfp4_dual",
            "source_scheme": spec.source_scheme,
            "kernel": KERNEL,
            "kernel_mode": "dual_level_mx",
            "weight_dtype": "float4_e2m1fn_x2",
            "activation": "fp4-dual-level-dynamic",
            "level0_block": L0,
            "level1_block": L1,
            "level0_from": "source scale" if spec.scale_format == SCALE_FLOAT else "1.0 (MX source)",
            "tensors": self.tensor_entries(spec),
        }

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        spec = layer.spec
        k = spec.in_features
        entries = self.tensor_entries(spec)
        if spec.scale_format == SCALE_E8M0:
            level1 = layer.scale
            level0 = torch.ones(*level1.shape[:-1], math.ceil(k / L0), dtype=torch.float32)
        else:
            level0, level1 = split_levels(layer.scale, k, spec.name)
        out = {
            "weight": maybe_nz(layouts.fp4_pack(layer.qweight.contiguous()), WEIGHT_NZ_C0),
            "weight_scale_level0": level0.float().transpose(-1, -2).contiguous(),
            "weight_scale_level1": layouts.mx_scale_pairs(level1.contiguous()),
        }
        if "bias" in entries:
            assert layer.bias is not None
            out["bias"] = layer.bias.float()
        return {entries[role]["name"]: out[role] for role in entries}

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        k = spec.in_features
        codes = layouts.fp4_unpack(tensors["weight"])[..., :k].contiguous()
        level0 = tensors["weight_scale_level0"].float().transpose(-1, -2)  # [N, ceil(K/512)]
        level1 = layouts.mx_scale_unpairs(tensors["weight_scale_level1"], math.ceil(k / L1))
        if spec.scale_format == SCALE_E8M0 and bool((level0 == 1).all()):
            return QuantizedLinear(spec, codes, level1, bias=tensors.get("bias"))
        scale = layouts.dual_level_scale(level0, level1, k)
        spec = replace(spec, scale_format=SCALE_FLOAT, scale_dtype="float32")  # level 0 is not 1: a float scale
        return QuantizedLinear(spec, codes, scale, bias=tensors.get("bias"))


    # ------------------------------------------------------------------ kernel
    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        """``npu_dynamic_dual_level_mx_quant`` + ``npu_dual_level_quant_matmul`` (ops §5.3, §5.4)."""
        k = x.shape[-1]
        lead = x.shape[:-1]
        x_q, x_l0, x_l1 = backend.ops.npu_dynamic_dual_level_mx_quant(x.reshape(-1, k))
        bias = tensors.get("bias")
        y = backend.ops.npu_dual_level_quant_matmul(
            x_q, tensors["weight"], x_l0, tensors["weight_scale_level0"], x_l1, tensors["weight_scale_level1"],
            bias=None if bias is None else bias.float(), output_dtype=x.dtype,
        )
        codes = layouts.fp4_unpack(x_q.cpu())[..., :k]
        scale = layouts.dual_level_scale(x_l0.cpu(), layouts.mx_scale_unpairs(x_l1.cpu(), -(-k // L1)), k)
        values = layouts.fp4_decode(codes).double() * scale.double().repeat_interleave(L1, dim=-1)[..., :k]
        return y.reshape(*lead, -1), values.reshape(*lead, k)

    def split_unit(self, role, entry, spec, axis, parallel):
        if parallel == ROW and role == "weight_scale_level0":
            return L0
        if parallel == ROW and role == "weight_scale_level1":
            return 2 * L1  # one row of E8M0 pairs = two 32-blocks of K
        return super().split_unit(role, entry, spec, axis, parallel)


class NpuMxfp4DualTarget(DualLevelLayout):
    name = "npu-mxfp4-dual"
    offline_recipe = MXFP4_DUAL_RECIPE
    summary = "dual-level MXFP4 (fp32 per 512 + E8M0 per 32, NZ) for npu_dual_level_quant_matmul (float or MX fp4 sources)"

