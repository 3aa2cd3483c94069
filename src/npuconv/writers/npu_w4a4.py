"""``--to npu-w4a4``: int4 weights × int4 dynamic per-token activations for ``npu_quant_matmul`` (A4W4).

Sources: symmetric per-channel 2/3/4-bit integer layers — msModelSlim W4A4_DYNAMIC, and any other
symmetric per-channel source when the user asks for int4 activations (the manifest records that the
activation quantization was added or changed). A2/A3 ``npu_quant_matmul`` int4 × int4 has one
per-channel weight scale and no weight offset (ops §4.4, loaders §3.7).

Written tensors per layer ``p`` (loaders §3.7, SGLang ``NPU_W4A4DynamicLinearMethod``):

- ``p.weight`` int32 ``[K, N/8]``: the signed values ``q − 2**(b−1)`` transposed to ``[K, N]`` and
  int4pack'ed along N (element ``8j+t`` in bits ``4t..4t+3`` of word ``j``). This is SGLang's
  layout (``T.contiguous()`` then int4pack). vLLM-Ascend instead packs ``[N, K]`` along K into
  ``[N, K/8]`` and passes ``.transpose(-1, -2)``; both are legal x2 operands (the op reads N as
  ``x2.last·8`` for the contiguous one). The manifest says which was written (``int4_layout``).
  ND always: neither engine casts W4A4 weights to NZ.
- ``p.weight_scale`` float32 ``[N]``.
- ``p.bias`` float32 ``[N]`` if the layer has one (SGLang passes it to the kernel).

Kernel call::

    x_q, x_scale = npu_dynamic_quant(x, dst_type=torch.quint4x2)   # int32 [M, K/8], fp32 [M]
    y = npu_quant_matmul(x_q, weight, weight_scale, pertoken_scale=x_scale, bias=bias,
                         output_dtype=x.dtype)                    # (acc · s) · x_scale + bias

``npu_dynamic_quant`` to int4: ``amax = max|x|`` per row, ``y = rint_half_even(x · (7/amax))``,
``scale = amax · fp32(1/7)`` (ops §5.1).
"""

from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.model import INT, LinearSpec, QuantizedLinear
from npuconv.writers.base import Target
from npuconv.writers.npu_common import MAX_KERNEL_DIM
from npuconv.writers.npu_w4a8 import codes_from_signed_kn, int4_weight_entry, signed_kn

KERNEL = "npu_quant_matmul"

#: Which engine layout the int4 weight uses (loaders §3.7, §7). Only SGLang's ``[K, N/8]`` is written.
W4A4_LAYOUT = "sglang"


class NpuW4A4Target(Target):
    name = "npu-w4a4"
    native_rank = 20
    summary = "W4A4 int4 weights + int4 dynamic activations for npu_quant_matmul (ModelSlim W4A4_DYNAMIC, symmetric per-channel int4)"

    def accepts(self, spec: LinearSpec) -> str | None:
        act = spec.activation
        if spec.weight_format != INT or spec.bits not in (2, 3, 4):
            return "needs 2-, 3- or 4-bit integer weights"
        if not spec.symmetric:
            return "npu_quant_matmul int4 × int4 has no weight zero point: weights must be symmetric"
        if spec.num_groups != 1:
            return "npu_quant_matmul int4 × int4 takes per-channel weight scales only"
        if act is not None and not (act.kind == INT and act.dynamic and act.strategy == "token" and act.symmetric):
            return "the source quantizes activations statically or non-integer; only dynamic per-token int activations map"
        if spec.act_order:
            return "act-order (g_idx) layers are not supported"
        n, k = spec.out_features, spec.in_features
        if n % 8 or k % 8:
            return f"N={n}, K={k}: int4 packing needs both multiples of 8"
        if max(n, k) > MAX_KERNEL_DIM:
            return f"N and K must be ≤ {MAX_KERNEL_DIM}"
        return None

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        p, n, batch = spec.name, spec.out_features, spec.batch_shape
        entries = {
            "weight": int4_weight_entry(spec, None),
            "weight_scale": tensor_entry(f"{p}.weight_scale", torch.float32, (*batch, n), n=-1),
        }
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", torch.float32, (*batch, n), n=-1)
        return entries

    def describe_layer(self, spec: LinearSpec) -> dict:
        act = spec.activation
        return {
            "scheme": "w4a4_dynamic",
            "source_scheme": spec.source_scheme,
            "kernel": KERNEL,
            "kernel_mode": "a4w4",
            "activation": "int4-dynamic-per-token",
            "activation_added": act is None,
            "activation_changed": act is not None and act.bits != 4,
            "bits": spec.bits,
            "group_size": -1,
            "symmetric": True,
            "code_offset": 2 ** (spec.bits - 1),
            "int4_layout": W4A4_LAYOUT,
            "view": None,
            "tensors": self.tensor_entries(spec),
        }

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        entries = self.tensor_entries(layer.spec)
        out = {
            "weight": layouts.int4pack(signed_kn(layer)),
            "weight_scale": layer.effective_scale()[..., 0].contiguous(),
        }
        if "bias" in entries:
            assert layer.bias is not None
            out["bias"] = layer.bias.float()
        return {entries[role]["name"]: out[role] for role in entries}

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        codes = codes_from_signed_kn(layouts.int4unpack(tensors["weight"]), spec.bits)
        scale = tensors["weight_scale"].float().unsqueeze(-1)
        return QuantizedLinear(spec, codes, scale, bias=tensors.get("bias"))

    # ------------------------------------------------------------------ kernel
    def serves(self, spec: LinearSpec) -> bool:
        act = spec.activation
        return (spec.weight_format == INT and act is not None and act.kind == INT and act.dynamic
                and act.bits == 4 and spec.bits <= 4 and self.accepts(spec) is None)

    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        """``npu_dynamic_quant(x, dst_type=quint4x2)`` + ``npu_quant_matmul`` int4 × int4, per-token (SGLang)."""
        if spec.num_experts is not None:
            return self.run_experts(backend, entry, spec, tensors, x, group_list)
        k = x.shape[-1]
        lead = x.shape[:-1]
        x_q, x_scale = backend.ops.npu_dynamic_quant(x.reshape(-1, k), dst_type=torch.quint4x2)
        bias = tensors.get("bias")
        y = backend.ops.npu_quant_matmul(
            x_q, tensors["weight"], tensors["weight_scale"], pertoken_scale=x_scale,
            bias=None if bias is None else bias.float(), output_dtype=x.dtype,
        )
        values = layouts.int4unpack(x_q.cpu()).double()  # [M, K] signed int4 activations
        x_effective = (values * x_scale.cpu().double().unsqueeze(-1)).reshape(*lead, k)
        return y.reshape(*lead, -1), x_effective
