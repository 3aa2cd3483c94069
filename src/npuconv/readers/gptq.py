"""GPTQ checkpoints (GPTQModel, AutoGPTQ, optimum): v1 ``gptq`` and v2 ``gptq_v2`` → canonical layers.

Facts: ``docs/research/checkpoint_formats.md`` §1 (read from GPTQModel 7.7.0 and AutoGPTQ; checked
against the GPTQModel-written fixtures in ``tests/fixtures/gptq_*``).

Configuration
    ``quantize_config.json`` if present (with ``bits``), else ``config.json["quantization_config"]``
    (when both exist they must agree on ``bits``/``group_size``/``sym``, else the checkpoint is
    refused; other differences are warnings, see :func:`compare_configs`):
    ``bits`` (2, 3, 4, 8), ``group_size`` (-1: one group of K), ``sym``, ``desc_act``, ``lm_head``,
    declared format ``checkpoint_format`` or ``format`` (missing: ``"gptq"``). ``gptq_p``, ``marlin``,
    ``bitblas`` (and AutoGPTQ's ``is_marlin_format``) are other layouts and are refused, as is any
    unknown format or a ``pack_dtype`` other than int32. GPTQModel ``dynamic`` per-module
    overrides: keys ``"-:regex"`` (module not quantized), ``"+:regex"`` or ``"regex"`` (``bits``,
    ``group_size``, ``sym``, ``desc_act`` override the base values); the first key whose regex
    matches the module name (``re.match``, in file order) applies, as GPTQModel's ``dynamic_get``.

Tensors of a quantized linear ``<p>`` (int32 words are LSB-first bitstreams, see
:mod:`npuconv.packing`):

=============  =======  ==================  =======================================================
``qweight``    int32    ``[K*b/32, N]``     codes packed along K (dim 0); 3-bit values straddle
                                            words (32 values per 3 words)
``qzeros``     int32    ``[G, N*b/32]``     zero-point fields packed along N (dim 1)
``scales``     float    ``[G, N]``          fp16 as written; kept in the stored dtype
``g_idx``      int32    ``[K]``             group of input column k; ``k // g`` unless act-order
``bias``       float    ``[N]``             optional
=============  =======  ==================  =======================================================

Mapping onto the canonical rule ``w[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]``:
``q`` = ``qweight`` transposed to ``[N, K*b/32]`` and unpacked along the last dim (canonical
``[N, K]`` directly); ``s`` = ``scales.T``; ``z`` = the decoded ``qzeros`` transposed to ``[N, G]``
(int16), or ``None`` for a symmetric module whose zero points are all ``2**(b-1)`` (a symmetric
module with any other zero point is an error: the config contradicts the tensors); ``g_idx`` is
kept (int32, rows stay in the original K order) unless it equals ``k // g`` everywhere, in which
case ``act_order`` is False and ``g_idx`` is None.

Zero-point fields, v1 and v2
    v2 stores ``z`` in each field. v1 stores ``z - 1`` (AutoGPTQ ``zeros -= 1``). A v1 zero point
    of 0 (asymmetric only) has no field value; writers differ:

    - GPTQModel (2/4/8 bits) subtracts ``0x55555555`` / ``0x11111111`` / ``0x01010101`` from whole
      words, so the field reads ``2**b - 1`` and the next field of the word is one lower (borrow);
      its loader adds the constant back, which recovers every ``z`` exactly.
    - GPTQModel (3 bits) shifts each decoded field: ``(z - 1) & 7``, read back per field.
    - AutoGPTQ / GPTQ-for-LLaMa OR ``-1 << shift`` into the word, corrupting the higher fields of
      that word: not recoverable by any reader.

    This reader implements GPTQModel's own load path, the exact inverse of the writer that
    produces current v1 checkpoints: for 2, 4 and 8 bits one 32-bit addition of the per-field
    constant per word (carries propagate), for 3 bits ``(field + 1) & 7`` per field. Per-field
    decoders (AutoGPTQ, exllama, vLLM kernels, GPTQModel's ``convert_gptq_file``) give the same
    result except in the field above a borrow, which they read one lower; the reader warns when a
    2/4/8-bit v1 module holds a field ``2**b - 1`` (the only place where the two readings differ).

v1 or v2: detected from the data, not taken from the config
    A checkpoint labelled ``gptq`` that stores v2 zero points decodes to garbage (vLLM issue
    38966), so :func:`detect_checkpoint_format` decides from the first modules and the reader warns
    when that differs from the label. The rule, in order:

    1. **Symmetric modules (exact).** GPTQ's symmetric quantizer fixes ``z = 2**(b-1)``, so every
       field of a symmetric module is ``2**(b-1) - 1`` under v1 (``0x77777777`` words at 4 bits)
       and ``2**(b-1)`` under v2. The first symmetric module whose fields are all one of these
       two values decides. This is read from the packed words, without unpacking and without torch
       (:func:`symmetric_verdict`), so ``inspect`` of a symmetric checkpoint imports no torch.
    2. **Asymmetric modules (statistical).** The asymmetric quantizer maps ``w = 0`` to code ``z``
       (``q = round(w / s) + z`` with ``z = round(-min / s)``), and a group's weights are centred
       on zero, so the mean code of a group sits at ``z`` give or take ``mean(w) / s``. Per group,
       ``offset = trimmed_mean(codes) - stored_field`` (10 % trimmed on each side, which removes
       outliers) is therefore about 0 under v2 and 1 under v1, whatever the bit width. The
       estimate is the inverse-variance weighted mean of the offsets (weight = codes kept /
       their variance, floored at 1/12), with a sandwich standard error, over the groups whose
       field is neither 0 nor ``2**b - 1`` (those hold the v1 wrap of ``z = 0``). Modules are
       sampled in checkpoint order (at most :data:`DETECT_CODES_PER_MODULE` codes from the first
       output rows of each, at most :data:`DETECT_MAX_MODULES` modules) until the estimate is at
       least :data:`DETECT_Z` standard errors from 0.5 and inside ``[-0.5, 1.5]``, on at least
       :data:`DETECT_MIN_GROUPS` groups. This step unpacks codes and zero points with torch
       (``inspect`` of an asymmetric checkpoint imports it: the statistics are tensor work).
    3. Otherwise (too few or contradictory data) the declared format is used, with a warning.

    Why not the distribution of the fields alone (mean field ``(2**b - 1) / 2`` under v2, one
    less under v1)? It depends on how lopsided each group's min/max is; on the 8-bit v1 fixture
    the mean field is 128.9, which points to v2. The per-group offset cancels that, since the
    codes carry the same lopsidedness. Measured over all modules of each fixture: v1 4-bit
    1.00 ± 0.01, v1 8-bit 0.96 ± 0.09 (147k weights, the hardest case: one code step is 1/255 of
    the range; synthetic 8-bit layers of 1M weights give ± 0.04-0.06), v2 3-bit 0.00 ± 0.004,
    v2 4-bit 0.00 ± 0.01.

    Limits: it assumes each group's weights have mean close to zero relative to one scale step
    (true of trained and random LLM linears; a model whose every group had a common offset of
    half a scale step or more would fool it); tiny or random-valued checkpoints can be
    inconclusive (then the label is trusted); a checkpoint mixing v1 and v2 modules is not
    supported (the first decisive evidence wins for all modules).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from npuconv.lazy_torch import torch

from npuconv.io.checkpoint import Checkpoint
from npuconv.io.safetensors_io import is_float, read_bytes, read_ints
from npuconv.errors import InputError, UnsupportedError
from npuconv import model
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.packing import NIBBLE_HIGH_BITS, int4_words_k_to_n, unpack_bitstream, unpack_columns
from npuconv.readers.base import Reader, module_prefixes

V1 = "gptq"
V2 = "gptq_v2"
SUPPORTED_BITS = (2, 3, 4, 8)
QUANT_METHODS = ("gptq", "gptqmodel")
REFUSED_FORMATS = {
    "gptq_p": "GPTQModel's planar layout",
    "marlin": "a Marlin kernel repacking",
    "bitblas": "a BitBLAS kernel repacking",
}

DETECT_CODES_PER_MODULE = 1 << 22
DETECT_MAX_MODULES = 32
DETECT_MIN_GROUPS = 16
DETECT_Z = 4.0
DETECT_TRIM = 0.1


# ---------------------------------------------------------------------------------------------- bits
def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ ``qweight`` int32 ``[K*b/32, N]`` (packed along K) → canonical uint8 codes ``[N, K]``.

    Column n of ``qweight`` is an LSB-first bitstream over K (code k at bits ``[k*b, k*b+b)`` of
    the column read as consecutive little-endian words). It is unpacked along dim 0 into a
    contiguous ``[K, N]`` (:func:`~npuconv.packing.unpack_columns`) and returned as its ``[N, K]``
    transposed *view*: a writer that wants ``[K, N]`` (every NPU target) gets it without a copy.
    """
    return unpack_columns(qweight, bits, in_features).t()


def unpack_zero_fields(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Raw ``qzeros`` fields: int32 ``[G, N*b/32]`` (packed along N) → uint8 ``[G, N]``, no offset applied."""
    return unpack_bitstream(qzeros, bits, out_features)


def repeated_field(value: int, bits: int, count: int) -> int:
    """``count`` ``bits``-bit fields all equal to ``value``, as the integer whose LSB-first bits they
    are: ``sum_j value << (b*j)`` (field ``j`` at bits ``[j*b, j*b+b)``, the bitstream order of
    :mod:`npuconv.packing`)."""
    return value * sum(1 << (bits * j) for j in range(count))


def add_one_per_field(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel's v1 → v2 word arithmetic: add ``sum_j 2**(b*j)`` to each int32 word, mod 2**32.

    This adds 1 to every ``b``-bit field at once, carries propagating into the next field (the
    exact inverse of GPTQModel's v2 → v1 export, borrow included). For b in {2, 4, 8} only.
    """
    constant = repeated_field(1, bits, 32 // bits)
    words = (qzeros.to(torch.int64) + constant) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def decode_zero_points(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """``qzeros`` int32 ``[G, N*b/32]`` → zero points ``z`` as canonical int16 ``[N, G]``.

    v2: ``z = field``. v1: ``z = field + 1``, by word arithmetic for 2/4/8 bits
    (:func:`add_one_per_field`) and ``(field + 1) & 7`` per field for 3 bits (see module docstring).
    """
    if checkpoint_format == V2:
        fields = unpack_zero_fields(qzeros, bits, out_features)
    elif bits == 3:
        fields = (unpack_zero_fields(qzeros, bits, out_features) + 1) & 0b111
    else:
        fields = unpack_zero_fields(add_one_per_field(qzeros, bits), bits, out_features)
    return fields.t().to(torch.int16).contiguous()


# ----------------------------------------------------------------------------------- v1/v2 detection
def symmetric_verdict(qzeros: bytes, row_words: int, bits: int, out_features: int) -> tuple[str, int] | None:
    """(V1, ``2**(b-1) - 1``) if every raw zero field is ``2**(b-1) - 1``, (V2, ``2**(b-1)``) if
    every field is ``2**(b-1)``, else None.

    ``qzeros``: the stored bytes of int32 ``[G, row_words]``. Decided on the packed words, without
    unpacking (and without torch: ``inspect`` runs this): the N fields of a row all equal ``v``
    exactly when the row's bits ``[0, N*b)``, read as one little-endian integer, equal
    :func:`repeated_field` ``(v, b, N)`` (bits past field N, padding of the last word, are ignored,
    as :func:`unpack_zero_fields` ignores them).
    """
    row_bytes = 4 * row_words
    used = (1 << (bits * out_features)) - 1
    rows = {int.from_bytes(qzeros[at : at + row_bytes], "little") & used for at in range(0, len(qzeros), row_bytes)}
    midpoint = 1 << (bits - 1)
    for verdict, field_value in ((V1, midpoint - 1), (V2, midpoint)):
        if rows == {repeated_field(field_value, bits, out_features)}:
            return verdict, field_value
    return None


def group_offsets(
    codes: torch.Tensor, fields: torch.Tensor, g_idx: torch.Tensor | None, group_size: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``trimmed_mean(codes) - field`` and its inverse-variance weight, usable groups only.

    ``codes`` uint8 ``[R, K]``; ``fields`` raw zero fields ``[R, G]`` of the same rows; ``g_idx``
    ``[K]`` or None for ``k // g``. Returns two float64 vectors (empty when the groups are not all
    of size ``g``, which GPTQ never writes).
    """
    rows, k = codes.shape
    size = k if group_size == -1 else group_size
    groups = fields.shape[1]
    empty = torch.zeros(0, dtype=torch.float64)
    if groups * size != k:
        return empty, empty
    if g_idx is not None:
        if not bool((torch.bincount(g_idx, minlength=groups) == size).all()):
            return empty, empty
        codes = codes[:, torch.argsort(g_idx, stable=True)]
    ordered = codes.reshape(rows, groups, size).sort(dim=-1).values
    trim = int(size * DETECT_TRIM)
    core = ordered[..., trim : size - trim].to(torch.float64)
    mean = core.mean(dim=-1)
    variance = core.var(dim=-1, unbiased=False).clamp(min=1 / 12)
    offsets = mean - fields.to(torch.float64)
    weights = core.shape[-1] / variance
    usable = (fields > 0) & (fields < (1 << bits) - 1)
    return offsets[usable], weights[usable]


@dataclass
class ZeroPointEvidence:
    """Accumulates per-group offsets (mean code − stored field) over sampled asymmetric modules."""

    offsets: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)

    def add(self, offsets: torch.Tensor, weights: torch.Tensor) -> None:
        self.offsets.append(offsets)
        self.weights.append(weights)

    def estimate(self) -> tuple[float, float, int]:
        """(weighted mean offset, its sandwich standard error, number of groups)."""
        if not self.offsets:
            return math.nan, math.inf, 0
        offsets = torch.cat(self.offsets)
        weights = torch.cat(self.weights)
        if offsets.numel() == 0:
            return math.nan, math.inf, 0
        total = weights.sum()
        mean = (weights * offsets).sum() / total
        error = ((weights * (offsets - mean)).square().sum()).sqrt() / total
        return float(mean), max(float(error), 1e-9), offsets.numel()

    def verdict(self) -> str | None:
        mean, error, count = self.estimate()
        if count < DETECT_MIN_GROUPS or not -0.5 <= mean <= 1.5:
            return None
        z = (mean - 0.5) / error
        if z >= DETECT_Z:
            return V1
        if z <= -DETECT_Z:
            return V2
        return None

    def describe(self) -> str:
        mean, error, count = self.estimate()
        if count == 0:
            return "no usable asymmetric groups sampled"
        return f"mean code minus stored zero field {mean:.3f} ± {error:.3f} over {count} groups (v1 ≈ 1, v2 ≈ 0)"


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ModuleConfig:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool


@dataclass(frozen=True)
class GPTQConfig:
    source: str  # where it was read, for messages
    base: ModuleConfig
    declared_format: str
    lm_head: bool
    dynamic: tuple[tuple[str, re.Pattern, dict], ...]  # (key, compiled regex, overrides); "-:" keys: overrides None
    warnings: tuple[str, ...] = ()  # where config.json's quantization_config says otherwise (not on CONTRADICTING)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> "GPTQConfig":
        raw = checkpoint.read_json("quantize_config.json")
        source = "quantize_config.json"
        both = raw is not None and "bits" in raw
        if not both:
            raw, source = checkpoint.quantization_config, "config.json: quantization_config"
        declared = raw.get("checkpoint_format") or raw.get("format") or V1
        if not isinstance(declared, str):
            raise InputError(f"{source}: checkpoint_format {declared!r} is not a string")
        declared = declared.lower()
        if raw.get("is_marlin_format"):
            declared = "marlin"
        if declared in REFUSED_FORMATS:
            raise UnsupportedError(
                f"{source}: checkpoint_format '{declared}' ({REFUSED_FORMATS[declared]}) is not supported; "
                "re-export the model as 'gptq' or 'gptq_v2'"
            )
        if declared not in (V1, V2):
            raise UnsupportedError(f"{source}: checkpoint_format '{declared}' is not supported (expected 'gptq' or 'gptq_v2')")
        pack_dtype = raw.get("pack_dtype", "int32")
        if pack_dtype not in ("int32", "torch.int32"):
            raise UnsupportedError(f"{source}: pack_dtype {pack_dtype!r} is not supported (only int32)")
        base = _module_config(raw, None, source)
        dynamic = _dynamic_rules(raw.get("dynamic"), source)
        notes = compare_configs(checkpoint.quantization_config, raw) if both else ()  # after raw's own checks
        return cls(source, base, declared, bool(raw.get("lm_head", False)), dynamic, notes)

    def for_module(self, name: str) -> ModuleConfig | None:
        """The module's settings after ``dynamic`` overrides; None if a ``-:`` rule excludes it."""
        for key, pattern, overrides in self.dynamic:
            if pattern.match(name):
                if overrides is None:
                    return None
                return _module_config(overrides, self.base, f"{self.source}: dynamic[{key!r}]")
        return self.base


CONTRADICTING = ("bits", "group_size", "sym")  # settings that change how the codes decode: a conflict is refused
NOTED = ("desc_act", "checkpoint_format", "format", "lm_head")  # a conflict is converted with a warning


def compare_configs(config_qc: dict, quantize_config: dict) -> tuple[str, ...]:
    """Compare config.json ``quantization_config`` with ``quantize_config.json`` (which wins).

    Both are written by GPTQModel/AutoGPTQ with the same values. Where both state one of
    :data:`CONTRADICTING` differently the checkpoint is ambiguous: InputError naming both values.
    A difference in :data:`NOTED` keys is returned as a warning naming both values.
    """
    if str(config_qc.get("quant_method", "gptq")).lower() not in QUANT_METHODS:
        return ()
    differ = [k for k in (*CONTRADICTING, *NOTED) if k in config_qc and k in quantize_config and config_qc[k] != quantize_config[k]]

    def both(key: str) -> str:
        return f"config.json quantization_config.{key}={config_qc[key]!r} but quantize_config.json {key}={quantize_config[key]!r}"

    refused = [k for k in differ if k in CONTRADICTING]
    if refused:
        raise InputError(f"{'; '.join(both(k) for k in refused)}: the checkpoint contradicts itself; make them agree")
    return tuple(f"{both(k)}; using quantize_config.json" for k in differ)


def _module_config(raw: dict, base: ModuleConfig | None, source: str) -> ModuleConfig:
    bits = raw.get("bits", base.bits if base else None)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise InputError(f"{source}: bits {bits!r} is not an integer")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedError(f"{source}: bits {bits} is not supported (GPTQ: 2, 3, 4 or 8)")
    group_size = raw.get("group_size", base.group_size if base else -1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise InputError(f"{source}: group_size {group_size!r} must be -1 or a positive integer")
    sym = raw.get("sym", base.sym if base else True)
    desc_act = raw.get("desc_act", base.desc_act if base else False)
    for key, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):
            raise InputError(f"{source}: {key} {value!r} is not a boolean")
    return ModuleConfig(bits, group_size, sym, desc_act)


def _dynamic_rules(dynamic: object, source: str) -> tuple[tuple[str, re.Pattern, dict], ...]:
    if dynamic is None:
        return ()
    if not isinstance(dynamic, dict):
        raise InputError(f"{source}: dynamic is not an object")
    rules = []
    for key, overrides in dynamic.items():
        negative = key.startswith("-:")
        pattern = key[2:] if negative or key.startswith("+:") else key
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise InputError(f"{source}: dynamic[{key!r}] is not a valid regex ({e})") from None
        if not negative and not isinstance(overrides, dict):
            raise InputError(f"{source}: dynamic[{key!r}] is not an object")
        rules.append((key, compiled, None if negative else overrides))
    return tuple(rules)


# ------------------------------------------------------------------------------------------- reader
class GPTQReader(Reader):
    format = "gptq"
    stack_experts = True  # MoE experts → one [E, N, K] layer (npuconv.experts)

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self.config = GPTQConfig.from_checkpoint(checkpoint)
        for note in self.config.warnings:
            self.warn(note)
        self.checkpoint_format = self.config.declared_format  # replaced by the detected one in scan()

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        method = checkpoint.quantization_config.get("quant_method")
        if isinstance(method, str) and method.lower() in QUANT_METHODS:
            return True
        raw = checkpoint.read_json("quantize_config.json")
        if raw is None or "bits" not in raw:
            return False
        method = raw.get("quant_method", "gptq")
        return isinstance(method, str) and method.lower() in QUANT_METHODS

    def consumed_files(self) -> list[str]:
        return ["quantize_config.json"] if (self.ckpt.root / "quantize_config.json").is_file() else []

    def summary(self) -> dict:
        self.linear_specs()  # runs the v1/v2 detection
        base = self.config.base
        return {
            "checkpoint_format": self.checkpoint_format,
            "declared_checkpoint_format": self.config.declared_format,
            "bits": base.bits,
            "group_size": base.group_size,
            "desc_act": base.desc_act,
            "sym": base.sym,
        }

    # ------------------------------------------------------------------------------- scanning
    def scan(self) -> list[LinearSpec]:
        prefixes = module_prefixes(self.ckpt.names(), ".qweight")
        if not prefixes:
            raise InputError(f"{self.config.source} declares GPTQ, but no '*.qweight' tensor is in the checkpoint")
        specs = []
        for prefix in prefixes:
            settings = self.config.for_module(prefix)
            if settings is None:
                raise InputError(
                    f"tensor '{prefix}.qweight': the module is excluded from quantization by a '-:' dynamic rule "
                    f"of {self.config.source}, but it is stored quantized"
                )
            specs.append(self._spec(prefix, settings))
        self._check_lm_head(prefixes)
        self.checkpoint_format = self._detect(specs)
        return [replace(spec, source_scheme=self.checkpoint_format) for spec in specs]

    def _spec(self, prefix: str, settings: ModuleConfig) -> LinearSpec:
        bits = settings.bits
        names = {part: f"{prefix}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        for part in ("qzeros", "scales"):
            self.require(names[part], f"GPTQ module '{prefix}'")
        qweight = self.ckpt.info(names["qweight"])
        _expect_int32(qweight, 2)
        rows, n = qweight.shape
        if rows * 32 % bits:
            raise InputError(
                f"tensor '{qweight.name}': {rows} rows of 32-bit words do not hold a whole number of {bits}-bit codes"
            )
        k = rows * 32 // bits
        if k == 0 or n == 0:
            raise InputError(f"tensor '{qweight.name}': shape {list(qweight.shape)} holds no weights")
        scales = self.ckpt.info(names["scales"])
        if len(scales.shape) != 2 or not is_float(scales.dtype_name):
            raise InputError(f"tensor '{scales.name}': expected a 2-D float tensor [G, N], got {scales.dtype} {list(scales.shape)}")
        if scales.shape[1] != n:
            raise InputError(f"tensor '{scales.name}': {scales.shape[1]} columns, but qweight has N = {n}")
        size = k if settings.group_size == -1 else settings.group_size
        if k % size:
            raise InputError(f"tensor '{qweight.name}': group_size {size} does not divide in_features K = {k}")
        groups = k // size
        if scales.shape[0] != groups:
            raise InputError(
                f"tensor '{scales.name}': {scales.shape[0]} groups, but K = {k} and group_size {size} give {groups}"
            )
        qzeros = self.ckpt.info(names["qzeros"])
        _expect_int32(qzeros, 2)
        expected = (groups, math.ceil(n * bits / 32))
        if tuple(qzeros.shape) != expected:
            raise InputError(f"tensor '{qzeros.name}': shape {list(qzeros.shape)}, expected {list(expected)} for N = {n}, {bits} bits")
        act_order = self._act_order(names["g_idx"], k, groups, size, settings.desc_act)
        bias = self.ckpt.info(names["bias"]) if self.ckpt.has(names["bias"]) else None
        present = tuple(name for name in names.values() if self.ckpt.has(name))
        return LinearSpec(
            name=prefix,
            out_features=n,
            in_features=k,
            bits=bits,
            group_size=settings.group_size,
            symmetric=settings.sym,
            act_order=act_order,
            scale_dtype=scales.dtype_name,
            has_bias=bias is not None,
            bias_dtype=None if bias is None else bias.dtype_name,
            source_tensors=present,
        )

    def _act_order(self, name: str, k: int, groups: int, size: int, desc_act: bool) -> bool:
        """Validate ``g_idx`` (length K, values in [0, G)); True unless it is ``k // g`` (or absent)."""
        if not self.ckpt.has(name):
            if desc_act:
                raise InputError(f"tensor '{name}' is missing, but desc_act is true (the column groups are unknown)")
            return False
        info = self.ckpt.info(name)
        if is_float(info.dtype_name) or info.dtype_name == "bool" or tuple(info.shape) != (k,):
            raise InputError(f"tensor '{name}': expected an integer vector of length K = {k}, got {info.dtype} {list(info.shape)}")
        g_idx = read_ints(info)  # no torch: inspect runs this
        if k and (min(g_idx) < 0 or max(g_idx) >= groups):
            raise InputError(f"tensor '{name}': values must lie in [0, {groups}), found [{min(g_idx)}, {max(g_idx)}]")
        return any(group != column // size for column, group in enumerate(g_idx))

    def _check_lm_head(self, prefixes: list[str]) -> None:
        quantized_head = [p for p in prefixes if p.split(".")[-1] == "lm_head"]
        if quantized_head and not self.config.lm_head:
            self.warn(f"'{quantized_head[0]}' is stored quantized although {self.config.source} has lm_head: false; reading it as quantized")
        if self.config.lm_head and not quantized_head:
            self.warn(f"{self.config.source} has lm_head: true, but no quantized lm_head is in the checkpoint")

    # ------------------------------------------------------------------------------- detection
    def _detect(self, specs: list[LinearSpec]) -> str:
        """v1 or v2 from the first modules' zero points (rule in the module docstring)."""
        evidence = ZeroPointEvidence()
        for spec in specs[:DETECT_MAX_MODULES]:
            qzeros = self.ckpt.info(f"{spec.name}.qzeros")
            if spec.symmetric:  # exact, and without torch
                found = symmetric_verdict(read_bytes(qzeros), qzeros.shape[1], spec.bits, spec.out_features)
                if found is not None:
                    verdict, value = found
                    return self._settle(verdict, f"every zero-point field of symmetric '{spec.name}' is {value}")
            fields = unpack_zero_fields(self.tensor(qzeros.name), spec.bits, spec.out_features)  # torch from here
            rows = min(spec.out_features, max(1, DETECT_CODES_PER_MODULE // spec.in_features))
            codes = unpack_qweight(self.tensor(f"{spec.name}.qweight")[:, :rows], spec.bits, spec.in_features)
            g_idx = self.tensor(f"{spec.name}.g_idx").to(torch.int64) if spec.act_order else None
            evidence.add(*group_offsets(codes, fields[:, :rows].t(), g_idx, spec.group_size, spec.bits))
            verdict = evidence.verdict()
            if verdict is not None:
                return self._settle(verdict, evidence.describe())
        declared = self.config.declared_format
        self.warn(
            f"cannot tell GPTQ v1 from v2 by the zero points ({evidence.describe()}); "
            f"using the declared checkpoint_format '{declared}'"
        )
        return declared

    def _settle(self, detected: str, why: str) -> str:
        declared = self.config.declared_format
        if detected != declared:
            self.warn(
                f"{self.config.source} declares checkpoint_format '{declared}', but the zero points are "
                f"{detected} ({why}); reading them as {detected}"
            )
        return detected

    # ------------------------------------------------------------------------------- loading
    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        self.linear_specs()  # the format is detected in scan()
        prefix, bits = spec.name, spec.bits
        qweight = self.tensor(f"{prefix}.qweight")
        packed = None
        if model.PACKED_CODES and bits == 4 and spec.out_features % 8 == 0 and spec.in_features % 8 == 0:
            codes, packed = None, int4_words_k_to_n(qweight, NIBBLE_HIGH_BITS)  # word moves only, no unpacked codes
        else:
            codes = unpack_qweight(qweight, bits, spec.in_features)
        qzeros = self.tensor(f"{prefix}.qzeros")
        zero = decode_zero_points(qzeros, bits, spec.out_features, self.checkpoint_format)
        if self.checkpoint_format == V1 and bits != 3:
            wrapped = int((unpack_zero_fields(qzeros, bits, spec.out_features) == (1 << bits) - 1).sum())
            if wrapped:
                self.warn(
                    f"tensor '{prefix}.qzeros': {wrapped} v1 field(s) read {(1 << bits) - 1} (zero point 0); decoded "
                    "word-wise as GPTQModel writes them, per-field decoders (AutoGPTQ, exllama, vLLM) read the "
                    "next zero point of each such word one lower"
                )
        if spec.symmetric:
            midpoint = 1 << (bits - 1)
            if not bool((zero == midpoint).all()):
                found = sorted({int(v) for v in zero.unique()[:8]})
                raise InputError(
                    f"tensor '{prefix}.qzeros': the module is symmetric (sym: true) but its zero points are not all "
                    f"{midpoint} (found {found}, read as {self.checkpoint_format})"
                )
            zero = None
        scales = self.tensor(f"{prefix}.scales")
        self.check_scale(f"{prefix}.scales", scales)
        scale = scales.t().contiguous()
        g_idx = self.tensor(f"{prefix}.g_idx").to(torch.int32) if spec.act_order else None
        bias = self.tensor(f"{prefix}.bias") if spec.has_bias else None
        return QuantizedLinear(spec=spec, qweight=codes, scale=scale, zero=zero, g_idx=g_idx, bias=bias, packed_kn=packed)


def _expect_int32(info, ndim: int) -> None:
    if info.dtype_name != "int32":
        raise UnsupportedError(f"tensor '{info.name}': dtype {info.dtype}, only int32-packed GPTQ is supported")
    if len(info.shape) != ndim:
        raise InputError(f"tensor '{info.name}': expected {ndim} dimensions, got shape {list(info.shape)}")


