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

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.layouts import MX_BLOCK
from npuconv.model import FP4_E2M1, FP8_E4M3, SCALE_E8M0, LinearSpec, QuantizedLinear
from npuconv.model import INT
from npuconv.writers.base import ROW, Target



class MxTarget(Target):
    weight_format = FP8_E4M3

    def accepts(self, spec: LinearSpec) -> str | None:
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
            weight = tensor_entry(f"{p}.weight", dtype, weight_shape, packing=packing, logical_shape=(*batch, n, k),
                                  n=-2, k=-1)
            scale = tensor_entry(f"{p}.weight_scale", torch.uint8, (*batch, n, kb2, 2), n=-3, k=-2)
        else:
            weight_shape = (*batch, k, n // 2 if fp4 else n)
            weight = tensor_entry(f"{p}.weight", dtype, weight_shape, packing=packing, logical_shape=(*batch, k, n),
                                  n=-1, k=-2)
            scale = tensor_entry(f"{p}.weight_scale", torch.uint8, (*batch, kb2, n, 2), n=-2, k=-3)
        entries = {"weight": weight, "weight_scale": scale}
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", torch.float32, (*batch, n), n=-1)
        return entries

    def describe_layer(self, spec: LinearSpec) -> dict:
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

    # ------------------------------------------------------------------ kernel
    def serves(self, spec: LinearSpec) -> bool:
        fp8 = spec.weight_format == FP8_E4M3
        return spec.weight_format != INT and spec.scale_format == SCALE_E8M0 and fp8 == (self.weight_format == FP8_E4M3)

    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        """``npu_dynamic_mx_quant(x)`` (FP8, or FP4 for an MXFP4-activation layer) + ``npu_quant_matmul``
        MX mode (``scale_dtype`` / ``pertoken_scale_dtype`` float8_e8m0fnu, ``group_sizes`` ``[1, 1, 32]``,
        ``[0, 0, 32]`` for FP8 × FP4); the sglang layout is viewed transposed, as sglang does."""
        if spec.num_experts is not None:
            return self.run_experts(backend, entry, spec, tensors, x, group_list)
        fp4_weight = self.weight_format == FP4_E2M1
        act_kind = spec.activation.kind if spec.activation is not None else FP8_E4M3
        fp4_act = act_kind == FP4_E2M1
        fp4 = layouts.NPU_DTYPE_IDS["float4_e2m1fn_x2"]
        e8m0 = layouts.NPU_DTYPE_IDS["float8_e8m0fnu"]
        x_q, x_scale = backend.ops.npu_dynamic_mx_quant(x, dst_type=fp4 if fp4_act else torch.float8_e4m3fn)
        weight, scale = tensors["weight"], tensors["weight_scale"]
        if entry.get("view") == "transpose":  # sglang: [N, K] storage viewed as [K, N]
            weight, scale = weight.transpose(-1, -2), scale.transpose(-3, -2)
        y = backend.ops.npu_quant_matmul(
            x_q, weight, scale, scale_dtype=e8m0, pertoken_scale=x_scale, pertoken_scale_dtype=e8m0,
            x1_dtype=fp4 if fp4_act else None, x2_dtype=fp4 if fp4_weight else None,
            group_sizes=[0, 0, 32] if (fp4_weight and not fp4_act) else [1, 1, 32],
            output_dtype=x.dtype, bias=tensors.get("bias"),
        )
        codes = layouts.fp4_unpack(x_q.cpu()) if fp4_act else x_q.cpu()
        x_scale_blocks = layouts.mx_scale_unpairs(x_scale.cpu(), -(-spec.in_features // MX_BLOCK))
        x_effective = layouts.mx_dequantize(codes, x_scale_blocks, FP4_E2M1 if fp4_act else FP8_E4M3)
        return y, x_effective.double()

    def split_unit(self, role, entry, spec, axis, parallel):
        if role == "weight_scale" and parallel == ROW:
            return 2 * MX_BLOCK  # one row of E8M0 pairs = two 32-blocks of K
        return super().split_unit(role, entry, spec, axis, parallel)
