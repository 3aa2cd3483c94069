"""Weight-only integer targets for ``torch_npu.npu_weight_quant_batchmatmul`` (A16W4 / A16W8).

Kernel formula (torch_npu_ops.md §2.1, offset **added**)::

    W[k, n] = (weight[k, n] + antiquant_offset[g(k), n]) * antiquant_scale[g(k), n],  y = x @ W + bias

From the canonical ``w = (q - z) * s`` with unsigned codes ``q`` of ``b`` bits and midpoint
``m = 2**(b-1)``, the written tensors are:

- ``weight``: signed ``q - m`` (exact: 2/3/4-bit codes fit int4, 8-bit codes fit int8), stored
  transposed ``[K, N]``. int4 is int4pack'ed along N: int32 ``[K, N/8]``, element ``8j+t`` in bits
  ``4t..4t+3`` of word ``j`` (two's complement nibbles). int8 is plain int8 ``[K, N]``.
- ``antiquant_offset = m - z`` in the scale dtype, ``[G, N]`` (``[N]`` per-channel); omitted when
  the layer is symmetric (``z == m`` everywhere, the offset would be all zeros). This is the
  correct sign: sglang's NPU GPTQ path writes ``z - m``, which only works for symmetric models.
- ``antiquant_scale``: the source scale dtype, ``[G, N]`` (``[N]`` per-channel);
  ``antiquant_group_size`` = the group size (0 for per-channel).
- act-order: K is sorted by ``perm = argsort(g_idx)`` (rows of ``weight`` and therefore groups
  become contiguous) and ``perm`` int32 ``[K]`` is written; the caller feeds ``x[..., perm]``.
- ``bias`` as in the source.
- MoE expert stacks (``num_experts = E``, :mod:`npuconv.experts`): every tensor gets a
  leading ``E`` — ``weight`` int32 ``[E, K, N/8]`` (int8 ``[E, K, N]``), ``antiquant_scale`` /
  ``antiquant_offset`` ``[E, G, N]`` (``[E, N]`` per-channel), ``bias`` ``[E, N]`` — under the stacked
  name ``<prefix>.experts.<proj>``, always ND, for ``npu_grouped_matmul`` (``antiquant_scale=[s]``,
  ``antiquant_offset=[o]``, ``group_type=0``; npu_loaders.md §4 MoE, §6.3). gate and up are written as
  two stacks; the engines' ``w13`` is their concatenation along the last dim (exact for the int4pack
  words too, since N % 8 == 0). Act-order stacks are refused.

For 2/3-bit sources the midpoint is ``2**(b-1)`` (not 8), so symmetric layers need no offset;
``(q - m) + (m - z) = q - z`` whatever ``m`` is.
"""

from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.io.safetensors_io import name_of
from npuconv.model import INT, LinearSpec, QuantizedLinear
from npuconv.packing import pack_nibbles
from npuconv.errors import InputError
from npuconv.writers.base import ROW, Target, Thresholds
from npuconv.writers.npu_common import (
    MAX_KERNEL_DIM,
    group_scale_layout,
    group_scale_shape,
    maybe_nz,
    act_order_perm,
    moe_rows,
)

KERNEL = "npu_weight_quant_batchmatmul"
#: verify's rel-L2 limits of the weight-only kernel, per activation dtype (the dequantized weight is
#: rounded to the activation dtype: 11 significant bits for fp16, 8 for bf16)
WEIGHT_ONLY_REL_L2 = {"float16": 2e-3, "bfloat16": 1e-2}


class WeightOnlyIntTarget(Target):
    """Shared by ``npu-int4`` (``storage_bits = 4``) and ``npu-int8`` (``storage_bits = 8``)."""

    storage_bits = 4
    accepted_bits: tuple[int, ...] = (2, 3, 4)
    nz_default = False

    # ------------------------------------------------------------------ checks
    def accepts(self, spec: LinearSpec) -> str | None:
        if spec.weight_format != INT:
            return f"weights are {spec.weight_format}, not integers"
        if spec.bits not in self.accepted_bits:
            return f"{spec.bits}-bit weights (this target takes {', '.join(map(str, self.accepted_bits))}-bit)"
        n, k = spec.out_features, spec.in_features
        if max(n, k) > MAX_KERNEL_DIM:
            return f"K={k}, N={n}: the kernel takes K, N ≤ {MAX_KERNEL_DIM}"
        if self.storage_bits == 4 and n % 8:
            return f"N={n} is not a multiple of 8 (int4pack packs 8 along N)"
        if spec.num_groups > 1 and (spec.group_size % 32 or spec.group_size >= k):
            return f"group size {spec.group_size}: antiquant_group_size must be a multiple of 32 in [32, K-1]"
        if spec.num_groups > 1 and k % spec.group_size:
            return f"K={k} is not a multiple of the group size {spec.group_size}"
        if spec.num_experts is not None and spec.act_order:
            return "act-order (g_idx) on stacked MoE experts: npu_grouped_matmul has no per-expert input permutation"
        return None

    def nz_c0(self, spec: LinearSpec) -> int | None:
        """C0 of the NZ weight, or None for ND (with a warning when NZ was asked for but not allowed)."""
        wanted = self.nz_default if self.options.nz is None else self.options.nz
        if not wanted:
            return None
        reason = self._nz_refusal(spec)
        if reason:
            if self.options.nz:
                self.warn(f"{spec.name}: written ND instead of NZ ({reason})")
            return None
        return layouts.nz_c0(torch.int32, int4_packed=True) if self.storage_bits == 4 else layouts.nz_c0(torch.int8)

    def _nz_refusal(self, spec: LinearSpec) -> str | None:
        if spec.num_experts is not None:  # npu_loaders.md §4 MoE, §5 MoE, §6.3: no NZ cast
            return "the engines keep weight-only MoE expert stacks ND for npu_grouped_matmul"
        # aclnnWeightQuantBatchMatmulV2 NZ support on A2/A3 (torch_npu_ops.md §2.3)
        if self.storage_bits == 8 and spec.num_groups > 1:
            return "int8 NZ weights are per-channel only"
        if self.storage_bits == 4 and spec.num_groups > 1 and spec.group_size not in (64, 128):
            return f"int4 NZ needs group size 64 or 128, not {spec.group_size}"
        if self.storage_bits == 4 and spec.out_features % 64:
            return "int4 NZ needs N % 64 == 0"
        return None

    # ------------------------------------------------------------------ plan
    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        p, n, k, batch = spec.name, spec.out_features, spec.in_features, spec.batch_shape
        scale_shape = group_scale_shape(batch, n, spec.num_groups)
        c0 = self.nz_c0(spec)
        if self.storage_bits == 4:
            weight = tensor_entry(f"{p}.weight", torch.int32, (*batch, k, n // 8), nz_c0=c0, packing="int4pack",
                                  logical_shape=(*batch, k, n), n=-1, k=-2)
        else:
            weight = tensor_entry(f"{p}.weight", torch.int8, (*batch, k, n), nz_c0=c0, n=-1, k=-2)
        scale_k = None if spec.num_groups == 1 else -2
        entries = {"weight": weight,
                   "antiquant_scale": tensor_entry(f"{p}.antiquant_scale", spec.scale_dtype, scale_shape, n=-1, k=scale_k)}
        if not spec.symmetric:
            entries["antiquant_offset"] = tensor_entry(f"{p}.antiquant_offset", spec.scale_dtype, scale_shape, n=-1, k=scale_k)
        if spec.act_order:
            entries["perm"] = tensor_entry(f"{p}.perm", torch.int32, (*batch, k), k=-1)
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", spec.bias_dtype or spec.scale_dtype, (*batch, n), n=-1)
        return entries

    def describe_layer(self, spec: LinearSpec) -> dict:
        return {
            "scheme": spec.scheme,
            "source_scheme": spec.source_scheme,
            "kernel": KERNEL,
            "bits": spec.bits,
            "storage_bits": self.storage_bits,
            "group_size": spec.group_size,
            "antiquant_group_size": 0 if spec.num_groups == 1 else spec.group_size,
            "symmetric": spec.symmetric,
            "act_order": spec.act_order,
            "code_offset": 2 ** (spec.bits - 1),
            "tensors": self.tensor_entries(spec),
        }

    # ------------------------------------------------------------------ write
    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        spec = layer.spec
        entries = self.tensor_entries(spec)
        out: dict[str, torch.Tensor] = {}
        if spec.act_order:
            assert layer.g_idx is not None
            out["perm"] = act_order_perm(layer.g_idx, spec.group_size, spec.name)
        if self.storage_bits == 4 and spec.bits == 4 and layer.packed_kn is not None:
            # the reader's words are int4pack already (order and signed values): only sort K rows
            words = layer.packed_kn if "perm" not in out else layer.packed_kn[..., out["perm"].long(), :]
            out["weight"] = maybe_nz(words, entries["weight"].get("c0"))
            return self._finish(layer, entries, out)
        if self.storage_bits == 4 and spec.bits == 4:
            codes = layer.qweight if "perm" not in out else layer.qweight[..., out["perm"].long()]
            codes_kn = codes.transpose(-1, -2).contiguous()  # free when the reader returned a [K, N] view
            # two's-complement nibble of q - 8 is q ^ 8: pack the codes, then flip bit 3 of both nibbles
            weight = (pack_nibbles(codes_kn) ^ 0x88).view(torch.int32)
        else:
            signed = layer.signed_codes() if "perm" not in out else layer.signed_codes()[..., out["perm"].long()]
            signed_kn = signed.transpose(-1, -2)
            weight = layouts.int4pack(signed_kn.contiguous()) if self.storage_bits == 4 else signed_kn
        out["weight"] = maybe_nz(weight, entries["weight"].get("c0")).contiguous()  # NZ gathers from the view
        return self._finish(layer, entries, out)

    def _finish(self, layer: QuantizedLinear, entries: dict[str, dict], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add scales, offsets and bias to the written weight (and perm); tensors by output name."""
        midpoint = 2 ** (layer.spec.bits - 1)
        out["antiquant_scale"] = group_scale_layout(layer.scale)
        if "antiquant_offset" in entries:
            out["antiquant_offset"] = group_scale_layout((midpoint - layer.zero_points()).to(layer.scale.dtype))
        if "bias" in entries:
            assert layer.bias is not None
            out["bias"] = layer.bias.to(getattr(torch, entries["bias"]["dtype"]))
        return {entries[role]["name"]: out[role] for role in entries}

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        midpoint = 2 ** (spec.bits - 1)
        weight = tensors["weight"]
        signed_kn = layouts.int4unpack(weight) if self.storage_bits == 4 else weight
        codes = (signed_kn.transpose(-1, -2).view(torch.uint8) + midpoint).contiguous()  # wraps back to q
        scale = _to_group_layout(tensors["antiquant_scale"], spec)
        zero = None
        if "antiquant_offset" in tensors:
            zero = (midpoint - _to_group_layout(tensors["antiquant_offset"], spec).float()).to(torch.int16)
        g_idx = None
        if "perm" in tensors:
            perm = tensors["perm"].long()
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel())
            codes = codes[..., inverse]
            g_idx = (inverse // spec.group_size).to(torch.int32)
        return QuantizedLinear(spec, codes, scale, zero, g_idx, tensors.get("bias"))


    # ------------------------------------------------------------------ kernel
    def serves(self, spec: LinearSpec) -> bool:
        return spec.weight_format == INT and spec.bits in self.accepted_bits

    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        """``npu_weight_quant_batchmatmul(x[..., perm], weight, antiquant_scale, antiquant_offset, bias,
        antiquant_group_size)``; a stacked MoE layer without act-order runs on ``npu_grouped_matmul``
        (antiquant form, as both engines; routed with ``group_list``). ``x_effective`` is ``x``."""
        if spec.num_experts is not None:
            if "perm" in tensors:
                return self.run_experts(backend, entry, spec, tensors, x, group_list)
            return _gmm_weight_only(backend, spec, tensors, x, group_list), x
        t = tensors
        x_sorted = x[..., t["perm"].long()] if "perm" in t else x  # act-order: the engine feeds x[..., perm]
        scale = t["antiquant_scale"].to(x.dtype)
        offset = t["antiquant_offset"].to(x.dtype) if "antiquant_offset" in t else None
        y = backend.ops.npu_weight_quant_batchmatmul(
            x_sorted, t["weight"], scale, antiquant_offset=offset, bias=_bias_for(t.get("bias"), x.dtype),
            antiquant_group_size=entry["antiquant_group_size"],
        )
        return y, x

    def thresholds(self, entry: dict, activation_dtype: torch.dtype) -> Thresholds:
        return Thresholds(WEIGHT_ONLY_REL_L2[name_of(activation_dtype)])

    # ------------------------------------------------------------------ tensor parallelism
    def split(self, role, tensor, entry, spec, rank, world, parallel):
        """As :meth:`Target.split`; group scales split along G (rank boundaries on group boundaries),
        and ``perm`` under row parallelism becomes the rank's local permutation — exact only when the
        act-order groups of the rank's sorted rows come from its own input columns."""
        if role == "perm" and parallel == ROW and world > 1:
            k = spec.in_features
            rows = super().split(role, tensor, entry, spec, rank, world, parallel).long()
            lo, hi = rank * k // world, (rank + 1) * k // world
            if bool(((rows < lo) | (rows >= hi)).any()):
                raise InputError(f"{spec.name}: act-order groups are not aligned to the rank boundary; "
                                 f"row-parallel split over {world} ranks is not exact")
            return (rows - lo).to(tensor.dtype)
        return super().split(role, tensor, entry, spec, rank, world, parallel)

    def split_unit(self, role, entry, spec, axis, parallel):
        if role in ("antiquant_scale", "antiquant_offset") and parallel == ROW:
            return spec.group_size
        return super().split_unit(role, entry, spec, axis, parallel)


def _bias_for(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The antiquant kernels' bias dtype: float32 for bf16 activations, else the activation dtype."""
    return None if bias is None else bias.to(torch.float32 if dtype == torch.bfloat16 else dtype)


def _gmm_weight_only(backend, spec: LinearSpec, t: dict, x: torch.Tensor, group_list=None) -> torch.Tensor:
    """``npu_grouped_matmul`` antiquant (W4A16/W8A16 MoE): ``W = (w + antiquant_offset) * antiquant_scale``;
    ``group_list`` = tokens per expert, ``group_list_type=1``, ``group_type=0`` (npu_loaders.md §3.3,
    §6.3): routed rows as given, or every token through every expert (:func:`moe_rows`). A symmetric
    stack gets a zero offset, as vLLM-Ascend passes one (npu_loaders.md §6.3)."""
    experts = spec.num_experts
    scale = t["antiquant_scale"].to(x.dtype)
    offset = t["antiquant_offset"].to(x.dtype) if "antiquant_offset" in t else torch.zeros_like(scale)
    bias = _bias_for(t.get("bias"), x.dtype)
    rows, counts = moe_rows(x, experts, group_list)
    y = backend.ops.npu_grouped_matmul(
        [rows], [t["weight"]], antiquant_scale=[scale], antiquant_offset=[offset],
        bias=None if bias is None else [bias], group_list=counts,
        split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
    )[0]
    return y if group_list is not None else y.reshape(experts, *x.shape[:-1], -1)


def _to_group_layout(t: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    """Kernel ``[..., G, N]`` / ``[..., N]`` → canonical ``[..., N, G]``."""
    return t.unsqueeze(-1).contiguous() if spec.num_groups == 1 else t.transpose(-1, -2).contiguous()
