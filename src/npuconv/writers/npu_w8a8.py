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

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.model import INT, LinearSpec, QuantizedLinear
from npuconv.parallel import ROW
from npuconv.writers.base import Target
from npuconv.writers.npu_common import MAX_KERNEL_DIM, maybe_nz, moe_rows

KERNEL = "npu_quant_matmul"


class NpuW8A8Target(Target):
    name = "npu-w8a8"
    native_rank = 30
    summary = "W8A8 int8 weights for npu_quant_matmul (compressed-tensors W8A8, ModelSlim W8A8/W8A8_DYNAMIC)"

    def accepts(self, spec: LinearSpec) -> str | None:
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
            "weight": tensor_entry(f"{p}.weight", torch.int8, (*batch, k, n),
                                   nz_c0=layouts.nz_c0(torch.int8) if nz else None, n=-1, k=-2),
            "weight_scale": tensor_entry(f"{p}.weight_scale", torch.float32, (*batch, n), n=-1),
        }
        if self._static(spec):
            entries["deq_scale"] = tensor_entry(f"{p}.deq_scale", self._deq_dtype(), (*batch, n), n=-1)
            entries["quant_bias"] = tensor_entry(f"{p}.quant_bias", torch.int32, (*batch, n), n=-1)
            entries["input_scale"] = tensor_entry(f"{p}.input_scale", torch.float32, (1,))
            entries["input_offset"] = tensor_entry(f"{p}.input_offset", torch.float32, (1,))
        elif spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", spec.bias_dtype or spec.scale_dtype, (*batch, n), n=-1)
        return entries

    def describe_layer(self, spec: LinearSpec) -> dict:
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
        signed = layer.signed_codes()  # int8 [.., N, K]
        weight_scale = layer.effective_scale()[..., 0]  # [.., N] fp32
        out = {
            # [.., K, N]: NZ tiles are gathered straight from the transposed view (one copy, not two)
            "weight": maybe_nz(signed.transpose(-1, -2), entries["weight"].get("c0")).contiguous(),
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

    # ------------------------------------------------------------------ kernel
    def serves(self, spec: LinearSpec) -> bool:
        act = spec.activation
        return (spec.weight_format == INT and act is not None and act.kind == INT and act.bits == 8
                and spec.bits == 8 and spec.symmetric and spec.num_groups == 1)

    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        """Static: ``npu_quantize`` + ``npu_quant_matmul(x_q, weight, deq_scale, bias=quant_bias)``; dynamic:
        ``npu_dynamic_quant`` + ``npu_quant_matmul(…, weight_scale, pertoken_scale)`` — a dynamic expert
        stack on ``npu_grouped_matmul`` (routed with ``group_list``), a static one expert by expert."""
        static = self._static(spec)
        if spec.num_experts is not None:
            if static:
                return self.run_experts(backend, entry, spec, tensors, x, group_list)
            return _gmm_w8a8_dynamic(backend, spec, tensors, x, group_list)
        return (_w8a8_static if static else _w8a8_dynamic)(backend, spec, tensors, x)

    def split(self, role, tensor, entry, spec, rank, world, parallel):
        """As :meth:`Target.split`; a static layer's ``quant_bias`` (``round(bias/deq − input_offset·Σ_k q)``)
        is linear in K, so under row parallelism rank 0 carries all of it and the others zeros: the
        all-reduce of ``deq·(Σ_{k∈r} x_q·q) + deq·quant_bias`` is exact (the engines pass ``quant_bias``
        on rank 0 only, npu_loaders.md §3.1)."""
        if role == "quant_bias" and parallel == ROW and world > 1:
            return tensor if rank == 0 else torch.zeros_like(tensor)
        return super().split(role, tensor, entry, spec, rank, world, parallel)


def _w8a8_static(backend, spec: LinearSpec, t: dict, x: torch.Tensor):
    """Static per-tensor activation quantization (``npu_quantize``, ``div_mode=False``) + ``npu_quant_matmul``."""
    k = spec.in_features
    input_scale, input_offset = t["input_scale"].float(), t["input_offset"].float()
    x_q = backend.ops.npu_quantize(
        x, (1.0 / input_scale).expand(k).to(x.dtype), input_offset.expand(k).to(x.dtype), torch.qint8, -1, False
    )
    y = backend.ops.npu_quant_matmul(x_q, t["weight"], t["deq_scale"], bias=t["quant_bias"], output_dtype=x.dtype)
    x_effective = (x_q.double() - input_offset.double().to(x_q.device)) * input_scale.double().to(x_q.device)
    return y, x_effective


def _w8a8_dynamic(backend, spec: LinearSpec, t: dict, x: torch.Tensor):
    """``npu_dynamic_quant`` (per-token int8) + ``npu_quant_matmul`` with ``pertoken_scale``."""
    x_q, x_scale = backend.ops.npu_dynamic_quant(x)
    bias = t.get("bias")
    y = backend.ops.npu_quant_matmul(
        x_q, t["weight"], t["weight_scale"], pertoken_scale=x_scale,
        bias=None if bias is None else bias.float(), output_dtype=x.dtype,
    )
    return y, x_q.double() * x_scale.double().unsqueeze(-1)


def _gmm_w8a8_dynamic(backend, spec: LinearSpec, t: dict, x: torch.Tensor, group_list=None):
    """``npu_dynamic_quant`` + ``npu_grouped_matmul`` int8 × int8 with per-token scales (W8A8_DYNAMIC MoE):
    routed (``group_list``), each routed row keeps its own per-token scale; dense, the scales repeat
    with the rows (:func:`moe_rows`).
    The weight scale goes in the activation dtype for bf16 (vLLM-Ascend casts ``w13_scale_fp32`` to the
    params dtype; a bf16 scale gives bf16 output, torch_npu_ops.md §6.1), float32 otherwise."""
    experts = spec.num_experts
    k = x.shape[-1]
    x_q, x_scale = backend.ops.npu_dynamic_quant(x.reshape(-1, k))
    scale = t["weight_scale"]
    if x.dtype == torch.bfloat16:
        scale = scale.to(torch.bfloat16)
    bias = t.get("bias")
    rows, counts = moe_rows(x_q, experts, group_list)
    y = backend.ops.npu_grouped_matmul(
        [rows], [t["weight"]], scale=[scale], per_token_scale=[x_scale if group_list is not None else x_scale.repeat(experts)],
        bias=None if bias is None else [bias.float()], group_list=counts,
        split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
    )[0]
    x_effective = (x_q.double() * x_scale.double().unsqueeze(-1)).reshape(*x.shape[:-1], k)
    return (y if group_list is not None else y.reshape(experts, *x.shape[:-1], -1)), x_effective
