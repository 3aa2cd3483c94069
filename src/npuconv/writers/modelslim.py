"""``--to modelslim``: msModelSlim's AscendV1 checkpoint format, the one vLLM-Ascend and sglang load as is.

The output is what msModelSlim 26.1.0's ``ascendv1_saver`` (and, for W4A16, its ``llm_ptq``
saver with ``version "1.0.0"``) writes, and it is read back by :mod:`npuconv.readers.modelslim`
into exactly the canonical layers it was written from (this module is that reader's inverse):

- ``quant_model_weights.safetensors`` (one shard) or ``quant_model_weights-0000i-of-0000n.safetensors``
  + ``quant_model_weights.safetensors.index.json``;
- ``quant_model_description.json``: ``tensor name → type string`` for every written tensor
  (``"FLOAT"`` for tensors that pass through and for the float ``<p>.bias`` of quantized layers),
  then ``version "1.0.0"``, ``model_quant_type``, ``metadata {}``, ``group_size``, ``optional {}``;
  indent 4, in planning order (layers in the source's order, then the float tensors);
- ``config.json`` without ``quantization_config`` (top level and ``text_config``), as msModelSlim's
  ``remove_quantization_config``; ``npuconv.json`` (npuconv's record of the conversion) is kept
  beside it but nothing points to it.

Canonical layer → type and tensors (``M = 2**(B-1)`` for the storage width ``B``; canonical codes
``q`` are unsigned and zero points ``z`` are in the same domain, so the stored signed value is
``q - M`` and msModelSlim's signed zero point ``offset = z - M`` gives ``(q-M) - (z-M) = q - z``):

===========================  ======================  ==================================================================
canonical                    type                    tensors ``<p>.*`` (all float scales written as float32)
===========================  ======================  ==================================================================
int ≤4-bit, no act quant     ``W4A16``               ``weight`` int8 int4 pairs: per-channel along K ``[N, K/2]``
                                                     (low nibble = even k), per-group along N ``[N/2, K]`` (low
                                                     nibble = even row); ``weight_scale``/``weight_offset`` ``[N, G]``
int 5–8-bit, no act quant    ``W8A16``               ``weight`` int8 ``[N, K]``, ``weight_scale``/``weight_offset``
                                                     ``[N, G]`` (offset = z − 128, zeros when symmetric)
int8 sym, int8 dyn token     ``W8A8_DYNAMIC``        as W8A16, ``weight_offset`` zeros
int4 sym per-channel,        ``W4A8_DYNAMIC``        ``weight`` int4 pairs along N ``[N/2, K]``, ``weight_scale``
int8 dyn token                                       ``[N, 1]``, ``weight_offset`` zeros ``[N, 1]``, ``scale_bias``
int ≤4-bit, int4 dyn token   ``W4A4_DYNAMIC``        ``weight`` int8 ``[N, K]`` one int4 value per byte,
                                                     ``weight_scale``/``weight_offset`` ``[N, G]``
int8 sym per-channel,        ``W8A8``                ``weight`` int8, ``quant_bias`` int32 ``[N]``, ``input_scale``
int8 static per-tensor                               / ``input_offset`` float32 ``[1]``, ``deq_scale`` ``[N]``
fp8 per-channel,             ``WFP8AFP8_DYNAMIC``    ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale``
fp8 dyn token                                        ``[N, 1]``, ``weight_offset`` zeros ``[N, 1]``
MXFP8 (act MXFP8 or none)    ``W8A8_MXFP8``          ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` uint8
                                                     E8M0 ``[N, ceil(K/32)]``
MXFP4, act MXFP8 / MXFP4 /   ``W4A8_MXFP`` /         ``weight`` uint8 ``[N, K/2]`` (E2M1, low nibble = even k),
none                         ``W4A4_MXFP4`` /        ``weight_scale`` as above
                             ``W4A16_MXFP4``
===========================  ======================  ==================================================================

A quantized layer's bias is written as ``<p>.bias`` float32, type ``FLOAT`` (as the v1 saver).

W8A8 static (``on_w8a8_static``): ``deq_scale = input_scale * weight_scale`` in float32, stored
float32 when the model dtype is bfloat16 and otherwise as int64 holding the float32 bits
(``deqscale2int64``: :func:`npuconv.layouts.float_bits_to_int64`); ``quant_bias = round(bias / deq_scale -
input_offset * Σ_k w[n, k])`` in float32 (``bias`` 0 when absent). The format has no
``weight_scale``: the reader recovers ``deq_scale / input_scale``, which gives the weight scale
back exactly whenever one float32 ``deq_scale`` can (always for scales read from msModelSlim W8A8);
for other sources some float32 scales cannot be reached by that division at all; they read back one
ulp off, with a warning. (Engines use ``deq_scale`` itself, which is exactly the
product vLLM-Ascend forms for a compressed-tensors W8A8 checkpoint.)

W4A8_DYNAMIC ``scale_bias`` (``on_w4a8_dynamic`` + ``process_scale(prefix, ·, 16)``, the
precomputed ``8·Σ_k dequant(w)`` of the grouped-matmul kernel, :func:`npuconv.layouts.a8w4_scale_bias`):
with ``d = w * s`` float32 ``[N, K]``, column-parallel layers get ``8 * d.sum(1)`` ``[N, 1]``;
row-parallel ones get 16 partial sums over K/16-wide chunks ``[N, 16]``; a name that is neither
(:func:`npuconv.parallel.parallel_kind`, one rule with ``npu-w4a8``) gets ``d`` itself ``[N, K]``
(msModelSlim's fallthrough, with a warning). Same float32 operations as msModelSlim, so the bytes
match for the names msModelSlim's substring test knows (q/k/v/gate/up/o/down/w1/w2/w3); names it
misses but engines split (``q_a_proj``, ``dense_4h_to_h``, …) get the engines' form instead.

MoE expert stacks (``<p>.experts.<proj>`` with ``num_experts = E``, :mod:`npuconv.experts`)
are written un-stacked, ``<p>.experts.<e>.<proj>.*`` per expert with the types and tensors above,
because msModelSlim stores (and the engines load) every expert as its own linear; the modelslim
reader stacks them again.

Engines pick a fused layer's method from one shard and require the same type on every shard:
q/k/v, gate/up (w1/w3) and, per MoE block, every expert's gate/up and every expert's down. Planning
fails when a source mixes types (a quantized shard and a float one included) within such a group.

``model_quant_type``: the highest of the written types in msModelSlim's ``QUANT_TYPE_PRIORITY``
(types outside it, e.g. W4A8_DYNAMIC, are skipped as msModelSlim does, so an all-W4A8 model says
``"FLOAT"``); a model whose only quantized type is W4A16 says ``"W4A16"``, as the v0 saver does.
``group_size``: 0, or the group size of the last per-group integer layer (32 for MX layers).
"""

from __future__ import annotations

import json
from typing import ClassVar

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import entry_plan, tensor_entry
from npuconv.layouts import A8W4_SCALE_BIAS_CHUNKS
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import FP4_E2M1, FP8_E4M3, INT, SCALE_E8M0, LinearSpec, QuantizedLinear
from npuconv.modelslim_schema import (
    DESCRIPTION,
    FLOAT,
    INT_SUFFIXES,
    KERNELS,
    MX_GROUP,
    QUANT_TYPE_PRIORITY,
    STORAGE_BITS,
    UNDESCRIBED_SUFFIXES,
    VERSION,
    fused_group,
    mx_type,
)
from npuconv.packing import pack_nibbles
from npuconv.parallel import COLUMN, ROW, check_partial_sums_share, parallel_kind, refuse_static_quant_bias
from npuconv.experts import unstack_layer, unstack_spec
from npuconv.io.safetensors_io import TensorInfo, TensorPlan
from npuconv.writers.base import Target



def compute_scale_bias(prefix: str, signed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W4A8_DYNAMIC ``scale_bias`` from signed int4 values ``[N, K]`` and the float32 scale ``[N]``:
    :func:`npuconv.layouts.a8w4_scale_bias` in float32 (msModelSlim's arithmetic) — ``[N, 1]`` for a
    column-parallel layer, the 16 partial sums ``[N, 16]`` for a row-parallel one
    (:func:`npuconv.parallel.parallel_kind`), and for an unknown name msModelSlim's fallthrough, the
    dequantized weight ``[N, K]`` itself."""
    kind = parallel_kind(prefix)
    if kind is None:
        return signed.to(torch.float32) * scale[:, None]
    chunks = 1 if kind == COLUMN else A8W4_SCALE_BIAS_CHUNKS
    return layouts.a8w4_scale_bias(signed, scale[:, None], chunks, accumulate=torch.float32)


def deq_scale_float(input_scale: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """msModelSlim's float32 ``deq_scale = input_scale * weight_scale`` ``[N]``, and the number of channels
    whose weight scale does not read back as ``fl(deq_scale / input_scale)``.

    A scale that itself came from such a division (every msModelSlim W8A8 source) always reads back
    exactly; other float32 scales sometimes have no float32 ``deq_scale`` that divides back to them
    (no neighbour of the product does either), and then read back one ulp off.
    """
    deq = input_scale * scale
    return deq, int((deq / input_scale != scale).sum())


class ModelSlimTarget(Target):
    name = "modelslim"
    summary = "msModelSlim AscendV1 checkpoint (quant_model_description.json), loaded by vLLM-Ascend / sglang as is"
    weight_prefix: ClassVar[str] = "quant_model_weights"

    def __init__(self, options):
        super().__init__(options)
        self._description: dict[str, str] = {}  # tensor name → type, in planning order
        self._group_sizes: list[int] = []  # per planned quantized layer: 0 per-channel, else g
        self._shards: dict[tuple[str, str], tuple[str, str]] = {}  # fused group → (first shard, its type)

    # ------------------------------------------------------------------ mapping
    def quant_type(self, spec: LinearSpec) -> str:
        """The msModelSlim type string of a layer (call only when :meth:`accepts` is None)."""
        qtype, reason = self._classify(spec)
        assert qtype is not None, reason
        return qtype

    def accepts(self, spec: LinearSpec) -> str | None:
        return self._classify(spec)[1]

    def _classify(self, spec: LinearSpec) -> tuple[str | None, str | None]:
        if spec.num_experts is not None:  # written un-stacked: every expert as its own linear, as msModelSlim
            members = unstack_spec(spec)
            if members is None:
                return None, "stacked MoE experts without an '<prefix>.experts.<proj>' name cannot be split per expert"
            return self._classify(members[0])
        if spec.act_order:
            return None, "act-order (g_idx) has no msModelSlim representation"
        if spec.has_global_scale:
            return None, "NVFP4-style global scales have no msModelSlim type"
        float_scale = spec.scale_format != SCALE_E8M0
        if float_scale and spec.scale_dtype not in ("float16", "bfloat16", "float32"):
            return None, f"torch.{spec.scale_dtype} scales cannot be stored as float32 without rounding"
        if float_scale and spec.num_groups > 1 and spec.in_features % spec.group_size:
            return None, f"K={spec.in_features} is not a multiple of the group size {spec.group_size}"
        if spec.weight_format == INT:
            qtype, reason = self._classify_int(spec)
        elif spec.scale_format == SCALE_E8M0:
            qtype, reason = self._classify_mx(spec)
        elif spec.weight_format == FP8_E4M3:
            qtype, reason = self._classify_fp8(spec)
        else:
            return None, f"{spec.weight_format} weights with float scales (NVFP4) have no msModelSlim type"
        if reason is None:
            reason = self._shape_reason(spec, qtype)
        return (None, reason) if reason else (qtype, None)

    @staticmethod
    def _classify_int(spec: LinearSpec) -> tuple[str | None, str | None]:
        act = spec.activation
        if act is None:
            if spec.bits <= 4:
                return "W4A16", None
            if spec.bits <= 8:
                return "W8A16", None
            return None, f"{spec.bits}-bit weights (msModelSlim stores int4 or int8)"
        if act.kind != INT:
            return None, f"{act.kind} activations with integer weights have no msModelSlim type"
        if act.dynamic:
            if not act.symmetric or act.strategy != "token":
                return None, "dynamic activation quantization must be symmetric per-token"
            if act.bits == 8 and spec.bits == 8:
                if not spec.symmetric:
                    return None, ("W8A8_DYNAMIC has no weight zero point (its weight_offset is zeros): "
                                  "weights must be symmetric")
                return "W8A8_DYNAMIC", None
            if act.bits == 8 and spec.bits == 4:
                if not spec.symmetric:
                    return None, "W4A8_DYNAMIC has no weight zero point: weights must be symmetric"
                if spec.num_groups != 1:
                    return None, ("per-group int4 with int8 activations: msModelSlim's per-group W4A8_DYNAMIC is the "
                                  "two-stage int8→int4 form, not a general group scale; per-channel only")
                return "W4A8_DYNAMIC", None
            if act.bits == 4 and spec.bits <= 4:
                return "W4A4_DYNAMIC", None
            return None, f"{spec.bits}-bit weights with {act.bits}-bit dynamic activations have no msModelSlim type"
        if act.bits != 8 or spec.bits != 8 or act.strategy != "tensor":
            return None, "static activation quantization needs int8 weights and per-tensor int8 activations (W8A8)"
        if not spec.symmetric:
            return None, "W8A8 stores no weight zero point: weights must be symmetric"
        if spec.num_groups != 1:
            return None, "W8A8 (deq_scale [N]) takes per-channel weight scales only"
        return "W8A8", None

    def _classify_mx(self, spec: LinearSpec) -> tuple[str | None, str | None]:
        act = spec.activation
        if spec.group_size != MX_GROUP:
            return None, f"MX block size must be {MX_GROUP}, got {spec.group_size}"
        act_kind = None if act is None else (act.kind if act.strategy == "group" and act.dynamic else "other")
        if spec.weight_format == FP8_E4M3 and act_kind is None:
            act_kind = FP8_E4M3  # no weight-only MXFP8 type: written as W8A8_MXFP8 (a planning warning says so)
        qtype = mx_type(spec.weight_format, act_kind)
        if qtype is not None:
            return qtype, None
        return None, f"{spec.scheme} has no msModelSlim type (MX activations must be MXFP8/MXFP4 or none)"

    @staticmethod
    def _classify_fp8(spec: LinearSpec) -> tuple[str | None, str | None]:
        act = spec.activation
        if act is None or act.kind != FP8_E4M3 or not act.dynamic or act.strategy != "token":
            return None, ("fp8 weights need dynamic per-token fp8 activations (WFP8AFP8_DYNAMIC); static or no "
                          "activation quantization has no msModelSlim type")
        if spec.num_groups != 1:
            return None, "WFP8AFP8_DYNAMIC takes per-channel weight scales only"
        return "WFP8AFP8_DYNAMIC", None

    @staticmethod
    def _shape_reason(spec: LinearSpec, qtype: str) -> str | None:
        n, k = spec.out_features, spec.in_features
        pairs_n = qtype == "W4A8_DYNAMIC" or (qtype == "W4A16" and spec.num_groups > 1)
        if pairs_n and n % 2:
            return f"N={n} is odd: {qtype} packs two int4 rows per byte"
        if (qtype == "W4A16" and spec.num_groups == 1 or spec.weight_format == FP4_E2M1) and k % 2:
            return f"K={k} is odd: {qtype} packs two 4-bit values per byte along K"
        if qtype == "W4A8_DYNAMIC" and parallel_kind(spec.name) == ROW and k % A8W4_SCALE_BIAS_CHUNKS:
            return f"K={k} is not a multiple of 16 (row-parallel scale_bias holds 16 partial sums)"
        return None

    # ------------------------------------------------------------------ plan
    def _deq_dtype(self) -> torch.dtype:
        # msModelSlim: float32 for bf16 models, int64 float bits otherwise (its default when unknown)
        return torch.float32 if self.options.model_dtype == torch.bfloat16 else torch.int64

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        qtype = self.quant_type(spec)
        p, n, k, groups = spec.name, spec.out_features, spec.in_features, spec.num_groups
        f32 = torch.float32
        if qtype in ("W8A16", "W8A8_DYNAMIC", "W4A4_DYNAMIC", "W8A8"):
            weight = tensor_entry(f"{p}.weight", torch.int8, (n, k), n=0, k=1)
        elif qtype == "W4A8_DYNAMIC" or (qtype == "W4A16" and groups > 1):
            weight = tensor_entry(f"{p}.weight", torch.int8, (n // 2, k), packing="int4x2_n", logical_shape=(n, k), n=0, k=1)
        elif qtype == "W4A16":
            weight = tensor_entry(f"{p}.weight", torch.int8, (n, k // 2), packing="int4x2_k", logical_shape=(n, k), n=0, k=1)
        elif spec.weight_format == FP4_E2M1:
            weight = tensor_entry(f"{p}.weight", torch.uint8, (n, k // 2), packing="fp4x2", logical_shape=(n, k), n=0, k=1)
        else:  # W8A8_MXFP8, WFP8AFP8_DYNAMIC
            weight = tensor_entry(f"{p}.weight", torch.float8_e4m3fn, (n, k), n=0, k=1)
        entries = {"weight": weight}
        if qtype == "W8A8":
            entries["quant_bias"] = tensor_entry(f"{p}.quant_bias", torch.int32, (n,), n=0)
            entries["input_scale"] = tensor_entry(f"{p}.input_scale", f32, (1,))
            entries["input_offset"] = tensor_entry(f"{p}.input_offset", f32, (1,))
            entries["deq_scale"] = tensor_entry(f"{p}.deq_scale", self._deq_dtype(), (n,), n=0)
        elif spec.scale_format == SCALE_E8M0:
            entries["weight_scale"] = tensor_entry(f"{p}.weight_scale", torch.uint8, (n, -(-k // MX_GROUP)), n=0, k=1)
        else:
            for suffix in INT_SUFFIXES:
                entries[suffix] = tensor_entry(f"{p}.{suffix}", f32, (n, groups), n=0, k=None if groups == 1 else 1)
            if qtype == "W4A8_DYNAMIC":
                kind = parallel_kind(p)
                width = {COLUMN: 1, ROW: A8W4_SCALE_BIAS_CHUNKS}.get(kind, k)
                entries["scale_bias"] = tensor_entry(f"{p}.scale_bias", f32, (n, width), n=0, k=None if kind == COLUMN else 1)
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", f32, (n,), n=0)
        return entries

    def plan_layer(self, spec: LinearSpec) -> list[TensorPlan]:
        members = unstack_spec(spec)
        if members is not None:
            return [plan for member in members for plan in self.plan_layer(member)]
        qtype = self.quant_type(spec)
        entries = self.tensor_entries(spec)
        self._check_fused(spec.name, qtype)
        for role, entry in entries.items():
            self._description[entry["name"]] = FLOAT if role == "bias" else qtype
        if spec.scale_format == SCALE_E8M0:
            self._group_sizes.append(MX_GROUP)
        else:
            self._group_sizes.append(0 if spec.num_groups == 1 else spec.group_size)
        if len({g for g in self._group_sizes if g}) > 1:
            self.warn("layers use different group sizes; quant_model_description.json records one group_size "
                      "(the last per-group layer's, as msModelSlim does)")
        self._plan_warnings(spec, qtype)
        return [entry_plan(e) for e in entries.values()]

    def _plan_warnings(self, spec: LinearSpec, qtype: str) -> None:
        if qtype == "W4A8_DYNAMIC" and parallel_kind(spec.name) is None:
            self.warn(f"{spec.name}: not a known column- or row-parallel name (npuconv.parallel), so scale_bias is the "
                      f"dequantized weight [N, K] (msModelSlim's process_scale fallthrough); engines expect [N, 1] or [N, 16]")
        elif qtype == "W4A16":
            self.warn("W4A16 has no linear method in vLLM-Ascend or sglang (vLLM-Ascend's W4A16 is MoE-only, "
                      "with another weight layout); see `npuconv docs modelslim`")
        elif qtype == "W8A16" and (not spec.symmetric or spec.bits < 8):
            self.warn("W8A16 with non-zero weight_offset: it is msModelSlim's signed zero point, w = (q - offset) * scale; "
                      "vLLM-Ascend passes it unchanged as antiquant_offset, which adds it (see `npuconv docs modelslim`)")
        elif qtype == "W8A8_MXFP8" and spec.activation is None:
            self.warn("MXFP8 weights without activation quantization are written as W8A8_MXFP8 (msModelSlim has no "
                      "weight-only MXFP8 type): engines will quantize the activations to MXFP8")
        if qtype in ("W8A16", "W8A8_DYNAMIC", "W4A4_DYNAMIC") and spec.num_groups > 1:
            self.warn(f"per-group {qtype} is written as msModelSlim writes it, but the engines' linear {qtype} "
                      "methods take per-channel [N, 1] scales (npu_loaders.md §3)")
        if qtype == "W4A4_DYNAMIC" and (not spec.symmetric or spec.bits < 4):
            self.warn("W4A4_DYNAMIC with non-zero weight_offset: the engines' W4A4 matmul ignores weight_offset")

    def plan_passthrough(self, info: TensorInfo) -> TensorPlan:
        if not info.name.endswith(UNDESCRIBED_SUFFIXES):  # QuaRot rotations: written undescribed, as msModelSlim
            self._description[info.name] = FLOAT
        if info.name.endswith(".weight") and len(info.shape) == 2:
            self._check_fused(info.name[: -len(".weight")], FLOAT)
        return TensorPlan(info.name, info.dtype, info.shape)

    def _check_fused(self, prefix: str, qtype: str) -> None:
        group = fused_group(prefix)
        if group is None:
            return
        first = self._shards.setdefault(group, (prefix, qtype))
        if first[1] != qtype:
            raise UnsupportedError(
                f"'{prefix}' would be {qtype} but '{first[0]}' is {first[1]}: vLLM-Ascend and sglang fuse these "
                "shards into one layer and require one msModelSlim type for all of them"
            )

    def describe_layer(self, spec: LinearSpec) -> dict:
        qtype = self.quant_type(spec)
        members = unstack_spec(spec)
        if members is None:
            tensors = self.tensor_entries(spec)
        else:  # roles "experts.<e>.<role>": the per-expert tensors
            tensors = {f"experts.{e}.{role}": entry for e, m in enumerate(members) for role, entry in self.tensor_entries(m).items()}
        return {
            "scheme": spec.scheme,
            "source_scheme": spec.source_scheme,
            "modelslim_type": qtype,
            "kernel": KERNELS[qtype],
            "bits": spec.bits,
            "group_size": spec.group_size,
            "symmetric": spec.symmetric,
            **({} if members is None else {"experts": len(members)}),
            "tensors": tensors,
        }

    # ------------------------------------------------------------------ write
    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        if unstack_spec(layer.spec) is not None:
            return {name: t for member in unstack_layer(layer) for name, t in self.write_layer(member).items()}
        spec = layer.spec
        qtype = self.quant_type(spec)
        entries = self.tensor_entries(spec)
        if qtype in STORAGE_BITS:
            out = self._write_int(layer, qtype)
        elif spec.scale_format == SCALE_E8M0:
            codes = layer.qweight
            weight = pack_nibbles(codes) if spec.weight_format == FP4_E2M1 else codes.contiguous()
            out = {"weight": weight, "weight_scale": layer.scale.to(torch.uint8).contiguous()}
        else:  # WFP8AFP8_DYNAMIC
            scale = layer.scale.to(torch.float32).contiguous()
            out = {"weight": layer.qweight.contiguous(), "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
        if spec.has_bias:
            assert layer.bias is not None
            out["bias"] = layer.bias.to(torch.float32)
        return {entries[role]["name"]: out[role] for role in entries}

    def _write_int(self, layer: QuantizedLinear, qtype: str) -> dict[str, torch.Tensor]:
        spec = layer.spec
        midpoint = 2 ** (STORAGE_BITS[qtype] - 1)
        if STORAGE_BITS[qtype] == spec.bits:
            signed = layer.signed_codes().contiguous()  # [N, K], as msModelSlim holds it
        else:  # narrower codes in a wider type: centred on the type's midpoint (the offset below follows)
            signed = (layer.qweight.to(torch.int16) - midpoint).to(torch.int8).contiguous()
        if qtype == "W8A8":
            return self._write_static(layer, signed)
        scale = layer.scale.to(torch.float32).contiguous()
        if qtype in ("W8A8_DYNAMIC", "W4A8_DYNAMIC"):
            offset = torch.zeros_like(scale)
        else:
            offset = (layer.zero_points() - midpoint).to(torch.float32).contiguous()
        if qtype == "W4A8_DYNAMIC" or (qtype == "W4A16" and spec.num_groups > 1):
            weight = pack_nibbles(signed.T).T.contiguous().view(torch.int8)  # pairs along N: [N/2, K]
        elif qtype == "W4A16":
            weight = pack_nibbles(signed).view(torch.int8)  # pairs along K: [N, K/2]
        else:
            weight = signed
        out = {"weight": weight, "weight_scale": scale, "weight_offset": offset}
        if qtype == "W4A8_DYNAMIC":
            out["scale_bias"] = compute_scale_bias(spec.name, signed, scale[:, 0]).contiguous()
        return out

    def _write_static(self, layer: QuantizedLinear, signed: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = layer.spec
        assert layer.input_scale is not None
        input_scale = layer.input_scale.to(torch.float32).reshape(1)
        input_offset = torch.zeros(1) if layer.input_zero is None else layer.input_zero.to(torch.float32).reshape(1)
        deq, inexact = deq_scale_float(input_scale, layer.effective_scale()[:, 0])
        if inexact:
            self.warn("W8A8 stores only deq_scale = input_scale * weight_scale: some weight scales have no float32 "
                      "deq_scale that divides back to them, and read back 1 ulp off (engines use deq_scale itself)")
        bias = layer.bias.float() if layer.bias is not None else torch.zeros(spec.out_features)
        correction = signed.to(torch.float32).sum(dim=1) * input_offset
        quant_bias = torch.round(bias / deq - correction).to(torch.int32)
        return {
            "weight": signed,
            "quant_bias": quant_bias,
            "input_scale": input_scale,
            "input_offset": input_offset,
            "deq_scale": deq if self._deq_dtype() == torch.float32 else layouts.float_bits_to_int64(deq),
        }

    # ------------------------------------------------------------------ tensor parallelism
    def split(self, role, tensor, entry, spec, rank, world, parallel):
        """As :meth:`Target.split`, with the msModelSlim folds that have no exact row-parallel share refused:
        W8A8 ``quant_bias`` (folds the activation offset over all of K) and a ``scale_bias`` that is not
        the 16 partial sums."""
        if parallel == ROW and world > 1:
            if role == "quant_bias":
                refuse_static_quant_bias(spec.name)
            if role == "scale_bias" and tensor.shape[-1] != A8W4_SCALE_BIAS_CHUNKS:
                raise InputError(f"{spec.name}: scale_bias [N, {tensor.shape[-1]}] has no row-parallel share")
            if role == "scale_bias":
                check_partial_sums_share(spec.name, world, A8W4_SCALE_BIAS_CHUNKS)
        return super().split(role, tensor, entry, spec, rank, world, parallel)

    def split_unit(self, role, entry, spec, axis, parallel):
        if parallel == ROW and role in ("weight_scale", "weight_offset"):
            return MX_GROUP if spec.scale_format == SCALE_E8M0 else spec.group_size
        if parallel == ROW and role == "scale_bias":
            return spec.in_features // A8W4_SCALE_BIAS_CHUNKS
        return super().split_unit(role, entry, spec, axis, parallel)

    # ------------------------------------------------------------------ side files
    def model_quant_type(self) -> str:
        types = set(self._description.values())
        quantized = types - {FLOAT}
        if quantized == {"W4A16"}:
            return "W4A16"  # the v0 saver names the configured type
        ranked = [t for t in QUANT_TYPE_PRIORITY if t in types]
        return ranked[-1] if ranked else FLOAT

    def group_size(self) -> int:
        sizes = [g for g in self._group_sizes if g]
        return sizes[-1] if sizes else 0

    def description(self) -> dict:
        return {
            **self._description,
            "version": VERSION,
            "model_quant_type": self.model_quant_type(),
            "metadata": {},
            "group_size": self.group_size(),
            "optional": {},
        }

    def update_config(self, config: dict, manifest: dict) -> dict:
        config = dict(config)
        config.pop("quantization_config", None)
        if isinstance(config.get("text_config"), dict) and "quantization_config" in config["text_config"]:
            config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
        return config

    def extra_files(self, manifest: dict) -> dict[str, object]:
        # a str is written verbatim: msModelSlim's json.dump(indent=4) in planning order, not sorted
        return {DESCRIPTION: json.dumps(self.description(), indent=4)}

