"""compressed-tensors checkpoints (``quantization_config.quant_method == "compressed-tensors"``).

Written by llm-compressor / compressed-tensors (CT). Facts: ``docs/research/checkpoint_formats.md``
§3, read from CT 0.9–0.20 and confirmed on checkpoints written by CT 0.17.1 and 0.20.0.

Module → scheme
    A module ``p`` is a candidate linear when it has ``p.weight_packed`` or ``p.weight``. Its
    scheme comes from ``config_groups[*]``: a target is an exact module name, ``"re:<regex>"``
    (``re.match`` on the name, i.e. anchored at the start) or a class name. Only the class
    ``"Linear"`` can be resolved without the model code: it matches every candidate that carries
    quantized tensors (``weight_packed``, ``weight_scale``, or an int8/fp8 ``weight``); other class
    names match nothing. Precedence as in CT's ``match_targets``: exact > regex > class, ties by
    the target string's sort order; a target listed by two groups belongs to the later group.
    ``ignore`` uses the same matching and removes the module. The format is the group's
    ``format``, else the top-level ``format``; where neither names a storage format (absent or
    ``"mixed-precision"``) it is inferred from the scheme as CT's ``infer_quantization_format``
    does (warned). A module with quantized tensors that no group claims (or that is ignored) is
    an :class:`InputError`; a matched module whose group format is ``dense`` stays float.

Refused (:class:`UnsupportedError`): non-empty ``sparsity_config`` (other than format
``dense``) or ``transform_config``, ``output_activations``, formats other than those below
(``mxfp6-pack-quantized``, ``marlin-24``, ``sparse-*``, ...), stacked-expert (3-D) weights,
asymmetric float weights. ``quantization_status: "frozen"`` means fake-quantized float weights:
no quantized linears, every tensor passes through (warned).

Per format, on disk → canonical (see :mod:`npuconv.model`). ``N`` out, ``K`` in features, ``b``
bits, ``g`` group size, ``G`` groups. ``source_scheme`` is the CT format name.

``pack-quantized`` (int weights, 1..8 bits)
    ``weight_packed`` int32 ``[N, W]``, packed along K. Writer ``version`` ≥ 0.18: one dense
    LSB-first bitstream per row (code ``i`` at bits ``[i*b, i*b+b)`` of the row, straddling
    words), ``W = ceil(K*b/32)``. Writer < 0.18 (or no ``version``): ``32 // b`` codes per word,
    high bits unused, ``W = ceil(K / (32//b))`` (differs only for ``b`` ∉ {1, 2, 4, 8}).
    ``weight_shape`` int64 ``[2]`` = ``[N, K]``. CT stores the signed code ``q`` as the field
    ``q + 2**(b-1)``, which *is* the canonical unsigned code. Asymmetric group/channel zero
    points ``weight_zero_point`` int32 are packed the same way along N (dim 0):
    ``[ceil(N*b/32), G]`` (or the legacy width); the field is ``zp + 2**(b-1)``, again the
    canonical ``zero`` (int16). Unpacked int8 zero points (older writers, tensor strategy) are
    signed: ``zero = zp + 2**(b-1)``. ``weight_g_idx`` int32 ``[K]`` → ``g_idx``, ``act_order``
    (all ``-1`` = never initialised = column order, as in CT).
``int-quantized`` / ``naive-quantized`` (int)
    ``weight`` int8 ``[N, K]`` holding signed ``q`` in ``[-2**(b-1), 2**(b-1))``:
    ``code = q + 2**(b-1)`` (``q + 128`` for 8 bits); int8 ``weight_zero_point`` likewise.
``float-quantized`` / ``naive-quantized`` (float)
    ``weight`` float8_e4m3fn, kept as is; no zero point.
``nvfp4-pack-quantized``
    ``weight_packed`` uint8 ``[N, K/2]``, low nibble = even k: one E2M1 code per uint8;
    ``weight_scale`` float8_e4m3fn ``[N, K/16]`` (kept, ``scale_format`` float);
    ``weight_global_scale`` fp32 ``[1]`` → ``global_scale`` (a divisor, as in CT).
``mxfp4-pack-quantized`` / ``mxfp8-quantized``
    Same nibbles (mxfp4) or an fp8 ``weight`` (mxfp8); ``weight_scale`` uint8 E8M0 ``[N, K/32]``
    → ``scale_format = e8m0``, group 32.

Scale strategies → canonical ``scale [N, G]`` (dtype as stored) and ``group_size``:
``tensor`` ``[1]`` → expanded to ``[N, 1]``, ``-1``; ``channel`` ``[N, 1]``, ``-1``; ``group`` /
``tensor_group`` ``[N, K/g]``, ``g`` (``K % g`` must be 0; ``K < g`` is one group, ``-1``);
``block`` ``[ceil(N/bh), ceil(K/bw)]`` → rows repeated ``bh`` times and cut to ``N``:
``[N, ceil(K/bw)]``, ``group_size = bw`` (a last partial column block is a partial last group).
Zero points follow the scale layout.

Input activations → :class:`~npuconv.model.ActivationQuant`: int → ``INT``, float 8-bit →
``FP8_E4M3``, float 4-bit → ``FP4_E2M1``; ``dynamic`` true or ``"local"`` → dynamic; strategy
``token``/``tensor`` as is, ``group``/``tensor_group`` → ``group``. Static (tensor) activations
need ``input_scale`` (→ fp32 ``[1]``) and, when asymmetric, ``input_zero_point`` (→ fp32 ``[1]``,
the value as stored: CT's *signed* activation zero point). NVFP4 ``input_global_scale`` has no
canonical field: it passes through (warned). A module's ``bias`` is consumed into ``bias``.

Errors name the tensor or config field on one line: missing scale, missing zero point for an
asymmetric scheme, unsupported bits, a group size not dividing K, packed/scale/zero-point shapes
inconsistent with bits and ``weight_shape``, ``g_idx`` of the wrong length or out of range, codes
outside ``b`` bits. Scales follow :meth:`Reader.check_scale` when a layer is loaded: NaN or
infinite values (E8M0 byte 255) are an :class:`InputError`, zero or negative ones a warning;
``weight_global_scale`` and ``input_scale`` (divisors) must be positive.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from npuconv.lazy_torch import torch

from npuconv.io.checkpoint import Checkpoint
from npuconv.io.safetensors_io import is_float, read_ints
from npuconv.errors import InputError, UnsupportedError
from npuconv import model
from npuconv.model import (
    FP4_E2M1,
    FP8_E4M3,
    INT,
    SCALE_E8M0,
    SCALE_FLOAT,
    ActivationQuant,
    LinearSpec,
    QuantizedLinear,
)
from npuconv.packing import NIBBLE_HIGH_BITS, int4_words_nk_to_kn, unpack_columns, unpack_nibbles, unpack_rows
from npuconv.readers.base import Reader

QUANT_METHOD = "compressed-tensors"

PACKED = "pack-quantized"
INT_Q = "int-quantized"
NAIVE = "naive-quantized"
FLOAT_Q = "float-quantized"
NVFP4 = "nvfp4-pack-quantized"
MXFP4 = "mxfp4-pack-quantized"
MXFP8 = "mxfp8-quantized"
DENSE = "dense"
MIXED = "mixed-precision"
SUPPORTED_FORMATS = (PACKED, INT_Q, NAIVE, FLOAT_Q, NVFP4, MXFP4, MXFP8)

# writer versions below this use the padded ``32 // bits`` codes-per-word layout
DENSE_BITSTREAM_SINCE = (0, 18)

_FLOAT8 = ("float8_e4m3fn", "float8_e5m2")  # dtype names
_EXACT, _REGEX, _CLASS = 0, 1, 2


# ---------------------------------------------------------------------------------------- packing
def packed_width(count: int, bits: int, legacy: bool) -> int:
    """int32 words per row holding ``count`` codes: dense ``ceil(count*b/32)``, legacy ``ceil(count/(32//b))``."""
    return math.ceil(count / (32 // bits)) if legacy else math.ceil(count * bits / 32)


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class _Args:
    """The fields of a CT ``QuantizationArgs`` this reader uses."""

    where: str  # config path, for messages
    num_bits: int
    type: str  # "int" | "float"
    symmetric: bool
    strategy: str
    group_size: int | None
    block: tuple[int, int] | None
    dynamic: bool | str
    actorder: object
    scale_dtype: str | None


@dataclass
class _Group:
    name: str
    targets: list[str]
    weights: _Args | None
    inputs: _Args | None
    format: str | None


@dataclass
class _Plan:
    """How to load one module (made by scan, used by load)."""

    format: str
    weights: _Args
    legacy: bool = False
    tensors: dict[str, str] = field(default_factory=dict)  # role → tensor name
    scale_rows: int = 1  # block strategy: rows of the weight sharing one scale row
    zero_packed: bool = False
    use_g_idx: bool = False


def _parse_version(value) -> tuple[int, int] | None:
    if not isinstance(value, str):
        return None
    found = re.match(r"\s*v?(\d+)\.(\d+)", value)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _parse_args(raw, where: str) -> _Args | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InputError(f"config.json: {where} is not an object")
    bits = raw.get("num_bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise InputError(f"config.json: {where}.num_bits is not an integer: {bits!r}")
    kind = raw.get("type", "int")
    if kind not in ("int", "float"):
        raise UnsupportedError(f"config.json: {where}.type {kind!r} is not supported (int, float)")
    group_size = raw.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)):
        raise InputError(f"config.json: {where}.group_size is not an integer: {group_size!r}")
    strategy = raw.get("strategy")
    if strategy is None:  # CT's default from group_size
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    if strategy == "group" and group_size == -1:
        strategy = "channel"
    if strategy in ("group", "tensor_group") and (group_size is None or group_size <= 0):
        raise InputError(f"config.json: {where}.group_size {group_size!r} is invalid for strategy {strategy!r}")
    block = raw.get("block_structure")
    if block is not None:
        if isinstance(block, str) and re.fullmatch(r"\d+x\d+", block):
            block = [int(v) for v in block.split("x")]
        if (
            not isinstance(block, (list, tuple))
            or len(block) != 2
            or not all(isinstance(v, int) and v > 0 for v in block)
        ):
            raise InputError(f"config.json: {where}.block_structure {block!r} is not [rows, cols]")
        block = (int(block[0]), int(block[1]))
    if strategy == "block" and block is None:
        raise InputError(f"config.json: {where}.block_structure is missing for strategy 'block'")
    return _Args(
        where=where,
        num_bits=bits,
        type=kind,
        symmetric=bool(raw.get("symmetric", True)),
        strategy=str(strategy),
        group_size=group_size,
        block=block,
        dynamic=raw.get("dynamic", False),
        actorder=raw.get("actorder"),
        scale_dtype=raw.get("scale_dtype"),
    )


def _infer_format(weights: _Args | None, inputs: _Args | None) -> str:
    """CT ``infer_quantization_format`` order, for configs that do not name a format."""
    if weights is None:
        return DENSE
    if weights.type == "float" and weights.num_bits == 4:
        return MXFP4 if weights.group_size == 32 else NVFP4
    if weights.type == "float" and weights.num_bits == 8 and weights.group_size == 32 and (
        weights.scale_dtype or ""
    ).endswith("uint8"):
        return MXFP8
    if weights.type == "int":
        return INT_Q if inputs is not None else PACKED
    return FLOAT_Q if inputs is not None else NAIVE


def _shape(shape) -> str:
    return "[" + ", ".join(str(v) for v in shape) + "]"


# ---------------------------------------------------------------------------------------- reader
class CompressedTensorsReader(Reader):
    format = "compressed-tensors"
    stack_experts = True  # MoE experts → one [E, N, K] layer (npuconv.experts)

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self._plans: dict[str, _Plan] = {}

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        return checkpoint.quantization_config.get("quant_method") == QUANT_METHOD

    # ------------------------------------------------------------------------------ config
    @property
    def qconfig(self) -> dict:
        return self.ckpt.quantization_config

    @property
    def version(self) -> str | None:
        value = self.qconfig.get("version")
        return value if isinstance(value, str) else None

    def summary(self) -> dict:
        specs = self.linear_specs()
        return {
            "ct_version": self.version,
            "quantization_status": self.qconfig.get("quantization_status"),
            "formats": sorted({spec.source_scheme for spec in specs}),
        }

    def _check_config(self) -> None:
        qc = self.qconfig
        sparsity = qc.get("sparsity_config")
        if sparsity and not (isinstance(sparsity, dict) and sparsity.get("format") == DENSE):
            fmt = sparsity.get("format") if isinstance(sparsity, dict) else sparsity
            raise UnsupportedError(
                f"config.json: quantization_config.sparsity_config (format {fmt!r}) is not supported"
            )
        if qc.get("transform_config"):
            raise UnsupportedError("config.json: quantization_config.transform_config (rotations) is not supported")
        if qc.get("kv_cache_scheme"):
            self.warn("config.json: kv_cache_scheme is not converted; its k/v scale tensors pass through unchanged")

    def _groups(self) -> list[_Group]:
        raw = self.qconfig.get("config_groups") or {}
        if not isinstance(raw, dict):
            raise InputError("config.json: quantization_config.config_groups is not an object")
        top = self.qconfig.get("format")
        groups = []
        for name, body in raw.items():
            where = f"config_groups.{name}"
            if not isinstance(body, dict):
                raise InputError(f"config.json: {where} is not an object")
            targets = body.get("targets") or []
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise InputError(f"config.json: {where}.targets is not a list of strings")
            for target in targets:
                _compile_target(target, f"{where}.targets")
            if body.get("output_activations"):
                raise UnsupportedError(f"config.json: {where}.output_activations is not supported")
            weights = _parse_args(body.get("weights"), f"{where}.weights")
            inputs = _parse_args(body.get("input_activations"), f"{where}.input_activations")
            fmt = body.get("format") or top
            if fmt in (None, MIXED):
                fmt = _infer_format(weights, inputs)
                self.warn(f"config.json: {where} names no format; inferred {fmt!r}")
            if fmt != DENSE and fmt not in SUPPORTED_FORMATS:
                raise UnsupportedError(
                    f"config.json: {where} format {fmt!r} is not supported (supported: {', '.join(SUPPORTED_FORMATS)})"
                )
            groups.append(_Group(name, targets, weights, inputs, fmt))
        return groups

    # ------------------------------------------------------------------------------ scan
    def scan(self) -> list[LinearSpec]:
        self._check_config()
        status = self.qconfig.get("quantization_status", "compressed")
        if status == "frozen":
            self.warn("config.json: quantization_status 'frozen': float (fake-quantized) weights, nothing to unpack")
            return []
        if status not in ("compressed", None):
            raise UnsupportedError(f"config.json: quantization_status {status!r} is not supported (compressed, frozen)")
        groups = self._groups()
        target_group: dict[str, _Group] = {}
        for group in groups:  # a target repeated in a later group belongs to the later one (CT's dict)
            for target in group.targets:
                target_group[target] = group
        ordered_targets = sorted(target_group, key=lambda t: ("re:" in t, t))
        ignore = self.qconfig.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
            raise InputError("config.json: quantization_config.ignore is not a list of strings")
        for target in ignore:
            _compile_target(target, "ignore")

        specs = []
        for prefix in self._candidates():
            quant_tensor = self._quantized_tensor(prefix)
            is_linear = quant_tensor is not None
            matched = [(_match(prefix, t, is_linear), t) for t in ordered_targets]
            matched = [(kind, t) for kind, t in matched if kind is not None]
            ignored = any(_match(prefix, t, is_linear) is not None for t in ignore)
            if not matched or ignored:
                if quant_tensor is not None:
                    why = "is listed in 'ignore'" if matched else "matches no config_groups target"
                    raise InputError(f"tensor '{quant_tensor}' is quantized but its module '{prefix}' {why}")
                continue
            kind, target = min(matched, key=lambda m: m[0])  # stable: sorted targets within a kind
            group = target_group[target]
            if group.weights is None or group.format == DENSE:
                if quant_tensor is not None:
                    raise InputError(
                        f"tensor '{quant_tensor}' is quantized but config group '{group.name}' "
                        "does not quantize weights"
                    )
                continue
            if quant_tensor is None:
                if kind != _CLASS:
                    self.warn(f"module '{prefix}' matches config group '{group.name}' but has no quantized tensors")
                continue
            specs.append(self._scan_module(prefix, group))
        return specs

    def _candidates(self) -> list[str]:
        seen: dict[str, None] = {}
        for name in self.ckpt.names():
            for suffix in (".weight_packed", ".weight"):
                if name.endswith(suffix) and len(name) > len(suffix):
                    seen.setdefault(name[: -len(suffix)], None)
        return list(seen)

    def _quantized_tensor(self, prefix: str) -> str | None:
        """The first tensor proving that the module holds a quantized weight, or None."""
        for suffix in (".weight_packed", ".weight_scale"):
            if self.ckpt.has(prefix + suffix):
                return prefix + suffix
        name = prefix + ".weight"
        if self.ckpt.has(name) and self.ckpt.info(name).dtype_name in ("int8", "uint8", *_FLOAT8):
            return name
        return None

    def _scan_module(self, prefix: str, group: _Group) -> LinearSpec:
        fmt = group.format
        w = group.weights
        assert w is not None and fmt is not None
        plan = _Plan(format=fmt, weights=w)
        t = plan.tensors
        if fmt == PACKED:
            n, k = self._scan_packed(prefix, w, plan)
            weight_format, bits, scale_format = INT, w.num_bits, SCALE_FLOAT
        elif fmt in (NVFP4, MXFP4):
            n, k = self._scan_fp4(prefix, w, fmt, plan)
            weight_format, bits = FP4_E2M1, 4
            scale_format = SCALE_E8M0 if fmt == MXFP4 else SCALE_FLOAT
        else:  # int-quantized, naive-quantized, float-quantized, mxfp8-quantized: unpacked weight
            n, k, weight_format = self._scan_unpacked(prefix, w, fmt, plan)
            bits = w.num_bits
            scale_format = SCALE_E8M0 if fmt == MXFP8 else SCALE_FLOAT

        group_size = self._scan_scale(prefix, w, n, k, scale_format, plan)
        if weight_format == INT:
            self._scan_zero(prefix, w, n, plan)
        elif not w.symmetric:
            raise UnsupportedError(f"config.json: {w.where}: asymmetric float weights ('{prefix}') are not supported")
        act_order = False
        if self.ckpt.has(prefix + ".weight_g_idx"):
            act_order = self._scan_g_idx(prefix, n, k, w, weight_format, plan)
        plan.use_g_idx = act_order
        activation = self._scan_activation(prefix, group.inputs, plan)
        if self.ckpt.has(prefix + ".bias"):
            t["bias"] = prefix + ".bias"
        self._plans[prefix] = plan
        return LinearSpec(
            name=prefix,
            out_features=n,
            in_features=k,
            bits=bits,
            group_size=group_size,
            symmetric=w.symmetric if weight_format == INT else True,
            act_order=act_order,
            weight_format=weight_format,
            scale_format=scale_format,
            scale_dtype=self.ckpt.info(t["scale"]).dtype_name,
            activation=activation,
            has_bias="bias" in t,
            has_global_scale="global_scale" in t,
            source_scheme=fmt,
            source_tensors=tuple(t.values()),
        )

    def _info2d(self, name: str):
        info = self.ckpt.info(name)
        if len(info.shape) == 3:
            raise UnsupportedError(f"tensor '{name}': stacked-expert weights {_shape(info.shape)} are not supported")
        if len(info.shape) != 2:
            raise InputError(f"tensor '{name}' has shape {_shape(info.shape)}, expected 2 dimensions")
        return info

    def _weight_shape(self, prefix: str, rows: int) -> tuple[int, int] | None:
        name = prefix + ".weight_shape"
        if not self.ckpt.has(name):
            return None
        info = self.ckpt.info(name)
        if is_float(info.dtype_name) or info.numel != 2:
            raise InputError(f"tensor '{name}' must hold 2 integers [out, in], got {info.dtype} {_shape(info.shape)}")
        n, k = (int(v) for v in read_ints(info))  # no torch: inspect runs this
        if n != rows or k <= 0:
            raise InputError(f"tensor '{name}' says [{n}, {k}] but the packed weight has {rows} rows")
        return n, k

    def _scan_packed(self, prefix: str, w: _Args, plan: _Plan) -> tuple[int, int]:
        if w.type != "int":
            raise UnsupportedError(f"config.json: {w.where}: pack-quantized needs int weights, got {w.type!r}")
        if not 1 <= w.num_bits <= 8:
            raise UnsupportedError(f"config.json: {w.where}.num_bits {w.num_bits} is not supported (1..8)")
        name = prefix + ".weight_packed"
        self.require(name, prefix)
        info = self._info2d(name)
        if info.dtype_name != "int32":
            raise InputError(f"tensor '{name}' is {info.dtype}, expected torch.int32")
        plan.tensors["weight"] = name
        shape = self._weight_shape(prefix, info.shape[0])
        if shape is None:
            raise InputError(f"{prefix}: tensor '{prefix}.weight_shape' is missing")
        plan.tensors["shape"] = prefix + ".weight_shape"
        n, k = shape
        b = w.num_bits
        version = _parse_version(self.version)
        dense_w, legacy_w = packed_width(k, b, False), packed_width(k, b, True)
        if version is not None:
            plan.legacy = version < DENSE_BITSTREAM_SINCE
        else:  # no version: an old writer, unless only the dense width fits
            plan.legacy = not (info.shape[1] == dense_w != legacy_w)
        expected = legacy_w if plan.legacy else dense_w
        if info.shape[1] != expected:
            layout = "legacy 32//bits per word" if plan.legacy else "dense bitstream"
            raise InputError(
                f"tensor '{name}' has shape {_shape(info.shape)}, expected [{n}, {expected}] for {k} {b}-bit codes "
                f"({layout}, writer version {self.version})"
            )
        return n, k

    def _scan_fp4(self, prefix: str, w: _Args, fmt: str, plan: _Plan) -> tuple[int, int]:
        if w.type != "float" or w.num_bits != 4:
            raise UnsupportedError(f"config.json: {w.where}: {fmt} needs 4-bit float weights")
        name = prefix + ".weight_packed"
        self.require(name, prefix)
        info = self._info2d(name)
        if info.dtype_name not in ("uint8", "int8"):
            raise InputError(f"tensor '{name}' is {info.dtype}, expected torch.uint8")
        plan.tensors["weight"] = name
        n, k = info.shape[0], 2 * info.shape[1]
        shape = self._weight_shape(prefix, n)
        if shape is not None:
            plan.tensors["shape"] = prefix + ".weight_shape"
            if math.ceil(shape[1] / 2) != info.shape[1]:
                expected = f"[{n}, {math.ceil(shape[1] / 2)}]"
                raise InputError(f"tensor '{name}' has shape {_shape(info.shape)}, expected {expected}")
            k = shape[1]
        if fmt == NVFP4:
            glob = prefix + ".weight_global_scale"
            self.require(glob, prefix)
            ginfo = self.ckpt.info(glob)
            if ginfo.numel != 1 or not is_float(ginfo.dtype_name):
                raise InputError(f"tensor '{glob}' must be one float, got {ginfo.dtype} {_shape(ginfo.shape)}")
            plan.tensors["global_scale"] = glob
        return n, k

    def _scan_unpacked(self, prefix: str, w: _Args, fmt: str, plan: _Plan) -> tuple[int, int, str]:
        name = prefix + ".weight"
        self.require(name, prefix)
        info = self._info2d(name)
        plan.tensors["weight"] = name
        if w.type == "int":
            if fmt in (FLOAT_Q, MXFP8):
                raise InputError(f"config.json: {w.where}: {fmt} needs float weights, got int")
            if not 1 <= w.num_bits <= 8:
                raise UnsupportedError(f"config.json: {w.where}.num_bits {w.num_bits} is not supported (1..8)")
            if info.dtype_name != "int8":
                raise InputError(f"tensor '{name}' is {info.dtype}, expected torch.int8 for {fmt}")
            weight_format = INT
        else:
            if fmt == INT_Q:
                raise InputError(f"config.json: {w.where}: int-quantized needs int weights, got float")
            if w.num_bits != 8:
                raise UnsupportedError(f"config.json: {w.where}.num_bits {w.num_bits} float weights are not supported")
            if info.dtype_name != "float8_e4m3fn":
                raise UnsupportedError(f"tensor '{name}' is {info.dtype}; only torch.float8_e4m3fn is supported")
            weight_format = FP8_E4M3
        return info.shape[0], info.shape[1], weight_format

    def _scan_scale(self, prefix: str, w: _Args, n: int, k: int, scale_format: str, plan: _Plan) -> int:
        """Check ``weight_scale``; return the canonical group size."""
        name = prefix + ".weight_scale"
        self.require(name, prefix)
        info = self.ckpt.info(name)
        plan.tensors["scale"] = name
        if scale_format == SCALE_E8M0:
            if info.dtype_name != "uint8":
                raise InputError(f"tensor '{name}' is {info.dtype}, expected torch.uint8 (E8M0) for {plan.format}")
        elif not is_float(info.dtype_name):
            raise InputError(f"tensor '{name}' is {info.dtype}, expected a float dtype")
        expected, group_size = self._scale_grid(prefix, w, n, k, plan)
        if tuple(info.shape) != expected and not (
            # tensor scales: any single value; channel scales may be stored 1-D
            (w.strategy == "tensor" and info.numel == 1)
            or (w.strategy == "channel" and tuple(info.shape) == (n,))
        ):
            raise InputError(
                f"tensor '{name}' has shape {_shape(info.shape)}, expected {_shape(expected)} "
                f"({w.strategy} strategy, weight [{n}, {k}])"
            )
        return group_size

    def _scale_grid(self, prefix: str, w: _Args, n: int, k: int, plan: _Plan) -> tuple[tuple[int, ...], int]:
        """Stored scale shape for the strategy, and the canonical group size."""
        strategy = w.strategy
        if strategy == "tensor":
            return (1,), -1
        if strategy == "channel":
            return (n, 1), -1
        if strategy in ("group", "tensor_group"):
            g = w.group_size
            assert g is not None
            if strategy == "tensor_group" and plan.format != NVFP4:
                raise UnsupportedError(f"config.json: {w.where}: strategy 'tensor_group' is only supported for {NVFP4}")
            if k % g and k > g:
                raise InputError(f"tensor '{plan.tensors['weight']}': group_size {g} does not divide in_features {k}")
            return (n, math.ceil(k / g)), (g if k >= g else -1)
        if strategy == "block":
            assert w.block is not None
            bh, bw = w.block
            plan.scale_rows = bh
            return (math.ceil(n / bh), math.ceil(k / bw)), bw
        raise UnsupportedError(f"config.json: {w.where}.strategy {strategy!r} is not supported for weights")

    def _scan_zero(self, prefix: str, w: _Args, n: int, plan: _Plan) -> None:
        name = prefix + ".weight_zero_point"
        if not self.ckpt.has(name):
            if not w.symmetric:
                raise InputError(f"{prefix}: asymmetric scheme but tensor '{name}' is missing")
            return
        info = self.ckpt.info(name)
        plan.tensors["zero"] = name
        scale_shape = self.ckpt.info(plan.tensors["scale"]).shape
        if info.dtype_name == "int32" and plan.format == PACKED and w.strategy in ("group", "channel"):
            rows = packed_width(n, w.num_bits, plan.legacy)
            expected = (rows, scale_shape[-1] if scale_shape else 1)
            plan.zero_packed = True
        elif info.dtype_name == "int8":
            expected = tuple(scale_shape)
        else:
            raise InputError(f"tensor '{name}' is {info.dtype}, expected torch.int8 (or packed torch.int32)")
        if tuple(info.shape) != expected and not (w.strategy == "tensor" and info.numel == 1):
            raise InputError(
                f"tensor '{name}' has shape {_shape(info.shape)}, expected {_shape(expected)} "
                f"({'packed along N, ' if plan.zero_packed else ''}{w.num_bits}-bit, {n} rows)"
            )

    def _scan_g_idx(self, prefix: str, n: int, k: int, w: _Args, weight_format: str, plan: _Plan) -> bool:
        """Check ``weight_g_idx`` (small: read here); True if it orders the groups (not all -1)."""
        name = prefix + ".weight_g_idx"
        info = self.ckpt.info(name)
        plan.tensors["g_idx"] = name
        if weight_format != INT or w.strategy != "group":
            raise UnsupportedError(f"tensor '{name}': g_idx is only supported with int group quantization")
        if is_float(info.dtype_name) or tuple(info.shape) != (k,):
            raise InputError(f"tensor '{name}' has {info.dtype} {_shape(info.shape)}, expected an integer [{k}]")
        g_idx = self.ckpt.get(name).to(torch.int64)
        if bool((g_idx == -1).all()):
            self.warn(f"tensor '{name}' is all -1 (never initialised): column order used, as compressed-tensors does")
            return False
        groups = self.ckpt.info(plan.tensors["scale"]).shape[-1]
        low, high = int(g_idx.min()), int(g_idx.max())
        if low < 0 or high >= groups:
            raise InputError(f"tensor '{name}' holds group indices in [{low}, {high}], outside [0, {groups})")
        counts = torch.bincount(g_idx, minlength=groups)
        if not bool((counts == w.group_size).all()):
            self.warn(
                f"tensor '{name}': groups do not all hold group_size {w.group_size} columns; "
                "g_idx[k] is used as the group of column k"
            )
        return True

    def _scan_activation(self, prefix: str, a: _Args | None, plan: _Plan) -> ActivationQuant | None:
        if a is None:
            return None
        if a.type == "int":
            if not 1 <= a.num_bits <= 8:
                raise UnsupportedError(f"config.json: {a.where}.num_bits {a.num_bits} is not supported")
            kind = INT
        elif a.num_bits == 8:
            kind = FP8_E4M3
        elif a.num_bits == 4:
            kind = FP4_E2M1
        else:
            raise UnsupportedError(f"config.json: {a.where}: {a.num_bits}-bit float activations are not supported")
        strategy = {"token": "token", "tensor": "tensor", "group": "group", "tensor_group": "group"}.get(a.strategy)
        if strategy is None:
            raise UnsupportedError(f"config.json: {a.where}.strategy {a.strategy!r} is not supported for activations")
        dynamic = a.dynamic is True or a.dynamic == "local"
        if a.strategy == "tensor_group":
            glob = prefix + ".input_global_scale"
            if self.ckpt.has(glob):
                self.warn(f"tensor '{glob}' (NVFP4 activation global scale) has no canonical field; it passes through")
        elif not dynamic:
            if a.strategy != "tensor":
                raise UnsupportedError(f"config.json: {a.where}: static {a.strategy!r} activations are not supported")
            for role, suffix, needed in (
                ("input_scale", ".input_scale", True),
                ("input_zero", ".input_zero_point", not a.symmetric),
            ):
                name = prefix + suffix
                if not self.ckpt.has(name):
                    if needed:
                        raise InputError(f"{prefix}: static activation quantization but tensor '{name}' is missing")
                    continue
                info = self.ckpt.info(name)
                if info.numel != 1:
                    raise InputError(f"tensor '{name}' has shape {_shape(info.shape)}, expected one value")
                plan.tensors[role] = name
        return ActivationQuant(kind=kind, bits=a.num_bits, dynamic=dynamic, strategy=strategy, symmetric=a.symmetric)

    # ------------------------------------------------------------------------------ load
    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        self.linear_specs()
        plan = self._plans.get(spec.name)
        if plan is None:
            raise InputError(f"'{spec.name}' is not a quantized linear of this checkpoint")
        t = plan.tensors
        w = plan.weights
        n, k, bits = spec.out_features, spec.in_features, spec.bits
        raw = self.tensor(t["weight"])
        packed = signed = None
        if (plan.format == PACKED and model.PACKED_CODES and bits == 4 and raw.dim() == 2 and n % 8 == 0
                and raw.shape[1] * 8 == k):
            qweight, packed = None, int4_words_nk_to_kn(raw, NIBBLE_HIGH_BITS)  # fields are q + 8: nibbles move, bit 3 flips
        elif plan.format == PACKED:
            qweight = unpack_rows(raw, bits, k, padded=plan.legacy)
        elif plan.format in (NVFP4, MXFP4):
            qweight = unpack_nibbles(raw)[:, :k].contiguous()
        elif spec.weight_format == INT and bits == 8 and raw.dtype == torch.int8 and model.PACKED_CODES:
            qweight, signed = None, raw  # stored q - 128: handed over as is (model.QuantizedLinear.signed)
        elif spec.weight_format == INT:
            qweight = self._signed_to_codes(raw, bits, t["weight"])
        else:
            qweight = raw

        stored_scale = self.tensor(t["scale"])
        self._check_scale(stored_scale, t["scale"], spec.scale_format)
        scale = self._expand(stored_scale, n, plan)

        zero = None
        if "zero" in t and w.symmetric:
            self._check_symmetric_zero(t["zero"], plan, n)
        elif "zero" in t:
            stored = self.tensor(t["zero"])
            if plan.zero_packed:
                fields = unpack_columns(stored, bits, n, padded=plan.legacy)
                zero = fields.to(torch.int16)
            else:
                zero = self._signed_to_codes(stored, bits, t["zero"]).to(torch.int16)
            zero = self._expand(zero, n, plan)

        g_idx = self.tensor(t["g_idx"]).to(torch.int32) if plan.use_g_idx else None

        global_scale = None
        if "global_scale" in t:
            global_scale = self.tensor(t["global_scale"]).float().reshape(1)
            self._check_scale(global_scale, t["global_scale"], SCALE_FLOAT, divisor=True)
        input_scale = input_zero = None
        if "input_scale" in t:
            input_scale = self.tensor(t["input_scale"]).float().reshape(1)
            self._check_scale(input_scale, t["input_scale"], SCALE_FLOAT, divisor=True)
        if "input_zero" in t:
            input_zero = self.tensor(t["input_zero"]).float().reshape(1)
        bias = self.tensor(t["bias"]) if "bias" in t else None
        return QuantizedLinear(
            spec=spec,
            qweight=qweight,
            scale=scale,
            zero=zero,
            g_idx=g_idx,
            bias=bias,
            global_scale=global_scale,
            input_scale=input_scale,
            input_zero=input_zero,
            packed_kn=packed,
            signed=signed,
        )

    @staticmethod
    def _signed_to_codes(stored: torch.Tensor, bits: int, name: str) -> torch.Tensor:
        """Signed int8 ``q`` (CT's storage) → canonical unsigned uint8 ``q + 2**(bits-1)``."""
        offset = 1 << (bits - 1)
        if bits == 8 and stored.dtype == torch.int8:  # s + 128 wraps exactly onto s ^ 0x80 in a byte: no int16 copy
            return stored.view(torch.uint8) ^ 0x80
        wide = stored.to(torch.int16)
        if bits < 8 and wide.numel():
            low, high = int(wide.min()), int(wide.max())
            if low < -offset or high >= offset:
                raise InputError(f"tensor '{name}' holds values in [{low}, {high}], outside signed {bits}-bit range")
        return (wide + offset).to(torch.uint8)

    @staticmethod
    def _expand(values: torch.Tensor, n: int, plan: _Plan) -> torch.Tensor:
        """Stored scale / zero-point grid → ``[N, G]`` (tensor: ``[1]`` → ``[N, 1]``; block: repeat rows)."""
        strategy = plan.weights.strategy
        if strategy == "tensor":
            return values.reshape(1, 1).expand(n, 1).contiguous()
        if strategy == "channel":
            return values.reshape(n, 1).contiguous()
        if strategy == "block":
            return values.repeat_interleave(plan.scale_rows, dim=0)[:n].contiguous()
        return values.contiguous()

    def _check_scale(self, scale: torch.Tensor, name: str, scale_format: str, divisor: bool = False) -> None:
        self.check_scale(name, scale, e8m0=scale_format == SCALE_E8M0, divisor=divisor)

    def _check_symmetric_zero(self, name: str, plan: _Plan, n: int) -> None:
        """A symmetric scheme with a stored zero point: accept it only if it is the signed zero."""
        stored = self.tensor(name)
        if plan.zero_packed:
            signed = unpack_columns(stored, plan.weights.num_bits, n, padded=plan.legacy).to(torch.int16)
            signed = signed - (1 << (plan.weights.num_bits - 1))
        else:
            signed = stored
        if bool((signed != 0).any()):
            raise InputError(f"tensor '{name}' holds non-zero zero points but the scheme is symmetric")



def _compile_target(target: str, where: str) -> None:
    if target.startswith("re:"):
        try:
            re.compile(target[3:])
        except re.error as e:
            raise InputError(f"config.json: {where}: invalid regex {target!r} ({e})") from None


def _match(name: str, target: str, is_linear: bool) -> int | None:
    """How ``target`` matches module ``name``: _EXACT, _REGEX, _CLASS, or None."""
    if target.startswith("re:"):
        return _REGEX if re.match(target[3:], name) else None
    if target == name:
        return _EXACT
    if target == "Linear" and is_linear:
        return _CLASS
    return None


