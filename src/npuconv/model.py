"""The canonical, format-free form of a quantized linear layer (readers produce it, writers consume it).

One rule dequantizes every layer::

    weight[..., n, k] = (decode(qweight[..., n, k]) - zero[..., n, g(k)]) * scale[..., n, g(k)]

- ``n`` output feature (N = out_features), ``k`` input feature (K = in_features); an optional
  leading ``E`` dimension stacks MoE experts.
- ``g(k) = g_idx[k]`` when ``g_idx`` is given (GPTQ act-order), else ``k // group_size``;
  ``group_size == -1`` means one group spanning K (per-channel).
- ``decode``: integer codes are *unsigned* ``uint8`` in ``[0, 2**bits)``; FP8 codes are
  ``torch.float8_e4m3fn``; FP4 codes are E2M1 nibbles ``0..15``, one per ``uint8`` (bit 3 sign,
  bits 0–2 index into ``[0, .5, 1, 1.5, 2, 3, 4, 6]``).
- ``zero``: integer zero points in the same unsigned code domain as ``int16``; ``None`` means
  symmetric, i.e. ``2**(bits-1)`` for integer codes and ``0`` for float codes. So a signed code
  ``s`` (compressed-tensors, msModelSlim) is stored as ``s + 2**(bits-1)``.
- ``scale``: ``[..., N, G]`` float (fp16/bf16/fp32 exactly as the source stores it), or ``uint8``
  E8M0 exponents (``2**(byte-127)``) for MX formats. Every FP4 / E8M0 decode here is
  :mod:`npuconv.layouts`' (one rule, with its switches such as ``E8M0_BYTE0_IS_ZERO``). ``global_scale`` (NVFP4) divides the scale:
  the effective scale is ``scale.float() / global_scale`` (that order, fp32, as compressed-tensors).
- ``scale_stages`` (optional): two float32 factors ``(group [..., N, G], channel [..., N, 1])``
  whose float32 product *is* ``scale`` (msModelSlim's legacy two-stage W4A8_DYNAMIC). Writers and
  kernels use ``scale``; :func:`dequantize` applies the factors in the source tool's order,
  ``((code - zero) * group) * channel``, so a float conversion is bit-exact with the tool (one
  product of an exact integer, where ``(code - zero) * fl(group * channel)`` rounds twice).

Packed 4-bit codes (a fast path, same values): a reader of a 4-bit integer format may hand over
the codes still packed, as ``packed_kn`` int32 ``[K, N/8]`` whose word ``[k, j]`` holds
``qweight[8j + t, k] - 8`` as a two's-complement nibble (the unsigned code with bit 3 flipped,
:data:`npuconv.packing.NIBBLE_HIGH_BITS`) in bits ``4t..4t+3`` — the LSB-first bitstream along N
of the ``[K, N]`` signed code matrix: Ascend's int4pack, order and values. A target that writes
int4pack uses the words as they are; everything else reads ``qweight``, unpacked from them on
first access.
:data:`PACKED_CODES` turns the path off (the tests compare both).

Signed 8-bit codes (a fast path, same values): a reader of signed int8 storage (compressed-tensors,
msModelSlim) may hand over the stored bytes as ``signed`` int8 ``[..., N, K]`` = ``qweight - 128``
(two's complement: the byte ``s`` is the code ``s ^ 0x80``). Targets that write signed int8 take
:meth:`QuantizedLinear.signed_codes`, which is those bytes untouched; ``qweight`` is made from them
only if something reads it. :data:`PACKED_CODES` turns this path off too.

How each source format maps onto this rule is documented in its reader module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from npuconv.lazy_torch import torch

from npuconv.io.safetensors_io import name_of
from npuconv.packing import NIBBLE_HIGH_BITS, unpack_bitstream
from npuconv import layouts

INT = "int"
FP8_E4M3 = "fp8_e4m3"
FP4_E2M1 = "fp4_e2m1"

SCALE_FLOAT = "float"
SCALE_E8M0 = "e8m0"


@dataclass(frozen=True)
class ActivationQuant:
    """How a layer's input activations are quantized at run time (None on a spec: not quantized)."""

    kind: str  # INT, FP8_E4M3, FP4_E2M1 (element type of the quantized activations)
    bits: int
    dynamic: bool  # per-token scales computed at run time; False: static input_scale in the checkpoint
    strategy: str = "token"  # "token", "tensor", "group" (MX: group of 32)
    symmetric: bool = True


@dataclass(frozen=True)
class LinearSpec:
    """Everything about a quantized linear except its tensors (cheap; used by inspect and planning)."""

    name: str  # module prefix, e.g. "model.layers.0.mlp.down_proj"
    out_features: int  # N
    in_features: int  # K
    bits: int
    group_size: int  # -1: per-channel (one group of K)
    symmetric: bool
    act_order: bool = False
    weight_format: str = INT
    scale_format: str = SCALE_FLOAT
    scale_dtype: str = "float16"  # dtype name (:data:`npuconv.io.safetensors_io.DTYPES`)
    activation: ActivationQuant | None = None
    has_bias: bool = False
    bias_dtype: str | None = None  # dtype name of the stored bias (None: same as scale_dtype)
    has_global_scale: bool = False
    num_experts: int | None = None  # E for a stacked MoE expert tensor [E, N, K]
    source_scheme: str = ""  # the source format's own label, e.g. "gptq_v1", "W8A8_DYNAMIC"
    source_tensors: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # dtypes are names, so a spec is made and compared without importing torch; a torch.dtype
        # given here (a reader that holds the tensor) is stored as its name
        for attribute in ("scale_dtype", "bias_dtype"):
            value = getattr(self, attribute)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, attribute, name_of(value))

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size == -1 else -(-self.in_features // self.group_size)

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def scheme(self) -> str:
        """Short scheme label: ``w4a16``, ``w8a8_dynamic``, ``w8a8_static``, ``w8a8_mxfp8``, ``w4a8_mxfp``, …"""
        act = self.activation
        if self.weight_format == INT:
            if act is None:
                return f"w{self.bits}a16"
            return f"w{self.bits}a{act.bits}_{'dynamic' if act.dynamic else 'static'}"
        if self.scale_format == SCALE_E8M0:
            weight = "mxfp8" if self.weight_format == FP8_E4M3 else "mxfp4"
            if act is None:
                return f"w{self.bits}a16_{weight}"
            return f"w{self.bits}a{act.bits}_{'mxfp' if weight == 'mxfp4' and act.bits == 8 else weight}"
        if self.weight_format == FP4_E2M1:
            # float block scales: NVFP4 (fp8 scales + a global divisor) or dual-level MXFP4 (fp32 products
            # level0 · 2**e of a 512-block scale and an E8M0 32-block scale, see npuconv.offline)
            kind = "nvfp4" if self.has_global_scale else "mxfp4_dual"
            return f"w4a16_{kind}" if act is None else f"w4a{act.bits}_{kind}"
        return "w8a16_fp8" if act is None else f"w8a{act.bits}_fp8"

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return () if self.num_experts is None else (self.num_experts,)


PACKED_CODES = True  # readers may set QuantizedLinear.packed_kn / .signed (False: always canonical codes)


@dataclass
class QuantizedLinear:
    """The tensors of one quantized linear, in canonical form (see the module docstring)."""

    spec: LinearSpec
    qweight: torch.Tensor  # [..., N, K]; pass None with packed_kn (then unpacked on first access)
    scale: torch.Tensor  # [..., N, G]
    zero: torch.Tensor | None = None  # [..., N, G] int16, unsigned code domain; None: symmetric
    g_idx: torch.Tensor | None = None  # [K] int32 (or [E, K]); None: k // group_size
    bias: torch.Tensor | None = None  # [..., N]; always set when spec.has_bias
    global_scale: torch.Tensor | None = None  # [...,1] fp32 divisor of scale (NVFP4)
    input_scale: torch.Tensor | None = None  # static activation scale, fp32 [1]
    # static activation zero point, fp32 [1], integer-valued, in the *signed* int8 domain:
    # x_q = clamp(round(x / input_scale) + input_zero, -128, 127)  (CT input_zero_point, msModelSlim input_offset)
    input_zero: torch.Tensor | None = None
    # the same codes, 4-bit integer only, signed and packed along N: int32 [K, N/8] (module docstring); whoever
    # replaces qweight must drop it
    packed_kn: torch.Tensor | None = None
    # the same codes, 8-bit integer only, as stored signed int8 [..., N, K] = qweight - 128 (module
    # docstring); whoever replaces qweight must drop it
    signed: torch.Tensor | None = None
    # (group [..., N, G], channel [..., N, 1]) float32 factors of ``scale``, applied in this order by
    # dequantize() (see the module docstring); None: ``scale`` alone
    scale_stages: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> "QuantizedLinear":
        """The same layer with every tensor moved to ``device``."""
        moved = {
            name: getattr(self, name).to(device) if isinstance(getattr(self, name), torch.Tensor) else getattr(self, name)
            for name in ("qweight", "scale", "zero", "g_idx", "bias", "global_scale", "input_scale", "input_zero")
        }
        moved["packed_kn"] = moved["signed"] = None  # qweight was moved (and unpacked)
        if self.scale_stages is not None:
            moved["scale_stages"] = tuple(t.to(device) for t in self.scale_stages)
        return replace(self, **moved)

    def with_spec(self, **changes) -> "QuantizedLinear":
        return replace(self, spec=replace(self.spec, **changes))

    def group_index(self) -> torch.Tensor:
        """``g(k)`` for every input column: int64 ``[K]`` (or ``[E, K]``)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.spec.in_features
        return torch.arange(k, device=self.qweight.device) // self.spec.effective_group_size

    def effective_scale(self) -> torch.Tensor:
        """The float32 scale ``[..., N, G]`` applied to ``code - zero``."""
        if self.spec.scale_format == SCALE_E8M0:
            return layouts.e8m0_decode(self.scale)
        scale = self.scale.float()
        if self.global_scale is not None:
            scale = scale / self.global_scale.float().reshape(*self.spec.batch_shape, 1, 1)
        return scale

    def signed_codes(self) -> torch.Tensor:
        """int8 ``[..., N, K]``: the integer codes minus ``2**(bits-1)`` (two's complement), as
        signed-int8 kernels and msModelSlim store them; the reader's stored bytes when it handed
        them over (``signed``), else computed from ``qweight``. Integer codes of ≤ 8 bits only."""
        if self.signed is not None:
            return self.signed
        return offset_codes(self.qweight, 2 ** (self.spec.bits - 1))

    def decoded_codes(self) -> torch.Tensor:
        """float32 ``decode(qweight)`` minus nothing (no zero point applied)."""
        return decode_codes(self.qweight, self.spec.weight_format)

    def zero_points(self) -> torch.Tensor:
        """float32 zero points ``[..., N, G]`` (the symmetric default expanded)."""
        if self.zero is not None:
            return self.zero.float()
        midpoint = float(2 ** (self.spec.bits - 1)) if self.spec.weight_format == INT else 0.0
        return torch.full(self.scale.shape, midpoint, device=self.scale.device)


def offset_codes(codes: torch.Tensor, midpoint: int) -> torch.Tensor:
    """int8 ``codes - midpoint`` (``midpoint`` ≤ 128) of unsigned codes below ``2 * midpoint``. uint8
    codes wrap in their own byte (the int8 view of ``q - m mod 256`` is ``q - m``): one byte per code,
    no int16 temporaries; other integer dtypes go through int16."""
    if codes.dtype == torch.uint8:
        return (codes - midpoint).view(torch.int8)
    return (codes.to(torch.int16) - midpoint).to(torch.int8)


def _get_qweight(layer: QuantizedLinear) -> torch.Tensor:
    if layer._qweight is None:
        if layer.packed_kn is not None:
            n = layer.spec.out_features
            unsigned = layer.packed_kn ^ NIBBLE_HIGH_BITS
            layer._qweight = unpack_bitstream(unsigned, 4, n).transpose(-1, -2)  # [N, K] view of [K, N]
        elif layer.signed is not None:
            layer._qweight = layer.signed.view(torch.uint8) ^ 0x80  # s + 128 wraps onto s ^ 0x80 in a byte
        else:
            raise ValueError(f"{layer.spec.name}: a layer needs qweight, packed_kn or signed")
    return layer._qweight


def _set_qweight(layer: QuantizedLinear, value: torch.Tensor | None) -> None:
    layer._qweight = value


# qweight is a dataclass field (constructor argument, replace(), repr) backed by this property, so
# a layer built from packed_kn or signed alone makes its codes only if something reads them
QuantizedLinear.qweight = property(_get_qweight, _set_qweight)  # type: ignore[assignment]


def decode_codes(codes: torch.Tensor, weight_format: str) -> torch.Tensor:
    """float32 values of canonical codes (unsigned ints, FP8 e4m3, or E2M1 nibbles: :func:`layouts.fp4_decode`)."""
    if weight_format == INT:
        return codes.float()
    if weight_format == FP8_E4M3:
        return codes.float()
    if weight_format == FP4_E2M1:
        return layouts.fp4_decode(codes)
    raise ValueError(f"unknown weight format {weight_format!r}")


# float32 temporaries per chunk of output rows: 4 MiB each, below glibc's mmap threshold
# (npuconv.memory), so they are recycled from the heap instead of mapped and zero-filled anew for
# every op — GPTQ → float, 1.3 GB, 2 cores: 16 MiB chunks 24.4 s (24.5 s of system time), 4 MiB 17–19 s
DEQUANT_CHUNK_ELEMENTS = 1 << 20


def dequantize(layer: QuantizedLinear, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float weight ``[..., N, K]`` by the canonical rule, computed in float32 then cast to ``dtype``
    (default float32).

    Done as ``(code - zero) * scale`` with one float32 product per element, which is exactly what
    GPTQModel, AutoAWQ, compressed-tensors and msModelSlim compute for integer and MX formats.
    Large layers are computed in chunks of output rows straight into the result, so the float32
    temporaries stay at :data:`DEQUANT_CHUNK_ELEMENTS` whatever the layer size.
    """
    dtype = torch.float32 if dtype is None else dtype
    n, k = layer.qweight.shape[-2], layer.spec.in_features
    rows = max(1, DEQUANT_CHUNK_ELEMENTS // max(1, k))
    if n <= rows:
        return _dequantize_rows(layer, dtype)
    out = torch.empty(layer.qweight.shape, dtype=dtype, device=layer.qweight.device)
    for start in range(0, n, rows):
        out[..., start : start + rows, :] = _dequantize_rows(_row_slice(layer, start, start + rows), dtype)
    return out


def _row_slice(layer: QuantizedLinear, start: int, stop: int) -> QuantizedLinear:
    """Output rows ``[start, stop)`` of a layer (views; group assignment and global scale unchanged)."""

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[..., start:stop, :]

    stages = None if layer.scale_stages is None else tuple(rows(t) for t in layer.scale_stages)
    return replace(
        layer, qweight=rows(layer.qweight), scale=rows(layer.scale), zero=rows(layer.zero), packed_kn=None, signed=None,
        scale_stages=stages
    )


def _dequantize_rows(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    values = layer.decoded_codes()
    scale = layer.effective_scale()
    channel = None
    if layer.scale_stages is not None:  # ((code - zero) * group) * channel, the source tool's order
        scale, channel = layer.scale_stages[0].float(), layer.scale_stages[1].float()
    zero = None if layer.zero is None and layer.spec.weight_format != INT else layer.zero_points()
    if layer.g_idx is None and layer.spec.in_features % layer.spec.effective_group_size == 0:
        # contiguous groups: view K as [G, g] and broadcast, no [N, K] scale/zero expansion
        grouped = values.unflatten(-1, (scale.shape[-1], -1))
        if zero is not None:
            grouped = grouped - zero.unsqueeze(-1)
        weight = (grouped * scale.unsqueeze(-1)).flatten(-2)
        return (weight if channel is None else weight * channel).to(dtype)
    groups = layer.group_index()
    if groups.dim() == 1:
        scale = scale[..., groups]
        zero = None if zero is None else zero[..., groups]
    else:  # per-expert g_idx [E, K]
        index = groups.unsqueeze(-2).expand(*scale.shape[:-1], groups.shape[-1])
        scale = scale.gather(-1, index)
        zero = None if zero is None else zero.gather(-1, index)
    weight = values * scale if zero is None else (values - zero) * scale
    return (weight if channel is None else weight * channel).to(dtype)


def spec_to_dict(spec: LinearSpec) -> dict:
    """JSON-able form of a spec (stored per layer in ``npuconv.json``)."""
    act = spec.activation
    return {
        "name": spec.name,
        "out_features": spec.out_features,
        "in_features": spec.in_features,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "act_order": spec.act_order,
        "weight_format": spec.weight_format,
        "scale_format": spec.scale_format,
        "scale_dtype": spec.scale_dtype,
        "activation": None if act is None else {
            "kind": act.kind, "bits": act.bits, "dynamic": act.dynamic,
            "strategy": act.strategy, "symmetric": act.symmetric,
        },
        "has_bias": spec.has_bias,
        "bias_dtype": spec.bias_dtype,
        "has_global_scale": spec.has_global_scale,
        "num_experts": spec.num_experts,
        "source_scheme": spec.source_scheme,
    }


def spec_from_dict(data: dict, source_tensors: tuple[str, ...] = ()) -> LinearSpec:
    """Inverse of :func:`spec_to_dict`."""
    fields = dict(data)
    act = fields.pop("activation")
    fields["activation"] = None if act is None else ActivationQuant(**act)
    return LinearSpec(**fields, source_tensors=source_tensors)
