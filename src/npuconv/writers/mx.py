"""MX targets (Ascend 950): FP8/FP4 weights with E8M0 block-32 scales for ``npu_quant_matmul`` MX mode.

Two storage layouts (npu_loaders.md §3.11–3.13, §7), chosen with ``--mx-layout``:

- ``vllm-ascend`` (default): weight contiguous ``[K, N]`` (FP8: float8_e4m3fn ``[K, N]``; FP4:
  uint8 ``[K, N/2]``, two E2M1 codes per byte along N, even element in the low nibble);
  scale uint8 ``[ceil(Kb/2), N, 2]`` (Kb = ceil(K/32) padded to even with byte 0; K-block ``j``
  of channel ``n`` at ``[j//2, n, j%2]``) — :func:`npuconv.layouts.mx_scale_to_npu`.
- ``sglang``: the checkpoint storage, which sglang only *views* transposed: weight ``[N, K]``
  (FP4 uint8 ``[N, K/2]`` packed along K) and scale ``[N, ceil(Kb/2), 2]``
  (:func:`npuconv.layouts.mx_scale_pairs`); the manifest says ``"view": "transpose"``.

Kernel call: ``npu_quant_matmul(x_q, weight, scale, scale_dtype=float8_e8m0fnu, pertoken_scale=x_scale,
pertoken_scale_dtype=float8_e8m0fnu, group_sizes=[1, 1, 32] (or [0, 0, 32] for FP8 × FP4))``.
Weights stay ND (both engines keep MX linears ND).
"""

from __future__ import annotations

import torch

from npuconv import layouts
from npuconv.model import FP4_E2M1, FP8_E4M3, SCALE_E8M0, LinearSpec, QuantizedLinear
from npuconv.writers.base import Writer
from npuconv.writers.npu_common import tensor_entry

MX_BLOCK = 32


class MxWriter(Writer):
    weight_format = FP8_E4M3

    def unsupported_reason(self, spec: LinearSpec) -> str | None:
        if spec.weight_format != self.weight_format or spec.scale_format != SCALE_E8M0:
            return f"needs {self.weight_format} weights with E8M0 scales (an MX source)"
        if spec.group_size != MX_BLOCK:
            return f"MX block size must be 32, got {spec.group_size}"
        if self.weight_format == FP4_E2M1 and (spec.in_features % 2 or spec.out_features % 2):
            return "FP4 needs even K and N (two codes per byte)"
        return None

    @property
    def sglang(self) -> bool:
        return self.options.mx_layout == "sglang"

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        p, n, k, batch = spec.name, spec.out_features, spec.in_features, spec.batch_shape
        kb2 = -(-(-(-k // MX_BLOCK)) // 2)
        fp4 = self.weight_format == FP4_E2M1
        dtype = torch.uint8 if fp4 else torch.float8_e4m3fn
        packing = "fp4x2" if fp4 else None
        if self.sglang:
            weight_shape = (*batch, n, k // 2 if fp4 else k)
            weight = tensor_entry(f"{p}.weight", dtype, weight_shape, packing=packing, logical_shape=(*batch, n, k))
            scale = tensor_entry(f"{p}.weight_scale", torch.uint8, (*batch, n, kb2, 2))
        else:
            weight_shape = (*batch, k, n // 2 if fp4 else n)
            weight = tensor_entry(f"{p}.weight", dtype, weight_shape, packing=packing, logical_shape=(*batch, k, n))
            scale = tensor_entry(f"{p}.weight_scale", torch.uint8, (*batch, kb2, n, 2))
        entries = {"weight": weight, "weight_scale": scale}
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", torch.float32, (*batch, n))
        return entries

    def layer_manifest(self, spec: LinearSpec) -> dict:
        act = spec.activation
        return {
            "scheme": spec.scheme,
            "source_scheme": spec.source_scheme,
            "kernel": "npu_quant_matmul",
            "weight_dtype": "float4_e2m1fn_x2" if self.weight_format == FP4_E2M1 else "float8_e4m3fn",
            "activation": None if act is None else act.kind,
            "group_size": MX_BLOCK,
            "mx_layout": self.options.mx_layout,
            "view": "transpose" if self.sglang else None,
            "tensors": self.tensor_entries(spec),
        }

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        entries = self.tensor_entries(layer.spec)
        codes = layer.qweight  # [.., N, K] fp8, or E2M1 codes one per byte
        if not self.sglang:
            codes = codes.transpose(-1, -2).contiguous()  # [.., K, N]
        weight = layouts.fp4_pack(codes) if self.weight_format == FP4_E2M1 else codes.contiguous()
        scale = layouts.mx_scale_pairs(layer.scale) if self.sglang else layouts.mx_scale_to_npu(layer.scale)
        out = {"weight": weight, "weight_scale": scale}
        if "bias" in entries:
            out["bias"] = layer.bias.float()
        return {entries[role]["name"]: out[role] for role in entries}

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        weight = tensors["weight"]
        codes = layouts.fp4_unpack(weight) if self.weight_format == FP4_E2M1 else weight
        kb = -(-spec.in_features // MX_BLOCK)
        if self.sglang:
            scale = layouts.mx_scale_unpairs(tensors["weight_scale"], kb)
        else:
            codes = codes.transpose(-1, -2).contiguous()
            scale = layouts.mx_scale_from_npu(tensors["weight_scale"], kb)
        return QuantizedLinear(spec, codes, scale, bias=tensors.get("bias"))
