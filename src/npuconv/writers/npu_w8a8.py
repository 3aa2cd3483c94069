"""``--to npu-w8a8``: int8 × int8 for ``torch_npu.npu_quant_matmul`` (dynamic per-token or static per-tensor).

Source: symmetric 8-bit per-channel weights with 8-bit integer activation quantization
(compressed-tensors int-quantized, msModelSlim W8A8 / W8A8_DYNAMIC). Written state = what
vLLM-Ascend's ``process_weights_after_loading`` leaves (npu_loaders.md §3.1, §3.2):

- ``weight``: int8 ``[K, N]`` = ``q - 128`` (the signed code), FRACTAL_NZ by default (C0 = 32),
  as both engines cast it; ``--no-nz`` for ND.
- ``weight_scale``: float32 ``[N]`` (per-channel weight scale).
- dynamic (``x_q, s = npu_dynamic_quant(x)``;
  ``y = npu_quant_matmul(x_q, weight, weight_scale, pertoken_scale=s, bias=bias)``): nothing else.
- static (``x_q = npu_quantize(x, 1/input_scale, input_offset, qint8, -1, div_mode=False)``;
  ``y = npu_quant_matmul(x_q, weight, deq_scale, bias=quant_bias, output_dtype)``):

  - ``deq_scale [N] = input_scale * weight_scale`` (fp32). Encoding as the engines and
    msModelSlim use it (npu_loaders.md §1.4a): **float32 for bf16 models, int64 holding the fp32
    bit pattern in its low 32 bits for fp16 models**. (The issue text mentions
    ``npu_trans_quant_param``'s layout — FP19-truncated, bit 46 set — but neither engine calls it;
    we write the bit-cast the engines feed, and the emulated kernel decodes both.)
  - ``quant_bias [N]`` int32 = ``round(bias / deq_scale - input_offset * Σ_k q[n, k])``
    (msModelSlim's fold, npu_loaders.md §1.5; ``round`` is half-to-even), absorbing the
    activation zero point and the float bias.
  - ``input_scale``, ``input_offset``: float32 ``[1]``.

MoE expert stacks (``num_experts = E``, dynamic only): ``weight`` int8 ``[E, K, N]`` (NZ per expert,
as vLLM-Ascend casts its W8A8_DYNAMIC ``w13``/``w2`` unconditionally, npu_loaders.md §3.3),
``weight_scale`` float32 ``[E, N]``, ``bias`` ``[E, N]``, under the stacked name
``<prefix>.experts.<proj>``; run by ``npu_grouped_matmul(x=[x_q], weight=[w], scale=[s],
per_token_scale=[pts], group_type=0)``.
"""

from __future__ import annotations

import torch

from npuconv import layouts
from npuconv.model import INT, LinearSpec, QuantizedLinear
from npuconv.writers.base import Writer
from npuconv.writers.npu_common import MAX_KERNEL_DIM, maybe_nz, tensor_entry

KERNEL = "npu_quant_matmul"


class NpuW8A8Writer(Writer):
    target = "npu-w8a8"
    summary = "W8A8 int8 weights for npu_quant_matmul (compressed-tensors W8A8, ModelSlim W8A8/W8A8_DYNAMIC)"

    def unsupported_reason(self, spec: LinearSpec) -> str | None:
        act = spec.activation
        if spec.weight_format != INT or spec.bits != 8:
            return "needs 8-bit integer weights"
        if act is None or act.kind != INT or act.bits != 8:
            return "needs 8-bit integer activation quantization (use npu-int8 for weight-only)"
        if not spec.symmetric:
            return "npu_quant_matmul has no weight zero point: weights must be symmetric"
        if spec.num_groups != 1:
            return "npu_quant_matmul takes per-channel weight scales only"
        if not act.dynamic and act.strategy != "tensor":
            return "static activation quantization must be per-tensor"
        if not act.dynamic and spec.num_experts is not None:
            return "static activation quantization of stacked MoE experts: the engines' W8A8 MoE path is dynamic only"
        if max(spec.out_features, spec.in_features) > MAX_KERNEL_DIM:
            return f"N and K must be ≤ {MAX_KERNEL_DIM}"
        return None

    def _static(self, spec: LinearSpec) -> bool:
        return spec.activation is not None and not spec.activation.dynamic

    def _deq_dtype(self) -> torch.dtype:
        return torch.int64 if self.options.model_dtype == torch.float16 else torch.float32

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        p, n, k, batch = spec.name, spec.out_features, spec.in_features, spec.batch_shape
        nz = True if self.options.nz is None else self.options.nz
        entries = {
            "weight": tensor_entry(f"{p}.weight", torch.int8, (*batch, k, n), nz_c0=layouts.nz_c0(torch.int8) if nz else None),
            "weight_scale": tensor_entry(f"{p}.weight_scale", torch.float32, (*batch, n)),
        }
        if self._static(spec):
            entries["deq_scale"] = tensor_entry(f"{p}.deq_scale", self._deq_dtype(), (*batch, n))
            entries["quant_bias"] = tensor_entry(f"{p}.quant_bias", torch.int32, (*batch, n))
            entries["input_scale"] = tensor_entry(f"{p}.input_scale", torch.float32, (1,))
            entries["input_offset"] = tensor_entry(f"{p}.input_offset", torch.float32, (1,))
        elif spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", spec.bias_dtype or spec.scale_dtype, (*batch, n))
        return entries

    def layer_manifest(self, spec: LinearSpec) -> dict:
        static = self._static(spec)
        return {
            "scheme": spec.scheme,
            "source_scheme": spec.source_scheme,
            "kernel": KERNEL,
            "activation": "static-per-tensor" if static else "dynamic-per-token",
            "bits": 8,
            "group_size": -1,
            "symmetric": True,
            "deq_scale_encoding": ("int64-fp32-bits" if self._deq_dtype() == torch.int64 else "float32") if static else None,
            "tensors": self.tensor_entries(spec),
        }

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        spec = layer.spec
        entries = self.tensor_entries(spec)
        signed = (layer.qweight - 128).view(torch.int8)  # [.., N, K]
        weight_scale = layer.effective_scale()[..., 0]  # [.., N] fp32
        out = {
            "weight": maybe_nz(signed.transpose(-1, -2).contiguous(), entries["weight"].get("c0")),
            "weight_scale": weight_scale.contiguous(),
        }
        if self._static(spec):
            input_scale = layer.input_scale.float().reshape(1)
            input_offset = (layer.input_zero.float() if layer.input_zero is not None else torch.zeros(1)).reshape(1)
            deq = input_scale * weight_scale
            bias = layer.bias.float() if layer.bias is not None else torch.zeros_like(deq)
            row_sums = signed.to(torch.int64).sum(-1).double()
            quant_bias = torch.round(bias.double() / deq.double() - input_offset.double() * row_sums)
            out["deq_scale"] = layouts.float_bits_to_int64(deq) if self._deq_dtype() == torch.int64 else deq
            out["quant_bias"] = quant_bias.to(torch.int32)
            out["input_scale"] = input_scale
            out["input_offset"] = input_offset
        elif "bias" in entries:
            out["bias"] = layer.bias.to(getattr(torch, entries["bias"]["dtype"]))
        return {entries[role]["name"]: out[role] for role in entries}

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        codes = (tensors["weight"].transpose(-1, -2).view(torch.uint8) + 128).contiguous()
        scale = tensors["weight_scale"].float().unsqueeze(-1)
        layer = QuantizedLinear(spec, codes, scale, bias=tensors.get("bias"))
        if self._static(spec):
            layer.input_scale = tensors["input_scale"]
            layer.input_zero = tensors["input_offset"]
        return layer


WRITER = NpuW8A8Writer
