"""msModelSlim (Huawei Ascend) checkpoints → canonical layers.

Identification: the directory holds ``quant_model_description.json`` (or an older
``quant_model_description_<type>.json``), a flat map *tensor name → type string* for every tensor
of the ``quant_model_weight*.safetensors`` files, plus top-level keys (``model_quant_type``,
``version``, ``group_size``, ``metadata``, ``optional``, kv/attention keys).

A layer ``<p>`` is quantized when ``description["<p>.weight"]`` is not ``"FLOAT"``; its type is
that string (as vllm-ascend and sglang do). ``model_quant_type`` is never used to decide anything:
msModelSlim leaves W4A8_DYNAMIC out of its priority list, so an all-W4A8 model says ``"FLOAT"``.
``<p>.bias`` (written as ``FLOAT``) belongs to the layer whenever ``<p>`` is quantized
(``QuantizedLinear.bias``, kept in its stored dtype).

Sign convention (msModelSlim's own reader ``FakeLinearQuantizerOfW8A16OrW4A16`` and
``calculate_int_qparam``): integer weights are *signed* (int8 −128..127, int4 −8..7), and the
float ``weight_offset`` is a zero point in that signed domain with ``w = (q - offset) * scale``.
Canonical codes are unsigned, so ``code = q + 2**(b-1)`` and ``zero = offset + 2**(b-1)``
(int16); ``zero = None`` when every offset is 0. A non-integer offset is an :class:`InputError`.
``(code - zero) = (q - offset)`` exactly, so the canonical rule reproduces msModelSlim's reader
bit for bit. Scales keep their stored dtype (float32 from the v1 saver, the model dtype for some
v0 tensors); per-group scales ``[N, G]`` group along K: ``scale[n, k // (K/G)]``; ``G == 1`` is
per-channel (``group_size = -1``).

int4 storage (``packing.unpack_nibbles``: even element in the low nibble, two's complement):

- *pairs along N*: int8 ``[N/2, K]``, byte ``(i, k)`` = row ``2i`` (low) and ``2i+1`` (high)
  (``w4a8_pack_int4`` / ``_w4a8_pack_int4``, and ``_w4a16_pack_int4`` per-group). Recognised by
  ``weight.shape[0] * 2 == weight_scale.shape[0]``.
- *pairs along K*: int8 ``[N, K/2]``, low nibble = even k (``_w4a16_pack_int4`` per-channel):
  W4A16 with a ``[N, 1]`` scale and description ``version == "1.0.0"``.
- *unpacked*: one int4 value per int8 byte ``[N, K]`` (older checkpoints, W4A4_DYNAMIC); values
  outside −8..7 are an :class:`InputError` — unless the offsets mark the *unsigned* domain below.

Unsigned int4 codes (W4A4_DYNAMIC written through AutoRound, ``symmetric: False``): msModelSlim's
AutoRound (``processor/quant/autoround_utils/utils.py`` ``quant_tensor_asym``) stores
``q = clamp(round(w / s) + 8, 0, 15)`` in the int8 bytes with a float ``weight_offset`` of 8 and a
scale whose sign it flips so the larger side of the range gets the code 15; its reader computes the
same ``(q - offset) * scale``. A signed zero point can never exceed 7 (``calculate_int_qparam``:
``round(-min / scale) - 8`` with ``-min / scale`` in 0..15), so an unpacked int4 layer with any
offset above 7 is read in the unsigned domain: ``code = q`` (checked to lie in 0..15),
``zero = offset`` (``None`` when every offset is 8, the midpoint: such a layer is symmetric in
canonical form). Its negative scales are expected and converted without a warning.

Types and how each maps onto the canonical rule (tensors ``<p>.<suffix>``):

=====================  ===========================================================================
``W8A16``              ``weight`` int8 ``[N,K]``, ``weight_scale``/``weight_offset`` ``[N,1]`` or
                       ``[N,G]`` → bits 8, code ``q+128``, zero ``offset+128``; no activation quant.
``W8A8_DYNAMIC``       as W8A16; activation int8 dynamic per-token, symmetric.
``W4A4_DYNAMIC``       weight int4 (unpacked ``[N,K]``, or pairs along N) → bits 4, code ``q+8``,
                       zero ``offset+8``; activation int4 dynamic per-token.
``W4A16``              v0 saver: per-group pairs along N, per-channel pairs along K (version
                       "1.0.0"), older unpacked; zero ``offset+8``; no activation quant.
``W4A8_DYNAMIC``       ``weight`` int4 pairs along N ``[N/2,K]`` (version "1.0.0") or unpacked
                       ``[N,K]``; ``weight_scale`` ``[N,1]``; ``weight_offset`` (zeros);
                       ``scale_bias`` (kernel helper ``8·Σ dequant``: consumed, not canonical — a
                       writer recomputes it). Legacy two-stage per-group adds
                       ``weight_scale_second`` ``[N,K/g]`` (integer-valued int8→int4 stage scale)
                       and ``weight_offset_second``: canonical group scale =
                       ``weight_scale * weight_scale_second`` in float32 (vllm-ascend's
                       antiquant scale), zero from ``weight_offset_second``; both factors are
                       kept as ``scale_stages`` so dequantization follows msModelSlim's saver,
                       ``(q * weight_scale_second) * weight_scale`` (one rounding, since
                       ``q * s2`` is an exact integer; ``q * fl(s * s2)`` would round twice).
                       A non-zero first-stage offset is unsupported. Activation int8 dynamic.
``W8A8``               static. v1: ``weight`` int8, ``input_scale``/``input_offset`` ``[1]``,
                       ``deq_scale`` ``[N]`` = input_scale·weight_scale (float32 for bf16 models,
                       else int64 whose low 32 bits are the float32 bit pattern),
                       ``quant_bias`` int32 (consumed, not canonical: it folds ``bias`` and the
                       input offset). No ``weight_scale`` on disk: canonical scale =
                       ``deq_scale_f32 / input_scale`` in float32 ``[N,1]`` (exactly msModelSlim's
                       reader ``q * (deq_scale / input_scale)``). v0 also stores
                       ``weight_scale``/``weight_offset``: those are used instead.
                       Activation int8 static per-tensor, ``input_scale``, ``input_zero =
                       input_offset`` (signed domain), symmetric iff ``input_offset == 0``.
``W8A8_MIX``           PD-mix: the W8A8 tensors + ``weight_scale``/``weight_offset``; read as W8A8
                       (static activation) using ``weight_scale``.
``WFP8AFP8_DYNAMIC``   ``weight`` float8_e4m3fn ``[N,K]``, ``weight_scale`` float ``[N,1]``,
                       ``weight_offset`` zeros → FP8 codes × per-channel scale; activation fp8
                       dynamic per-token.
``W8A8_MXFP8``         ``weight`` float8_e4m3fn ``[N,K]``, ``weight_scale`` uint8 E8M0
                       ``[N, ceil(K/32)]`` → group 32, ``SCALE_E8M0``; activation MX fp8 (group 32).
``W4A8_MXFP``          ``weight`` uint8 ``[N, K/2]`` E2M1 nibbles (low = even k) → one E2M1 code per
                       uint8 ``[N,K]``; E8M0 scale as above; activation MX fp8.
``W4A4_MXFP4``         as W4A8_MXFP; activation MX fp4.
``W4A16_MXFP4``        as W4A8_MXFP (same storage, read by vllm-ascend); no activation quant.
=====================  ===========================================================================

Refused with :class:`UnsupportedError` naming the tensor and type: ``*_FLATQUANT*``, ``*_SVD*``,
``W16A16S``, ``W8A8S``/``W8A8SC`` (sparse), ``*_DUALSCALE``, ``W8A8_TIMESTEP``, ``NF4`` and any
unknown string; also a tensor of a quantized layer that its type does not explain (e.g.
``<p>.weight_dual_scale``). A description entry whose tensor does not exist, or a tensor without
a description entry, is an :class:`InputError` — except the QuaRot rotation matrices
(``*.heads_rotation``, ``*.kronecker_rotation_m/n``) that the v1 saver writes undescribed; they
pass through. Non-linear typed tensors (``C8`` kv-cache scales, ``FAQuant``) pass through with a
warning. Legacy anti-outlier norm copies ``<norm>.module.weight`` (1-D, typed with the model type)
pass through.

MoE: msModelSlim stores each expert as its own linear (``experts.0.gate_proj``); they are read as
separate layers.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from functools import cached_property

from npuconv.lazy_torch import torch

from npuconv import layouts, model
from npuconv.io.checkpoint import Checkpoint
from npuconv.io.safetensors_io import integer_range, is_float, iter_values
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import (
    FP8_E4M3,
    INT,
    SCALE_E8M0,
    ActivationQuant,
    LinearSpec,
    QuantizedLinear,
)
from npuconv.modelslim_schema import (
    DESCRIPTION,
    DESCRIPTION_GLOB,
    FLOAT,
    FP8_TYPES,
    INT_TYPES,
    META_KEYS,
    MX_GROUP,
    MX_TYPES,
    NON_LINEAR_TYPES,
    PAIRS_K,
    PAIRS_N,
    STATIC_TYPES,
    SUFFIXES_FP8,
    SUFFIXES_INT,
    SUFFIXES_MX,
    SUFFIXES_STATIC,
    SUFFIXES_W4A8,
    SUPPORTED_TYPES,
    UNDESCRIBED_SUFFIXES,
    UNPACKED,
)
from npuconv.packing import unpack_nibbles
from npuconv.readers.base import Reader



@dataclass
class _Plan:
    """How to load one layer (found by :meth:`ModelSlimReader.scan`)."""

    qtype: str
    family: str  # "int", "static", "fp8", "mx"
    layout: str = UNPACKED
    tensors: dict[str, str] = field(default_factory=dict)  # suffix → tensor name (present ones)
    groups: int = 1  # G of the canonical scale
    unsigned: bool = False  # int4 codes stored unsigned 0..15 (AutoRound), see the module docstring


def description_files(checkpoint: Checkpoint) -> list[str]:
    """The description file to use: ``quant_model_description.json``, else the legacy names."""
    if (checkpoint.root / DESCRIPTION).is_file():
        return [DESCRIPTION]
    return sorted(p.name for p in checkpoint.root.glob(DESCRIPTION_GLOB) if p.is_file())


class ModelSlimReader(Reader):
    format = "modelslim"
    stack_experts = True  # MoE experts → one [E, N, K] layer (npuconv.experts)

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        return bool(description_files(checkpoint))

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self._plans: dict[str, _Plan] = {}

    # ---------------------------------------------------------------- description
    @cached_property
    def description_file(self) -> str:
        files = description_files(self.ckpt)
        if not files:
            raise InputError(f"{self.ckpt.root}: no {DESCRIPTION} found")
        if len(files) > 1:
            raise InputError(f"{', '.join(files)}: several msModelSlim description files; keep exactly one")
        return files[0]

    @cached_property
    def description(self) -> dict:
        return self.ckpt.read_json(self.description_file) or {}

    @cached_property
    def entries(self) -> dict[str, str]:
        """Tensor entries of the description: tensor name → type string."""
        out = {}
        for key, value in self.description.items():
            if key in META_KEYS or not isinstance(value, str) or key.endswith("quant_type"):
                continue
            if "." in key or self.ckpt.has(key):
                out[key] = value
        return out

    @property
    def version(self) -> str:
        value = self.description.get("version")
        return "" if value is None else str(value)

    def summary(self) -> dict:
        types = {t for k, t in self.entries.items() if k.endswith(".weight") and t != FLOAT}
        return {
            "model_quant_type": self.description.get("model_quant_type"),
            "version": self.description.get("version"),
            "group_size": self.description.get("group_size"),
            "types": sorted(types),
        }

    def consumed_files(self) -> list[str]:
        return description_files(self.ckpt)

    # ---------------------------------------------------------------- scan
    def scan(self) -> list[LinearSpec]:
        entries = self.entries
        where = self.description_file
        for name in entries:
            if not self.ckpt.has(name):
                raise InputError(
                    f"{where}: describes tensor '{name}' ({entries[name]}), which is not in the checkpoint"
                )
        for name in self.ckpt.names():
            if name not in entries and not name.endswith(UNDESCRIBED_SUFFIXES):
                raise InputError(f"tensor '{name}' has no entry in {where}")

        specs: list[LinearSpec] = []
        self._plans = {}
        for name, qtype in entries.items():  # description order = the model's module order
            if not name.endswith(".weight") or qtype == FLOAT:
                continue
            prefix = name[: -len(".weight")]
            if prefix.endswith(".module") and len(self.ckpt.info(name).shape) == 1:
                continue  # legacy anti-outlier norm copy (<norm>.module.weight), not a linear
            if qtype not in SUPPORTED_TYPES:
                raise UnsupportedError(f"tensor '{name}': msModelSlim type {qtype!r} is not supported")
            spec = self._scan_layer(prefix, qtype)
            specs.append(spec)

        used = {t for spec in specs for t in spec.source_tensors}
        layers = {spec.name: spec for spec in specs}
        for name, qtype in entries.items():
            if name in used or qtype == FLOAT:
                continue
            parent = name.rsplit(".", 1)[0]
            if parent in layers:
                raise UnsupportedError(
                    f"tensor '{name}' ({qtype}) of layer '{parent}' is not understood by the msModelSlim reader"
                )
            if qtype in NON_LINEAR_TYPES:
                self.warn(f"{qtype} tensors (e.g. '{name}') are kept unchanged; they are not linear weights")
        for spec in specs:
            for tensor in spec.source_tensors:
                t = entries.get(tensor)
                if tensor != f"{spec.name}.bias" and t != spec.source_scheme:
                    self.warn(f"tensor '{tensor}' is described as {t!r} but its layer is {spec.source_scheme}")
        return specs

    def _present(self, prefix: str, suffixes: tuple[str, ...]) -> dict[str, str]:
        tensors = {"weight": f"{prefix}.weight"}
        for suffix in suffixes:
            if self.ckpt.has(f"{prefix}.{suffix}"):
                tensors[suffix] = f"{prefix}.{suffix}"
        if self.ckpt.has(f"{prefix}.bias"):
            tensors["bias"] = f"{prefix}.bias"
        return tensors

    def _need(self, plan: _Plan, prefix: str, suffix: str) -> str:
        name = plan.tensors.get(suffix)
        if name is None:
            raise InputError(f"tensor '{prefix}.{suffix}' is missing ({plan.qtype} layer '{prefix}')")
        return name

    def _scan_layer(self, prefix: str, qtype: str) -> LinearSpec:
        if qtype in INT_TYPES:
            return self._scan_int(prefix, qtype)
        if qtype in STATIC_TYPES:
            return self._scan_static(prefix, qtype)
        if qtype in FP8_TYPES:
            return self._scan_fp8(prefix, qtype)
        return self._scan_mx(prefix, qtype)

    def _finish(self, prefix: str, plan: _Plan, **fields) -> LinearSpec:
        self._plans[prefix] = plan
        has_bias = "bias" in plan.tensors
        if has_bias:
            bias = self.ckpt.info(plan.tensors["bias"])
            if bias.shape != (fields["out_features"],):
                expected = fields["out_features"]
                raise InputError(f"tensor '{bias.name}': shape {list(bias.shape)}, expected [{expected}]")
        return LinearSpec(
            name=prefix,
            has_bias=has_bias,
            source_scheme=plan.qtype,
            source_tensors=tuple(plan.tensors.values()),
            **fields,
        )

    def _scan_int(self, prefix: str, qtype: str) -> LinearSpec:
        bits, activation = INT_TYPES[qtype]
        suffixes = SUFFIXES_W4A8 if qtype == "W4A8_DYNAMIC" else SUFFIXES_INT
        plan = _Plan(qtype, "int", tensors=self._present(prefix, suffixes))
        weight = self._weight_info(plan.tensors["weight"], ("int8",))
        scale_name = self._need(plan, prefix, "weight_scale")
        n, groups = self._scale_shape(scale_name)
        rows, cols = weight.shape
        if bits == 8:
            self._expect(rows == n, weight.name, f"has {rows} rows but '{scale_name}' has {n}")
            k = cols
        elif rows * 2 == n:
            plan.layout, k = PAIRS_N, cols
        elif rows == n:
            if qtype == "W4A16" and groups == 1 and self.version == "1.0.0":
                plan.layout, k = PAIRS_K, cols * 2
            else:
                plan.layout, k = UNPACKED, cols
        else:
            raise InputError(
                f"tensor '{weight.name}': shape {list(weight.shape)} fits neither [N, K] nor [N/2, K] "
                f"for N={n} from '{scale_name}'"
            )
        scale_dtype = self.ckpt.info(scale_name).dtype_name
        second = plan.tensors.get("weight_scale_second")
        if second is not None:  # legacy two-stage W4A8_DYNAMIC
            self._expect(groups == 1, scale_name, f"must be per-channel [N, 1] with '{second}', got {groups} groups")
            n2, groups = self._scale_shape(second)
            self._expect(n2 == n, second, f"has {n2} rows, expected {n}")
            offset = self._offsets(plan.tensors.get("weight_offset"), n, 1)
            if offset not in (None, (0, 0)):
                raise UnsupportedError(
                    f"tensor '{plan.tensors['weight_offset']}': a non-zero first-stage offset of two-stage "
                    "W4A8_DYNAMIC is not supported"
                )
            zero = self._offsets(plan.tensors.get("weight_offset_second"), n, groups)
            scale_dtype = "float32"
        else:
            zero = self._offsets(plan.tensors.get("weight_offset"), n, groups)
            if bits == 4 and plan.layout == UNPACKED and zero is not None and zero[1] > 7:
                plan.unsigned = True  # AutoRound: codes 0..15, offsets in the same unsigned domain
                zero = (zero[0] - 8, zero[1] - 8)
        plan.groups = groups
        symmetric = zero in (None, (0, 0))
        return self._finish(
            prefix,
            plan,
            out_features=n,
            in_features=k,
            bits=bits,
            group_size=self._group_size(k, groups, second or scale_name),
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            activation=activation,
        )

    def _scan_static(self, prefix: str, qtype: str) -> LinearSpec:
        plan = _Plan(qtype, "static", tensors=self._present(prefix, SUFFIXES_STATIC))
        weight = self._weight_info(plan.tensors["weight"], ("int8",))
        n, k = weight.shape
        input_offset = self._input_offset(plan, prefix)
        if "weight_scale" in plan.tensors:  # v0 W8A8 / W8A8_MIX carry the real weight scale
            scale_name = plan.tensors["weight_scale"]
            n_scale, groups = self._scale_shape(scale_name)
            self._expect(n_scale == n, scale_name, f"has {n_scale} rows, expected {n}")
            zero = self._offsets(plan.tensors.get("weight_offset"), n, groups)
            scale_dtype = self.ckpt.info(scale_name).dtype_name
        else:
            deq = self.ckpt.info(self._need(plan, prefix, "deq_scale"))
            self._expect(
                deq.numel == n and len(deq.shape) in (1, 2),
                deq.name,
                f"shape {list(deq.shape)}, expected [{n}]",
            )
            if deq.dtype_name != "int64" and not is_float(deq.dtype_name):
                self._expect(False, deq.name, f"dtype {deq.dtype} is not int64 or float")
            groups, zero, scale_dtype = 1, None, "float32"
            if "weight_offset" in plan.tensors:
                zero = self._offsets(plan.tensors["weight_offset"], n, 1)
        if "quant_bias" in plan.tensors:
            qb = self.ckpt.info(plan.tensors["quant_bias"])
            self._expect(qb.numel == n, qb.name, f"shape {list(qb.shape)}, expected [{n}]")
        plan.groups = groups
        activation = ActivationQuant(INT, 8, dynamic=False, strategy="tensor", symmetric=input_offset == 0)
        return self._finish(
            prefix,
            plan,
            out_features=n,
            in_features=k,
            bits=8,
            group_size=self._group_size(k, groups, plan.tensors.get("weight_scale", weight.name)),
            symmetric=zero in (None, (0, 0)),
            scale_dtype=scale_dtype,
            activation=activation,
        )

    def _scan_fp8(self, prefix: str, qtype: str) -> LinearSpec:
        plan = _Plan(qtype, "fp8", tensors=self._present(prefix, SUFFIXES_FP8))
        weight = self._weight_info(plan.tensors["weight"], ("float8_e4m3fn",))
        n, k = weight.shape
        scale_name = self._need(plan, prefix, "weight_scale")
        n_scale, groups = self._scale_shape(scale_name)
        self._expect(n_scale == n, scale_name, f"has {n_scale} rows, expected {n}")
        offset = self._offsets(plan.tensors.get("weight_offset"), n, groups)
        if offset not in (None, (0, 0)):
            raise UnsupportedError(
                f"tensor '{plan.tensors['weight_offset']}': non-zero offsets of FP8 weights are not supported"
            )
        plan.groups = groups
        return self._finish(
            prefix,
            plan,
            out_features=n,
            in_features=k,
            bits=8,
            group_size=self._group_size(k, groups, scale_name),
            symmetric=True,
            weight_format=FP8_E4M3,
            scale_dtype=self.ckpt.info(scale_name).dtype_name,
            activation=FP8_TYPES[qtype],
        )

    def _scan_mx(self, prefix: str, qtype: str) -> LinearSpec:
        weight_format, bits, activation = MX_TYPES[qtype]
        plan = _Plan(qtype, "mx", tensors=self._present(prefix, SUFFIXES_MX))
        if weight_format == FP8_E4M3:
            weight = self._weight_info(plan.tensors["weight"], ("float8_e4m3fn",))
            n, k = weight.shape
        else:
            weight = self._weight_info(plan.tensors["weight"], ("uint8", "int8"))
            n, k = weight.shape[0], weight.shape[1] * 2
        scale = self.ckpt.info(self._need(plan, prefix, "weight_scale"))
        groups = -(-k // MX_GROUP)
        if scale.dtype_name != "uint8":
            self._expect(False, scale.name, f"dtype {scale.dtype}, expected uint8 E8M0 exponents")
        self._expect(scale.shape == (n, groups), scale.name, f"shape {list(scale.shape)}, expected [{n}, {groups}]")
        plan.groups = groups
        return self._finish(
            prefix,
            plan,
            out_features=n,
            in_features=k,
            bits=bits,
            group_size=MX_GROUP,
            symmetric=True,
            weight_format=weight_format,
            scale_format=SCALE_E8M0,
            scale_dtype="uint8",
            activation=activation,
        )

    # ---------------------------------------------------------------- scan helpers
    @staticmethod
    def _expect(ok: bool, name: str, problem: str) -> None:
        if not ok:
            raise InputError(f"tensor '{name}': {problem}")

    def _weight_info(self, name: str, dtypes: tuple[str, ...]):
        """The TensorInfo of a 2-D weight of one of ``dtypes`` (names)."""
        info = self.ckpt.info(name)
        if info.dtype_name not in dtypes:
            self._expect(False, name, f"dtype {info.dtype} is not {' or '.join('torch.' + d for d in dtypes)}")
        self._expect(len(info.shape) == 2, name, f"shape {list(info.shape)} is not 2-D")
        return info

    def _scale_shape(self, name: str) -> tuple[int, int]:
        """(rows, groups) of a float scale stored as ``[N]`` or ``[N, G]``."""
        info = self.ckpt.info(name)
        if not is_float(info.dtype_name):
            self._expect(False, name, f"dtype {info.dtype} is not a float type")
        ok = len(info.shape) in (1, 2) and info.numel > 0
        self._expect(ok, name, f"shape {list(info.shape)} is not [N] or [N, G]")
        return info.shape[0], 1 if len(info.shape) == 1 else info.shape[1]

    def _group_size(self, k: int, groups: int, name: str) -> int:
        if groups == 1:
            return -1
        self._expect(groups > 0 and k % groups == 0, name, f"{groups} groups do not divide in_features {k}")
        return k // groups

    def _offsets(self, name: str | None, n: int, groups: int) -> tuple[int, int] | None:
        """(min, max) of the integer zero points (signed domain) of ``[n, groups]`` offsets, or None
        when absent. Checked at scan, per-channel offsets without torch (``inspect``; see
        :func:`~npuconv.io.safetensors_io.integer_range`): a float offset must be an integer of
        magnitude at most 2**14, else :class:`InputError` naming the first bad value. Loading
        (:meth:`_zero`) relies on this check."""
        if name is None:
            return None
        info = self.ckpt.info(name)
        self._expect(info.numel == n * groups, name, f"shape {list(info.shape)}, expected [{n}, {groups}]")
        span = integer_range(info)
        if is_float(info.dtype_name) and (span is None or any(map(_not_a_zero_point, span))):
            value = next(filter(_not_a_zero_point, iter_values(info)))
            raise InputError(f"tensor '{name}': offset {value} is not an integer zero point")
        return span

    def _input_offset(self, plan: _Plan, prefix: str) -> float:
        """The per-tensor input offset, after checking that the input scale is a positive float32
        (the dtype :meth:`_load_static` reads it in) and the offset an integer. Without torch."""
        scale, offset = (self.ckpt.info(self._need(plan, prefix, part)) for part in ("input_scale", "input_offset"))
        for info in (scale, offset):
            self._expect(info.numel == 1, info.name, f"shape {list(info.shape)}, expected [1] (per-tensor)")
        value = array("f", iter_values(scale))[0]
        self._expect(value > 0 and value != math.inf, scale.name, f"input scale {value} is not a positive number")
        zero = float(next(iter_values(offset)))
        self._expect(math.isfinite(zero) and zero == round(zero), offset.name, f"input offset {zero} is not an integer")
        return zero

    # ---------------------------------------------------------------- load
    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        if not self._plans:
            self.linear_specs()
        plan = self._plans.get(spec.name)
        if plan is None:
            raise InputError(f"'{spec.name}' is not a quantized linear of this checkpoint")
        layer = getattr(self, f"_load_{plan.family}")(spec, plan)
        if "bias" in plan.tensors:
            layer.bias = self.tensor(plan.tensors["bias"])
        return layer

    def _zero(self, name: str | None, spec: LinearSpec, groups: int, unsigned: bool = False) -> torch.Tensor | None:
        """Canonical zero points from the stored offsets (signed domain, or ``unsigned`` codes as stored),
        int16 ``[N, groups]``, or None when they are all the midpoint. The offsets were checked to be
        integers of the right count when the layer was scanned (:meth:`_offsets`)."""
        if name is None:
            return None
        offsets = self.tensor(name).reshape(spec.out_features, groups).to(torch.int64)
        midpoint = 2 ** (spec.bits - 1)
        zero = offsets if unsigned else offsets + midpoint
        return None if not bool((zero != midpoint).any()) else zero.to(torch.int16)

    def _int_weight(self, name: str, layout: str, bits: int, unsigned: bool = False) -> dict[str, torch.Tensor | None]:
        """The weight fields of a :class:`QuantizedLinear`: two's complement int8 bytes are handed
        over as they are stored (``signed``: the fast path of ``npuconv.model``), everything else
        as canonical codes (``qweight``)."""
        if bits == 8 and layout == UNPACKED and not unsigned and model.PACKED_CODES:
            raw = self.tensor(name)
            if raw.dtype == torch.int8:
                return {"qweight": None, "signed": raw}
        return {"qweight": self._int_codes(name, layout, bits, unsigned)}

    def _int_codes(self, name: str, layout: str, bits: int, unsigned: bool = False) -> torch.Tensor:
        raw = self.tensor(name)
        if unsigned:  # AutoRound int4: the stored bytes are the canonical codes 0..15
            bad = (raw < 0) | (raw > 15)
            if bool(bad.any()):
                raise InputError(
                    f"tensor '{name}': value {int(raw[bad][0])} is outside the unsigned int4 range 0..15 "
                    "(its offsets above 7 mark unsigned codes)"
                )
            return raw.to(torch.uint8)
        if layout == PAIRS_N:  # byte (i, k) = rows 2i (low) and 2i+1 (high): unpack along dim 0
            return (unpack_nibbles(raw.T).T ^ 8).contiguous()
        if layout == PAIRS_K:
            return unpack_nibbles(raw) ^ 8
        if bits == 8:
            return raw.view(torch.uint8) ^ 0x80  # q + 128 for two's complement bytes
        bad = (raw < -8) | (raw > 7)
        if bool(bad.any()):
            raise InputError(f"tensor '{name}': value {int(raw[bad][0])} is outside the int4 range -8..7")
        return (raw.to(torch.int16) + 8).to(torch.uint8)

    def _load_int(self, spec: LinearSpec, plan: _Plan) -> QuantizedLinear:
        t = plan.tensors
        weight = self._int_weight(t["weight"], plan.layout, spec.bits, plan.unsigned)
        scale = self._scale(t["weight_scale"], negative_ok=plan.unsigned)
        if "weight_scale_second" in t:
            # two-stage: msModelSlim's saver dequantizes (q * weight_scale_second) * weight_scale in
            # float32; the canonical scale is the product, the stages keep that order for dequantize()
            channel = scale.float().reshape(spec.out_features, 1)
            group = self._scale(t["weight_scale_second"]).float().reshape(spec.out_features, plan.groups)
            zero = self._zero(t.get("weight_offset_second"), spec, plan.groups)
            return QuantizedLinear(spec, scale=channel * group, zero=zero, scale_stages=(group, channel), **weight)
        scale = scale.reshape(spec.out_features, plan.groups)
        zero = self._zero(t.get("weight_offset"), spec, plan.groups, plan.unsigned)
        return QuantizedLinear(spec, scale=scale, zero=zero, **weight)

    def _load_static(self, spec: LinearSpec, plan: _Plan) -> QuantizedLinear:
        t = plan.tensors
        weight = self._int_weight(t["weight"], UNPACKED, 8)
        input_scale = self.tensor(t["input_scale"]).float().reshape(1)
        input_zero = self.tensor(t["input_offset"]).float().reshape(1)
        if "weight_scale" in t:
            scale = self._scale(t["weight_scale"]).reshape(spec.out_features, plan.groups)
        else:
            deq = decode_deq_scale(self.tensor(t["deq_scale"])).reshape(spec.out_features, 1)
            self.check_scale(t["deq_scale"], deq)
            scale = deq / input_scale
        zero = self._zero(t.get("weight_offset"), spec, plan.groups)
        return QuantizedLinear(spec, scale=scale, zero=zero, input_scale=input_scale, input_zero=input_zero, **weight)

    def _load_fp8(self, spec: LinearSpec, plan: _Plan) -> QuantizedLinear:
        t = plan.tensors
        scale = self._scale(t["weight_scale"]).reshape(spec.out_features, plan.groups)
        return QuantizedLinear(spec, self.tensor(t["weight"]), scale)

    def _load_mx(self, spec: LinearSpec, plan: _Plan) -> QuantizedLinear:
        t = plan.tensors
        raw = self.tensor(t["weight"])
        codes = raw if spec.weight_format == FP8_E4M3 else unpack_nibbles(raw)
        return QuantizedLinear(spec, codes, self._scale(t["weight_scale"], e8m0=True))

    def _scale(self, name: str, e8m0: bool = False, negative_ok: bool = False) -> torch.Tensor:
        """Read a scale tensor and apply the readers' scale policy (:meth:`Reader.check_scale`)."""
        scale = self.tensor(name)
        self.check_scale(name, scale, e8m0=e8m0, negative_ok=negative_ok)
        return scale


def _not_a_zero_point(offset: float) -> bool:
    """An offset that is no integer zero point (not finite, fractional, or beyond ±2**14)."""
    return not math.isfinite(offset) or offset != round(offset) or abs(offset) > 2**14


def decode_deq_scale(deq: torch.Tensor) -> torch.Tensor:
    """msModelSlim ``deq_scale`` → float32.

    int64 (fp16 models, ``deqscale2int64``): the low 32 bits are the float32 bit pattern (bits
    32..63 are ignored, as msModelSlim's ``int64tofp32`` does); float (bf16 models): as is.
    """
    if deq.dtype == torch.int64:
        return layouts.int64_bits_to_float(deq)
    return deq.float()


