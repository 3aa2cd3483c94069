"""Tensor layouts and number encodings of Ascend NPU-ready checkpoints (pure functions, any device).

The writers use these functions to produce NPU-ready tensors. ``verify`` and the emulated kernels
use them to decode those tensors again. Every rule cites ``docs/research/torch_npu_ops.md``
(written ``ops §x.y`` below) or ``docs/research/npu_loaders.md`` (``loaders §x.y``).

Conventions:

- "int4" values are signed two's complement in ``[-8, 7]``. Four-bit values (int4 and FP4) are
  packed LSB-first along the **last** dimension: the even element goes in the low nibble of a byte,
  and element ``8j+t`` goes in bits ``4t..4t+3`` of int32 word ``j`` (ops §0.1). The host must be
  little-endian; :mod:`npuconv.packing` checks this on import.
- E8M0 scale bytes are ``uint8`` holding a biased exponent, ``value = 2**(byte-127)`` (ops §0.2, §7).
- FP4 E2M1 codes are one ``uint8`` per element with values ``0..15`` (sign in bit 3, magnitude index in
  bits 0..2). :func:`fp4_pack` puts two per byte, the way ``float4_e2m1fn_x2`` tensors are stored.

Each choice below that rests on an uncertain fact (an [L] mark in the research notes) is a
module-level constant, so that it is easy to change. The constant's comment names the uncertainty.
"""

from __future__ import annotations

import math

from npuconv.lazy_torch import torch

from npuconv.io.safetensors_io import name_of, torch_dtype
from npuconv.packing import as_bytes, pack_nibbles, signed_nibbles, transpose_byte_blocks, unpack_nibbles

# ----------------------------------------------------------------------------------------------
# Switches for uncertain facts
# ----------------------------------------------------------------------------------------------

#: Uncertain (ops §0.2, §9.5): whether the hardware reads E8M0 byte 0 as 2**-127 (spec, golden) or as 0.0
#: (one skipped OPP test). We assume 2**-127, which is the value a float32 subnormal can represent exactly.
E8M0_BYTE0_IS_ZERO = False

#: Uncertain (ops §4.3 and §9.4): whether the kernel masks int64 scales to FP19 (``bits & 0xFFFFE000``)
#: when bit 46 is not set. We assume it does, as the golden decode ``u64_to_deq_scale`` always masks.
INT64_SCALE_FP19 = True

#: Uncertain (ops §5.2 "Quirk"): the dynamic_mx_quant kernel zeroes every output of a block whose E8M0
#: byte is 0, while the golden divides by 2**-127. We follow the golden. Set this to True to get the kernel.
MX_ZERO_SCALE_FLUSHES = False

#: Uncertain (ops §0.4, §5.2): the golden's "floor" FP4 round mode. We assume ``floor`` of the *signed*
#: scaled mantissa, i.e. toward -inf like AscendC CAST_FLOOR. The alternative is truncation toward zero.
FP4_FLOOR_TOWARD_NEG_INF = True

# ----------------------------------------------------------------------------------------------
# torch_npu dtype markers (ops §0.2)
# ----------------------------------------------------------------------------------------------

#: torch_npu custom dtype ids (aclDataType + 256). Tensors of these types travel as ``torch.uint8``.
NPU_DTYPE_IDS: dict[str, int] = {
    "int4": 285,
    "hifloat8": 290,
    "float8_e5m2": 291,
    "float8_e4m3fn": 292,
    "float8_e8m0fnu": 293,
    "float4_e2m1fn_x2": 296,
    "float4_e1m2fn_x2": 297,
}
_NPU_DTYPE_NAMES = {v: k for k, v in NPU_DTYPE_IDS.items()}
#: torch dtype names that differ from their canonical name (the rest are the same: ``torch.int8`` → "int8")
_TORCH_DTYPE_ALIASES = {"quint4x2": "int4"}


def npu_dtype_name(marker: object) -> str | None:
    """Canonical name of a dtype marker, as passed to ``x1_dtype=``, ``dst_type=``, ``weight_dtype=`` etc.

    Accepts a torch_npu custom id (``296``), a name (``"float4_e2m1fn_x2"``), or a ``torch.dtype``.
    Returns ``None`` for ``None``. Names follow ops §0.2. ``torch.quint4x2`` maps to ``"int4"``, because
    the values are signed int4 (ops §0.1).
    """
    if marker is None:
        return None
    if isinstance(marker, torch.dtype):
        name = name_of(marker)
        return _TORCH_DTYPE_ALIASES.get(name, name)
    if isinstance(marker, bool):
        raise ValueError(f"not a dtype marker: {marker!r}")
    if isinstance(marker, int):
        if marker in _NPU_DTYPE_NAMES:
            return _NPU_DTYPE_NAMES[marker]
        raise ValueError(f"unknown torch_npu dtype id {marker}")
    if isinstance(marker, str):
        name = marker.removeprefix("torch_npu.").removeprefix("torch.")
        return "int4" if name == "quint4x2" else name
    raise ValueError(f"not a dtype marker: {marker!r}")


# ----------------------------------------------------------------------------------------------
# int4 packing (ops §0.1, §1; loaders §1.1, §1.2)
# ----------------------------------------------------------------------------------------------


def int4pack(values: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values into int32 words along the last dim (``npu_convert_weight_to_int4pack``).

    ``values``: int8 or int32 (any integer dtype) ``[..., R, C]``, values in ``[-8, 7]``. ``C % 8 == 0``.
    Returns int32 ``[..., R, C/8]`` with element ``8j+t`` in bits ``4t..4t+3`` of word ``j``. Each element
    is its two's-complement nibble ``v & 0xF`` (ops §1: values outside the range wrap and are not
    saturated). Rule: ops §0.1 int32 rule and §1 Output. Built from bytes with
    :func:`npuconv.packing.pack_nibbles` and a little-endian ``view(int32)``, which is bit-identical
    to the op (loaders §1.2). No int32 temporary of the unpacked size is made.
    """
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"int4pack needs an integer tensor, got {values.dtype}")
    if values.dim() < 1 or values.shape[-1] % 8:
        raise ValueError(f"int4pack: last dim must be a multiple of 8, got shape {tuple(values.shape)}")
    return pack_nibbles(values).contiguous().view(torch.int32)


def int4unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int4pack`: int32 ``[..., R, W]`` → signed int8 ``[..., R, 8W]`` in ``[-8, 7]``.

    Nibble ``t`` of word ``j`` (bits ``4t..4t+3``) becomes element ``8j+t`` (ops §0.1). The tensor is read
    along its *logical* last dim. Pass ``w.transpose(-1, -2)`` to unpack a transposed view.
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"int4unpack needs int32, got {packed.dtype}")
    return signed_nibbles(unpack_nibbles(as_bytes(packed)))


def int4pack_bytes(values: torch.Tensor) -> torch.Tensor:
    """Two signed int4 per byte along the last dim: int ``[..., 2m]`` → int8 ``[..., m]``.

    This is the msModelSlim "1.0.0" / vllm-ascend ``pack_int4_to_int8`` layout: the even element goes
    in the low nibble (ops §0.1 byte rule, loaders §1.2). ``.view(torch.int32)`` of the result (when
    ``m % 4 == 0``) equals :func:`int4pack` of the same values.
    """
    return pack_nibbles(values).view(torch.int8)


def int4unpack_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int4pack_bytes`: int8/uint8 ``[..., m]`` → signed int8 ``[..., 2m]``."""
    return signed_nibbles(unpack_nibbles(packed))


# ----------------------------------------------------------------------------------------------
# FRACTAL_NZ (ops §3)
# ----------------------------------------------------------------------------------------------

#: C0 used for fp32/int32 by default (ops §3.2 "float32 will cast to float16": 16 elements, 64 bytes).
FP32_NZ_C0 = 16

_C0_16 = {"float16", "bfloat16", "int16"}  # dtype names
_C0_32 = {"int8", "uint8", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}


def nz_c0(dtype: torch.dtype, *, int4_packed: bool = False) -> int:
    """C0 (the inner block width, in elements of ``dtype``) of FRACTAL_NZ on Atlas A2/A3 (ops §3.2).

    fp16/bf16/int16 → 16. int8/uint8/fp8 → 32 (a uint8 carrying two 4-bit values is treated as bytes).
    fp32/int32 → :data:`FP32_NZ_C0` (16, the torch_npu default). ``int4_packed=True`` (int32 from
    :func:`int4pack`, as laid out by ``npu_convert_weight_to_int4pack`` on an NZ input, ops §1 step 3)
    → 8. The 950 variants (NZ_C0_x, ops §3.2 "950") are not covered.
    """
    if int4_packed:
        if dtype != torch.int32:
            raise ValueError(f"int4_packed NZ needs int32, got {dtype}")
        return 8
    if name_of(dtype) in _C0_16:
        return 16
    if name_of(dtype) in _C0_32:
        return 32
    if dtype in (torch.float32, torch.int32):
        return FP32_NZ_C0
    raise ValueError(f"no FRACTAL_NZ C0 for dtype {dtype}")


def nz_storage_shape(shape: tuple[int, ...] | torch.Size, c0: int) -> tuple[int, ...]:
    """NZ storage shape of an ND shape ``[*B, R, C]``: ``[*B, ceil(C/c0), ceil(R/16), 16, c0]`` (ops §3.1)."""
    if len(shape) < 2:
        raise ValueError(f"FRACTAL_NZ needs at least 2 dims, got {tuple(shape)} (ops §3.2: rank-1 stays ND)")
    *batch, rows, cols = shape
    return (*batch, math.ceil(cols / c0), math.ceil(rows / 16), 16, c0)


def nd_to_nz(t: torch.Tensor, c0: int) -> torch.Tensor:
    """ND ``[*B, R, C]`` → FRACTAL_NZ storage ``[*B, ceil(C/c0), ceil(R/16), 16, c0]``, contiguous.

    ``nz[*b, c1, r1, r0, k] = t[*b, r1*16 + r0, c1*c0 + k]``, and padding positions are 0 (ops §3.1).
    Batch dims are kept in front, so each expert of ``[E, K, N]`` is tiled on its own. Any dtype works.
    Choose ``c0`` with :func:`nz_c0`.
    """
    if t.dim() < 2:
        raise ValueError(f"FRACTAL_NZ needs at least 2 dims, got shape {tuple(t.shape)}")
    *batch, rows, cols = t.shape
    r1, c1 = math.ceil(rows / 16), math.ceil(cols / c0)
    pad_r, pad_c = r1 * 16 - rows, c1 * c0 - cols
    if pad_r or pad_c:
        padded = t.new_zeros((*batch, r1 * 16, c1 * c0))
        padded[..., :rows, :cols] = t
        t = padded
    source = t.transpose(-1, -2)
    if t.element_size() == 1 and c0 == 32 and not (pad_r or pad_c) and source.is_contiguous() and source.storage_offset() % 8 == 0:
        return _bytes_nz_of_transpose(source).view(t.dtype).view(*batch, c1, r1, 16, c0)
    nb = len(batch)
    tiles = t.reshape(*batch, r1, 16, c1, c0)
    return tiles.permute(*range(nb), nb + 2, nb, nb + 1, nb + 3).contiguous()


# source bytes transposed at a time by _bytes_nz_of_transpose: its scratch stays in cache, and a
# 45 MB layer takes ~20 chunks (best of 1–8 MiB, one 11008 × 4096 int8 layer, one core)
NZ_CHUNK_BYTES = 2 << 20


def _bytes_nz_of_transpose(s: torch.Tensor) -> torch.Tensor:
    """FRACTAL_NZ (c0 = 32) of ``s.T`` for a contiguous 1-byte ``s`` ``[*B, N, K]``, N % 32 == 0 and
    K % 16 == 0: int64 words ``[*B·N/32, K/16, 16, 4]`` holding the bytes of
    ``nz[b, c1, r1, r0, k] = s[b, c1·32 + k, r1·16 + r0]`` — what :func:`nd_to_nz` of the view
    computes with one byte-granular gather, here ~2× faster (one 11008 × 4096 int8 layer, one core).

    In int64 words: source word ``[c1·32 + 8·kb + j, 2·r1 + rw]`` holds bytes ``r0 = 8·rw + i``
    (i = 0..7) of row ``c1·32 + 8·kb + j``; output word ``[c1, r1, 8·rw + i, kb]`` holds bytes
    ``k = 8·kb + j``. So the words are gathered 8 bytes at a time to ``[j, c1, r1, rw, kb]``, each
    8 × 8 byte matrix (the 8 words along ``j``) is transposed in place
    (:func:`npuconv.packing.transpose_byte_blocks`), and the words are placed at ``[c1, r1, rw, i, kb]``
    — one band of 32 source rows after another, :data:`NZ_CHUNK_BYTES` at a time.
    """
    k = s.shape[-1]
    bands, r1 = s.numel() // (32 * k), k // 16
    source = as_bytes(s).view(torch.int64).view(bands, 4, 8, r1, 2)  # [c1, kb, j, r1, rw]
    out = torch.empty(bands, r1, 2, 8, 4, dtype=torch.int64)  # [c1, r1, rw, i, kb]
    per_chunk = max(1, NZ_CHUNK_BYTES // (32 * k))
    scratch = torch.empty(8 * min(per_chunk, bands) * r1 * 8, dtype=torch.int64)
    for first in range(0, bands, per_chunk):
        count = min(per_chunk, bands - first)
        words = scratch[: 8 * count * r1 * 8].view(8, -1)
        words.view(8, count, r1, 2, 4).copy_(source[first : first + count].permute(2, 0, 3, 4, 1))
        transpose_byte_blocks(words)
        out[first : first + count].copy_(words.view(8, count, r1, 2, 4).permute(1, 2, 3, 0, 4))
    return out


def nz_to_nd(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`nd_to_nz`: storage ``[*B, C1, R1, 16, c0]`` → contiguous ND ``[*B, rows, cols]``.

    ``c0`` is read from the last storage dim. Padding is dropped (ops §3.1).
    """
    if storage.dim() < 4 or storage.shape[-2] != 16:
        raise ValueError(f"not a FRACTAL_NZ storage shape: {tuple(storage.shape)}")
    *batch, c1, r1, _, c0 = storage.shape
    if rows > r1 * 16 or cols > c1 * c0:
        raise ValueError(f"NZ storage {tuple(storage.shape)} cannot hold a {rows}x{cols} matrix")
    nb = len(batch)
    nd = storage.permute(*range(nb), nb + 1, nb + 2, nb, nb + 3).reshape(*batch, r1 * 16, c1 * c0)
    return nd[..., :rows, :cols].contiguous()


# ----------------------------------------------------------------------------------------------
# MX scale layouts (ops §4.5, §5.2; loaders §3.11)
# ----------------------------------------------------------------------------------------------


def _pad_blocks_even(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8, got {scale.dtype}")
    if scale.shape[-1] % 2:
        scale = torch.nn.functional.pad(scale, (0, 1), value=0)  # ops §4.5: block count padded to even with byte 0
    return scale


def mx_scale_pairs(scale: torch.Tensor) -> torch.Tensor:
    """``[..., N, Kb]`` uint8 E8M0 → ``[..., N, ceil(Kb/2), 2]``, with Kb padded to even with byte 0.

    K-block ``j`` goes to ``[..., j//2, j%2]``. This is the ``pertoken_scale`` (x1) layout of
    ``npu_quant_matmul`` MX mode and the output of ``npu_dynamic_mx_quant`` on the tail axis (ops §4.5, §5.2).
    sglang keeps weight scales in this layout and passes a ``transpose(-3, -2)`` view (loaders §3.11).
    Returns a contiguous tensor.
    """
    padded = _pad_blocks_even(scale)
    return padded.reshape(*padded.shape[:-1], padded.shape[-1] // 2, 2).contiguous()


def mx_scale_unpairs(pairs: torch.Tensor, kb: int) -> torch.Tensor:
    """Inverse of :func:`mx_scale_pairs`: ``[..., N, Kb2, 2]`` → ``[..., N, kb]`` (padding dropped)."""
    if pairs.shape[-1] != 2 or kb > 2 * pairs.shape[-2]:
        raise ValueError(f"bad MX scale pairs shape {tuple(pairs.shape)} for {kb} blocks")
    return pairs.reshape(*pairs.shape[:-2], -1)[..., :kb].contiguous()


def mx_scale_to_npu(scale: torch.Tensor) -> torch.Tensor:
    """Checkpoint weight scale ``[..., N, Kb]`` uint8 → vllm-ascend MX layout ``[..., ceil(Kb/2), N, 2]``.

    Kb is padded to even with byte 0. The scale is reshaped to ``[..., N, Kb/2, 2]`` and dims -3/-2 are
    swapped, then made contiguous. K-block ``j`` of output channel ``n`` lands at ``[..., j//2, n, j%2]``. This is
    the ``scale`` (x2) layout of ``npu_quant_matmul`` MX mode for a non-transposed x2 (ops §4.5,
    "Pre-transposed" scale; loaders §3.11 VA steps).
    """
    return mx_scale_pairs(scale).transpose(-3, -2).contiguous()


def mx_scale_from_npu(t: torch.Tensor, kb: int) -> torch.Tensor:
    """Inverse of :func:`mx_scale_to_npu`: ``[..., Kb2, N, 2]`` → contiguous ``[..., N, kb]``.

    It reads the *logical* indices, so a ``transpose(-3, -2)`` view of sglang's ``[..., N, Kb2, 2]`` decodes too.
    """
    if t.dim() < 3 or t.shape[-1] != 2:
        raise ValueError(f"bad MX scale shape {tuple(t.shape)}")
    return mx_scale_unpairs(t.transpose(-3, -2), kb)


# ----------------------------------------------------------------------------------------------
# Quantization parameter encodings (ops §4.3; loaders §1.4)
# ----------------------------------------------------------------------------------------------

_FP19_MASK = 0xFFFFE000
_LOW32 = 0xFFFFFFFF


def _fp32_bits_u32(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns as int64 in ``[0, 2**32)``."""
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _LOW32


def _u32_to_fp32(bits: torch.Tensor) -> torch.Tensor:
    """int64 in ``[0, 2**32)`` → the fp32 with that bit pattern."""
    bits = bits & _LOW32
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def fp19_truncate(scale: torch.Tensor) -> torch.Tensor:
    """fp32 with the low 13 mantissa bits cleared (``bits & 0xFFFFE000``, "FP19"; ops §4.2, §4.3)."""
    return _u32_to_fp32(_fp32_bits_u32(scale) & _FP19_MASK)


def _rne_fp19_bits(u: torch.Tensor) -> torch.Tensor:
    """round_mode 1 of TransQuantParamV2 (ops §4.3): RNE of the mantissa to 10 bits."""
    exponent = (u >> 23) & 0xFF
    sign = u & 0x80000000
    rounded = (u + 0xFFF + ((u >> 13) & 1)) & _FP19_MASK  # carries into the exponent naturally
    out = torch.where(exponent == 0, sign, rounded)  # exponent 0 → signed zero
    return torch.where(exponent == 255, u, out)  # inf/NaN kept as they are


def trans_quant_param(scale_fp32: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0) -> torch.Tensor:
    """``npu_trans_quant_param``: fp32 scale (+ optional offset) → int64 quant parameter (ops §4.3).

    Input: ``scale_fp32`` 1-D ``(n,)`` or ``(1, n)`` (any float dtype; it is converted to fp32 first).
    ``offset`` is 1-D ``(m,)``. Lengths of 1 broadcast. Output: int64 ``(max(n, m),)``, or ``(1, n)`` if the scale is ``(1, n)``.

    Bits: low 32 = the fp32 scale with ``round_mode 0`` truncation to FP19 (``& 0xFFFFE000``) or
    ``round_mode 1`` round-half-even to 10 mantissa bits (a mantissa carry bumps the exponent,
    exponent 0 → signed zero, exponent 255 kept). Bit 46 is always set. If ``offset`` is given,
    ``clamp(rint(offset), -256, 255) & 0x1FF`` goes in bits 37..45.
    """
    if round_mode not in (0, 1):
        raise ValueError(f"round_mode must be 0 or 1, got {round_mode}")
    if scale_fp32.dim() > 2 or (scale_fp32.dim() == 2 and scale_fp32.shape[0] != 1):
        raise ValueError(f"scale must be (n,) or (1, n), got {tuple(scale_fp32.shape)}")
    as_row = scale_fp32.dim() == 2
    u = _fp32_bits_u32(scale_fp32.reshape(-1))
    low = u & _FP19_MASK if round_mode == 0 else _rne_fp19_bits(u)
    out = low | (1 << 46)
    if offset is not None:
        o = torch.round(offset.reshape(-1).to(torch.float32)).clamp(-256, 255).to(torch.int64)
        if out.numel() != o.numel() and 1 not in (out.numel(), o.numel()):
            raise ValueError(f"scale ({out.numel()}) and offset ({o.numel()}) lengths differ")
        out = out | ((o.to(out.device) & 0x1FF) << 37)
    return out.reshape(1, -1) if as_row else out


def decode_quant_param(param: torch.Tensor, *, fp19: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 quant parameter → ``(fp32 scale, fp32 offset)`` of the same shape (ops §4.3 golden decode).

    scale = the fp32 in the low 32 bits, masked with ``0xFFFFE000`` when ``fp19`` (default
    :data:`INT64_SCALE_FP19`). offset = the sign-extended 9-bit field at bits 37..45, which is 0 for
    bit-cast scales (loaders §1.4a). This decodes :func:`trans_quant_param` output and
    :func:`float_bits_to_int64` output alike.
    """
    if param.dtype not in (torch.int64, torch.uint64):
        raise ValueError(f"quant parameter must be int64, got {param.dtype}")
    u = param.view(torch.int64) if param.dtype == torch.uint64 else param
    low = u & _LOW32
    if INT64_SCALE_FP19 if fp19 is None else fp19:
        low = low & _FP19_MASK
    field = (u >> 37) & 0x1FF
    offset = torch.where(field >= 256, field - 512, field).to(torch.float32)
    return _u32_to_fp32(low), offset


def float_bits_to_int64(scale_fp32: torch.Tensor) -> torch.Tensor:
    """fp32 scale → int64 whose low 32 bits are the fp32 bit pattern (loaders §1.4a, ops §4.3 "bit-cast").

    The int32 bit pattern is **sign-extended** to int64, exactly what every producer and consumer of
    these tensors does: msModelSlim ``deqscale2int64``, vLLM-Ascend ``scale_from_float_to_int64`` and
    SGLang ``_process_scale`` all take ``np.frombuffer(fp32 bytes, int32).astype(int64)`` (loaders §1.4a).
    For a positive scale the high word is 0; a negative one gets ``0xFFFFFFFF`` (the kernel reads the
    low 32 bits only). No FP19 masking and no bit 46. Same shape; any float input is first rounded to fp32.
    A negative scale's sign extension also sets bits 37..46, which :func:`decode_quant_param` (the
    ``npu_trans_quant_param`` golden decode) reads as an offset of −1; real checkpoints have positive
    scales (readers warn about non-positive ones), so this only matters for such a warned layer.
    """
    return scale_fp32.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def int64_bits_to_float(param: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_bits_to_int64`: the fp32 held in the low 32 bits, without masking
    (the high word, sign extension or zero, is ignored, as by the kernel)."""
    return _u32_to_fp32(param.view(torch.int64) if param.dtype == torch.uint64 else param)


# ----------------------------------------------------------------------------------------------
# A8W4 grouped-matmul scale_bias (ops §6.3, loaders §3.6)
# ----------------------------------------------------------------------------------------------

#: Row-parallel ``scale_bias`` holds this many partial sums over equal K-chunks: msModelSlim's
#: ``process_scale(…, 16)`` and what vLLM-Ascend slices (16/t columns per rank, loaders §3.6).
A8W4_SCALE_BIAS_CHUNKS = 16


def a8w4_scale_bias(values: torch.Tensor, scale: torch.Tensor, chunks: int = 1,
                    accumulate: torch.dtype | None = None) -> torch.Tensor:
    """The A8W4 kernel's ``scale_bias``: ``8 · Σ_k W[n, k] · s[n, k]`` over each of ``chunks`` equal K-chunks.

    ``values``: signed int4 weight values ``[..., N, K]`` (any int dtype, any strides); ``scale``: the
    scale each weight is given by the kernel, broadcastable to ``[..., N, K]`` (``[..., N, 1]``
    per-channel). Products and sums in ``accumulate`` (default float64: exact products, the most accurate
    sum; float32: msModelSlim's own arithmetic, bit for bit), result float32 ``[..., N, chunks]``:
    chunk ``c`` covers K ``[c·K/chunks, (c+1)·K/chunks)``. The factor 8 cancels the kernel's
    ``−8·ΣW·s`` term (ops §6.3); multiplying by 8 is exact, so it commutes with the sums.
    """
    accumulate = torch.float64 if accumulate is None else accumulate
    deq = values.to(accumulate) * scale.to(accumulate)
    return (8 * deq.unflatten(-1, (chunks, -1)).sum(-1)).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# E8M0 and FP4 (ops §0.2, §7)
# ----------------------------------------------------------------------------------------------

#: Elements per E8M0 scale of every MX format (OCP MX; ops §4.5): one scale byte per 32 along K.
MX_BLOCK = 32

#: E2M1 magnitudes indexed by the low 3 code bits (ops §0.2); code bit 3 is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: E1M2 magnitudes (ops §0.2: max 1.75, emax 0): 0.mm subnormals, then 1.mm.
E1M2_MAGNITUDES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 → fp32 ``2**(byte-127)``. Byte 255 is NaN (ops §0.2).

    Uncertain (ops §0.2 [L], §9.5): byte 0 is 2**-127 or 0.0. We assume 2**-127, as in the spec and golden.
    :data:`E8M0_BYTE0_IS_ZERO` switches to 0.0.
    """
    if scale.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8, got {scale.dtype}")
    value = exp2_int(scale.to(torch.int32) - 127)
    value = torch.where(scale == 255, torch.full_like(value, math.nan), value)
    if E8M0_BYTE0_IS_ZERO:
        value = torch.where(scale == 0, torch.zeros_like(value), value)
    return value


def exp2_int(e: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact ``2**e`` for an integer tensor ``e`` in ``[-1022, 1023]``, built from float64 bits, then cast to
    ``dtype`` (default float32)."""
    dtype = torch.float32 if dtype is None else dtype
    bits = (e.to(torch.int64).clamp(-1022, 1023) + 1023) << 52
    return bits.view(torch.float64).to(dtype)


def _round_mantissa(m: torch.Tensor, round_mode: str) -> torch.Tensor:
    if round_mode == "rint":
        return torch.round(m)  # torch.round is round-half-to-even
    if round_mode == "round":
        return torch.sign(m) * torch.floor(m.abs() + 0.5)  # half away from zero
    if round_mode == "floor":
        return torch.floor(m) if FP4_FLOOR_TOWARD_NEG_INF else torch.trunc(m)
    raise ValueError(f"round_mode must be 'rint', 'round' or 'floor', got {round_mode!r}")


def _round_to_minifloat(x: torch.Tensor, mbits: int, min_exp: int, max_norm: float, round_mode: str) -> torch.Tensor:
    """The golden ``quantize_elem`` (ops §5.2): fp32 → nearest grid value, saturated. NaN → 0.

    The sign of zero is kept (``-0.25`` → ``-0.0``).
    """
    x = x.to(torch.float32)
    x = torch.nan_to_num(x, nan=0.0).clamp(-2 * max_norm, 2 * max_norm)  # ±inf and huge values saturate below
    _, exponent = torch.frexp(x)
    private_exp = torch.clamp(exponent.to(torch.int32) - 1, min=min_exp)  # floor(log2|x|), at least min_exp
    m = x * exp2_int(mbits - private_exp)  # exact power-of-two scaling
    q = (_round_mantissa(m, round_mode) * exp2_int(private_exp - mbits)).clamp(-max_norm, max_norm)
    return torch.where(q == 0, torch.copysign(torch.zeros_like(q), x), q)


def _minifloat_codes(value: torch.Tensor, magnitudes: tuple[float, ...]) -> torch.Tensor:
    table = torch.tensor(magnitudes, dtype=torch.float32, device=value.device)
    index = torch.searchsorted(table, value.abs().contiguous())
    return (index.to(torch.uint8) | (torch.signbit(value).to(torch.uint8) << 3)).to(torch.uint8)


def fp4_encode(x: torch.Tensor, round_mode: str = "rint", *, fmt: str = "e2m1") -> torch.Tensor:
    """Float → FP4 codes, one uint8 (0..15) per element, same shape.

    ``fmt="e2m1"`` (default) or ``"e1m2"`` (ops §0.2). Values are saturated at ±6 (E1M2: ±1.75), so ±inf → max
    and NaN → +0 (golden, ops §5.2). ``round_mode``: ``"rint"`` = round half to even on the grid (e.g.
    1.25 → 1.0, 1.75 → 2.0, 5 → 4), ``"round"`` = half away from zero (1.25 → 1.5), ``"floor"`` (see
    :data:`FP4_FLOOR_TOWARD_NEG_INF`). Zero keeps its sign (-0.1 → code 8, "-0").
    """
    if fmt == "e2m1":
        q = _round_to_minifloat(x, 1, 0, 6.0, round_mode)
        return _minifloat_codes(q, E2M1_MAGNITUDES)
    if fmt == "e1m2":
        q = _round_to_minifloat(x, 2, 0, 1.75, round_mode)
        return _minifloat_codes(q, E1M2_MAGNITUDES)
    raise ValueError(f"fmt must be 'e2m1' or 'e1m2', got {fmt!r}")


def fp4_decode(codes: torch.Tensor, *, fmt: str = "e2m1") -> torch.Tensor:
    """FP4 codes (uint8, low 4 bits used) → fp32, same shape. Code 8 is -0.0 (ops §0.2)."""
    magnitudes = {"e2m1": E2M1_MAGNITUDES, "e1m2": E1M2_MAGNITUDES}[fmt]
    table = torch.tensor(magnitudes + tuple(-v for v in magnitudes), dtype=torch.float32, device=codes.device)
    return table[(codes.to(torch.int64) & 0xF)]


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """FP4 codes uint8 ``[..., 2m]`` → ``float4_*_x2`` bytes uint8 ``[..., m]``, with the even element in the low nibble (ops §7)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dim, got {tuple(codes.shape)}")
    return pack_nibbles(codes)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fp4_pack`: uint8 ``[..., m]`` → codes uint8 ``[..., 2m]``."""
    return unpack_nibbles(packed)


def fp4_from_fp32_truncating(x: torch.Tensor) -> torch.Tensor:
    """The 950 ``npu_convert_weight_to_int4pack`` fp32 → E2M1 rule (ops §1 "950 path"): codes uint8.

    The fp32 bits are masked with ``0xFFC00000`` (sign, exponent, top mantissa bit). The result is looked
    up among the 16 exact E2M1 values, and anything not found becomes code 0. So 1.25 → 1.0, 5.0 → 4.0, 0.25 → 0.
    """
    masked = _u32_to_fp32(_fp32_bits_u32(x) & 0xFFC00000)
    table = fp4_decode(torch.arange(16, dtype=torch.uint8, device=x.device))
    match = (masked.unsqueeze(-1) == table) & (torch.signbit(masked).unsqueeze(-1) == torch.signbit(table))
    found = match.any(-1)
    codes = match.to(torch.int32).argmax(-1).to(torch.uint8)
    return torch.where(found, codes, torch.zeros_like(codes))


# ----------------------------------------------------------------------------------------------
# MX quantization (ops §5.2, scale_alg = 0)
# ----------------------------------------------------------------------------------------------

#: element type → (emax, max_norm, mantissa bits, min_exp, torch dtype name or None for FP4) (ops §0.2, §5.2)
MX_ELEMENTS: dict[str, tuple[int, float, int, int, str | None]] = {
    "float4_e2m1fn_x2": (2, 6.0, 1, 0, None),
    "float4_e1m2fn_x2": (0, 1.75, 2, 0, None),
    "float8_e4m3fn": (8, 448.0, 3, -6, "float8_e4m3fn"),
    "float8_e5m2": (15, 57344.0, 2, -14, "float8_e5m2"),
}
_MX_ALIASES = {
    "e2m1": "float4_e2m1fn_x2",
    "fp4": "float4_e2m1fn_x2",
    "fp4_e2m1": "float4_e2m1fn_x2",
    "e1m2": "float4_e1m2fn_x2",
    "e4m3": "float8_e4m3fn",
    "e4m3fn": "float8_e4m3fn",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "fp8_e5m2": "float8_e5m2",
}


def mx_element(elem: object) -> str:
    """Canonical MX element name (a key of :data:`MX_ELEMENTS`) from a name, torch_npu id or torch dtype."""
    name = npu_dtype_name(elem)
    name = _MX_ALIASES.get(name, name)
    if name not in MX_ELEMENTS:
        raise ValueError(f"not an MX element type: {elem!r}")
    return name


def mx_quantize(x: torch.Tensor, elem: object, block_size: int = 32, round_mode: str = "rint") -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX quantization along the last dim, the ``npu_dynamic_mx_quant`` scale_alg=0 rule (ops §5.2).

    ``x``: float ``[..., K]`` (fp16/bf16/fp32). ``elem``: ``"e2m1"``, ``"e1m2"``, ``"e4m3fn"``, ``"e5m2"``
    (or the torch_npu id 296/297/292/291, or a torch fp8 dtype). Per block of ``block_size`` (a partial
    last block is zero-padded):

    - ``shared_exp = floor(log2 amax) - emax``. ``amax == 0`` gives -127. The result is clamped to [-127, 127]
      and the E8M0 byte is ``shared_exp + 127``.
    - A block holding inf/NaN gets byte 255 and NaN elements (kernel, ops §5.2) for FP8. Uncertain: FP4 has no NaN
      encoding and the kernel's output is not documented. We assume code 0 (the golden's NaN → 0).
    - elements: ``v / 2**shared_exp`` (exact) quantized with saturation. FP8: clamp to ±max, then
      ``.to(torch.float8_*)``. torch's cast rounds to nearest even (RINT, as the kernel's FP8 cast). FP4:
      :func:`fp4_encode` with ``round_mode``.

    Returns ``(codes, scale)``: ``codes`` is a torch fp8 tensor ``[..., K]``, or for FP4 unpacked uint8
    codes ``[..., K]`` (pack them with :func:`fp4_pack`). ``scale`` is uint8 ``[..., ceil(K/block_size)]``.
    See :data:`MX_ZERO_SCALE_FLUSHES` for blocks whose byte is 0.
    """
    name = mx_element(elem)
    emax, max_norm, _, _, element_dtype = MX_ELEMENTS[name]
    if element_dtype is not None and round_mode != "rint":
        raise ValueError("FP8 MX quantization supports round_mode='rint' only (ops §5.2)")
    if x.dim() < 1:
        raise ValueError("mx_quantize needs at least one dim")
    k = x.shape[-1]
    nb = math.ceil(k / block_size)
    xf = x.to(torch.float32)
    if nb * block_size != k:
        xf = torch.nn.functional.pad(xf, (0, nb * block_size - k))
    blocks = xf.reshape(*xf.shape[:-1], nb, block_size)
    finite = torch.isfinite(blocks).all(-1)
    amax = torch.nan_to_num(blocks, nan=0.0, posinf=0.0, neginf=0.0).abs().amax(-1)
    _, exponent = torch.frexp(amax)
    shared = torch.where(amax > 0, exponent.to(torch.int32) - 1 - emax, torch.full_like(exponent, -127, dtype=torch.int32))
    shared = shared.clamp(-127, 127)
    scale = torch.where(finite, shared + 127, torch.full_like(shared, 255)).to(torch.uint8)

    scaled = (blocks.to(torch.float64) * exp2_int(-shared, torch.float64).unsqueeze(-1)).to(torch.float32)
    if MX_ZERO_SCALE_FLUSHES:
        scaled = torch.where((scale == 0).unsqueeze(-1), torch.zeros_like(scaled), scaled)
    scaled = torch.where(finite.unsqueeze(-1), scaled, torch.full_like(scaled, math.nan))
    scaled = scaled.reshape(*xf.shape[:-1], nb * block_size)[..., :k]
    if element_dtype is not None:
        codes = scaled.clamp(-max_norm, max_norm).to(torch_dtype(element_dtype))  # clamp keeps NaN; the cast is RNE
    else:
        codes = fp4_encode(scaled, round_mode, fmt="e2m1" if name == "float4_e2m1fn_x2" else "e1m2")
    return codes, scale


def mx_dequantize(codes: torch.Tensor, scale: torch.Tensor, elem: object, block_size: int = 32) -> torch.Tensor:
    """Inverse of :func:`mx_quantize` up to rounding: codes ``[..., K]`` and scale ``[..., Kb]`` → fp32 ``[..., K]``.

    ``value = elem(code) * 2**(byte-127)``, with each scale byte repeated over its block along the last dim (ops §4.5 Compute).
    """
    name = mx_element(elem)
    if MX_ELEMENTS[name][4] is None:
        values = fp4_decode(codes, fmt="e2m1" if name == "float4_e2m1fn_x2" else "e1m2")
    else:
        values = codes.to(torch.float32)
    factors = e8m0_decode(scale).repeat_interleave(block_size, dim=-1)[..., : values.shape[-1]]
    return values * factors


# ----------------------------------------------------------------------------------------------
# Dual-level MX quantization (ops §5.3, 950)
# ----------------------------------------------------------------------------------------------

#: Level-0 block (fp32 scale) and level-1 block (E8M0 scale) sizes along the last dim (ops §5.3, §5.4: fixed).
DUAL_L0_BLOCK = 512
DUAL_L1_BLOCK = 32

#: Uncertain (ops §5.3 [L]): whether the kernel divides by the level-0 scale or multiplies by its fp32
#: reciprocal. We assume a true fp32 division (the doc formula ``x / level0_scale``).
DUAL_L0_RECIPROCAL = False

#: Uncertain (ops §5.3 [L], §9.6): an all-zero 512-block gives ``level0_scale = 0`` and ``0/0``. We
#: assume the block quantizes to zeros; its level-0 scale is written as this value (any positive
#: value gives the same zero output) and its level-1 bytes are 0 (the MX rule for amax = 0).
DUAL_ZERO_BLOCK_L0 = 1.0


def dual_level_mx_quantize(x: torch.Tensor, round_mode: str = "rint") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``npu_dynamic_dual_level_mx_quant`` along the last dim (ops §5.3). Returns ``(codes, level0, level1)``.

    Per 512-block: ``level0 = amax / 6.0`` (fp32); ``temp = cast_to_input_dtype(x / level0)`` (bf16/fp16
    inputs are rounded back to their dtype, fp32 stays fp32); then per 32-block of ``temp`` the OCP MX E2M1
    rule of :func:`mx_quantize` (``shared_exp = floor(log2 amax32) − 2``, E8M0 byte, FP4 with ``round_mode``).
    Partial last blocks are zero-padded. ``codes``: FP4 codes uint8 ``[..., D]`` (unpacked), ``level0``:
    fp32 ``[..., ceil(D/512)]``, ``level1``: uint8 ``[..., ceil(D/32)]`` (unpaired; the op's output pairs them
    with :func:`mx_scale_pairs`). See :data:`DUAL_L0_RECIPROCAL`, :data:`DUAL_ZERO_BLOCK_L0`.
    """
    d = x.shape[-1]
    nb0 = math.ceil(d / DUAL_L0_BLOCK)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, nb0 * DUAL_L0_BLOCK - d))
    blocks = xf.reshape(*xf.shape[:-1], nb0, DUAL_L0_BLOCK)
    amax = blocks.abs().amax(-1)
    level0 = amax / torch.tensor(6.0, dtype=torch.float32, device=x.device)
    level0 = torch.where(amax > 0, level0, torch.full_like(level0, DUAL_ZERO_BLOCK_L0))
    if DUAL_L0_RECIPROCAL:
        scaled = blocks * (1.0 / level0).unsqueeze(-1)
    else:
        scaled = blocks / level0.unsqueeze(-1)
    temp = scaled.reshape(xf.shape)[..., :d]
    if x.dtype in (torch.float16, torch.bfloat16):
        temp = temp.to(x.dtype)
    codes, level1 = mx_quantize(temp, "e2m1", DUAL_L1_BLOCK, round_mode)
    return codes, level0, level1


def dual_level_scale(level0: torch.Tensor, level1: torch.Tensor, d: int) -> torch.Tensor:
    """Effective fp32 scale of every 32-block: ``level0[..., j // 16] · 2**(level1[..., j] − 127)``, ``[..., ceil(d/32)]``.

    The level-1 byte is decoded by :func:`e8m0_decode` (its switches apply); the product is exact unless
    it underflows below fp32's normal range, where it rounds once.
    """
    kb = math.ceil(d / DUAL_L1_BLOCK)
    per = DUAL_L0_BLOCK // DUAL_L1_BLOCK
    l0 = level0.to(torch.float32).repeat_interleave(per, dim=-1)[..., :kb]
    return l0 * e8m0_decode(level1[..., :kb].contiguous())


def split_dual_level_scale(scale: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`dual_level_scale` for levels made by :func:`dual_level_mx_quantize`.

    ``scale``: effective fp32 block scales ``[..., ceil(d/32)]`` → (level0 fp32 ``[..., ceil(d/512)]``,
    level1 uint8 ``[..., ceil(d/32)]``). The rule gives the largest 32-block of a non-zero 512-block
    the byte 127 (its values reach ``amax / level0 = 6``), so level 0 is the largest block scale; an
    all-zero 512-block has level 0 :data:`DUAL_ZERO_BLOCK_L0` and bytes 0 (every scale equal to their
    product). Raises ``ValueError`` unless the levels give back every scale exactly.
    """
    kb = scale.shape[-1]
    per = DUAL_L0_BLOCK // DUAL_L1_BLOCK
    nb0 = math.ceil(d / DUAL_L0_BLOCK)
    scale = scale.to(torch.float32)
    zero_scale = DUAL_ZERO_BLOCK_L0 * e8m0_decode(torch.zeros(1, dtype=torch.uint8)).item()
    largest = torch.nn.functional.pad(scale, (0, nb0 * per - kb)).unflatten(-1, (nb0, per)).amax(-1)
    zero = (torch.nn.functional.pad(scale, (0, nb0 * per - kb), value=zero_scale).unflatten(-1, (nb0, per)) == zero_scale).all(-1)
    level0 = torch.where(zero, torch.full_like(largest, DUAL_ZERO_BLOCK_L0), largest)
    if bool((level0 <= 0).any()):
        raise ValueError("a 512-block has no positive scale; it cannot be split into two levels")
    ratio = scale / level0.repeat_interleave(per, dim=-1)[..., :kb]
    level1 = (torch.round(torch.log2(ratio)).clamp(-127, 127) + 127).to(torch.uint8)
    if not torch.equal(dual_level_scale(level0, level1, d), scale):
        raise ValueError("the block scales are not level0 · 2**e within each 512-block")
    return level0, level1
