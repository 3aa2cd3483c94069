"""Pure-PyTorch emulation of the torch_npu quantized matmul and quantize ops (CPU or CUDA).

Every function has the torch_npu name, signature and semantics, as documented in
``docs/research/torch_npu_ops.md`` (cited as ``ops §x.y``). It runs on the device of its inputs.

Numerics:

- Integer matmuls (int8×int8, int4×int4) are exact. The products are summed in float64, which is exact
  for every legal shape (``K·128·128 < 2**53``), and then wrap like int32 (ops §0.5).
- Float matmuls (fp16/bf16 antiquant, FP8/FP4 MX) are summed in float64 and rounded once to fp32. That is
  an "ideal fp32 accumulation". The cube's summation order is undocumented, so float results match hardware only
  to within accumulation rounding (ops §0.5, §9.2). The result is the same on CPU and CUDA (no TF32).
- Element-wise dequant, requant and scale steps round the way the kernels are documented to round (each
  function says how).

Choices for uncertain facts are module constants here or in :mod:`npuconv.layouts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from npuconv import layouts
from npuconv.layouts import (
    decode_quant_param,
    e8m0_decode,
    fp4_decode,
    fp4_unpack,
    int4pack,
    int4unpack,
    int4unpack_bytes,
    npu_dtype_name,
    trans_quant_param,
)

#: Uncertain (ops §2.6): for bf16 x, the 950 golden rounds ``x @ W`` to bf16 before adding the fp32 bias,
#: and the A2/A3 path is not documented. We assume one rounding: fp32 accumulation + fp32 bias, then a single cast.
BF16_ROUND_BEFORE_BIAS = False

#: Uncertain (ops §4.2 "torch-level conversion"): torch_npu FP19-truncates an fp32 ``scale`` (via
#: ``npu_trans_quant_param``) for fp16/int8 output, and for bf16 output only on "the V5 path". We assume
#: no truncation for bf16 output.
QMM_FP19_FOR_BF16_OUTPUT = False

#: Uncertain (ops §5.1 [L], §9.6): ``npu_dynamic_quant`` on an all-zero row computes ``0 * inf = NaN``.
#: We assume the NaN → int cast gives 0, so y = 0 and scale = 0.
DYNAMIC_QUANT_NAN_TO = 0

#: Uncertain (ops §8 [L]): the final narrowing cast of ``npu_quantize`` is presumed to saturate. We
#: assume saturation. False wraps instead, like a plain two's-complement truncation.
QUANTIZE_SATURATES = True

_INT4_NAMES = {"int4"}
_FP4_NAMES = {"float4_e2m1fn_x2": "e2m1", "float4_e1m2fn_x2": "e1m2"}
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _is_transposed(t: torch.Tensor) -> bool:
    """torch_npu ``is_transpose_last_two_dims`` (ops §2.5): the last two dims have strides ``(1, rows)``."""
    return t.dim() >= 2 and t.stride(-2) == 1 and t.stride(-1) == t.size(-2)


def _along_storage(t: torch.Tensor, fn) -> torch.Tensor:
    """Apply a last-dim unpacker along the *contiguous* dim: the stored rows of a transposed view."""
    if _is_transposed(t):
        return fn(t.transpose(-1, -2)).transpose(-1, -2)
    return fn(t)


def _round_from_f64(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly rounded (RNE) float64 → ``dtype``, with no double rounding through fp32.

    It rounds to fp32 with round-to-odd, then to ``dtype`` with RNE. That is exact for fp16/bf16 because fp32 has at least
    2 more bits.
    """
    t = t.to(torch.float64)
    f = t.to(torch.float32)
    if dtype == torch.float32:
        return f
    back = f.to(torch.float64)
    even = (f.view(torch.int32) & 1) == 0
    toward = torch.where(t > back, torch.full_like(f, math.inf), torch.full_like(f, -math.inf))
    f = torch.where((back != t) & even & torch.isfinite(f), torch.nextafter(f, toward), f)
    return f.to(dtype)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float matmul with fp32 accumulation, like the cube for fp16/bf16 operands (ops §0.5). No TF32."""
    return torch.matmul(a.to(torch.float32), b.to(torch.float32))


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matmul summed in float64 (exact for integer operands). Returns float64."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64))


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 → int32 with two's-complement wrap-around (the int32 accumulator)."""
    return (((v + 2**31) & 0xFFFFFFFF) - 2**31).to(torch.int32)


def _requant_int8(y: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """int8 requant of an already scaled fp32 value (ops §4.2 "int8 output").

    ``t = clip(rint(y), -256, 255)`` (9 bit), then ``clip(t + clip(rint(offset), -256, 255), -128, 127)``.
    """
    t = torch.nan_to_num(torch.round(y), nan=0.0).clamp(-256, 255)
    if offset is not None:
        t = t + torch.round(offset.to(torch.float32)).clamp(-256, 255)
    return t.clamp(-128, 127).to(torch.int8)


def _dtype_max(dst_type: object) -> int:
    name = npu_dtype_name(dst_type)
    if name == "int8":
        return 127
    if name in _INT4_NAMES:
        return 7
    raise NotImplementedError(f"dst_type {dst_type!r} is not emulated (int8 and quint4x2 only)")


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-row (per-token) vector ``(…, M)`` or ``(…, M, 1)`` so that it broadcasts over ``like (…, M, N)``."""
    v = v.to(torch.float32)
    if v.dim() >= 2 and v.shape[-1] == 1:
        return v
    return v.unsqueeze(-1)


def _group_sizes(group_sizes: object) -> tuple[int, int, int] | None:
    """``[gm, gn, gk]`` list, or the int ``gk | gn<<16 | gm<<32`` (ops §4 naming) → tuple, or None."""
    if group_sizes is None:
        return None
    if isinstance(group_sizes, int):
        return ((group_sizes >> 32) & 0xFFFF, (group_sizes >> 16) & 0xFFFF, group_sizes & 0xFFFF)
    values = tuple(int(v) for v in group_sizes)
    if len(values) != 3:
        raise ValueError(f"group_sizes must be [gm, gn, gk], got {group_sizes!r}")
    return values  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# weight-only antiquant matmul (ops §2)
# ----------------------------------------------------------------------------------------------


def _wqbmm_weight(weight: torch.Tensor, weight_dtype: object) -> tuple[torch.Tensor, str]:
    """The logical ``(K, N)`` weight as fp32 values, and its kind ("int", "fp4" or "fp8")."""
    name = npu_dtype_name(weight_dtype)
    if weight.dtype == torch.int32:  # 8 x int4 per int32 along the stored last dim (ops §2.3, §2.5)
        return _along_storage(weight, int4unpack).to(torch.float32), "int"
    if weight.dtype in (torch.int8, torch.uint8) and name in _INT4_NAMES:
        return _along_storage(weight, int4unpack_bytes).to(torch.float32), "int"
    if weight.dtype == torch.uint8 and name in _FP4_NAMES:
        fmt = _FP4_NAMES[name]
        return _along_storage(weight, lambda t: fp4_decode(fp4_unpack(t), fmt=fmt)), "fp4"
    if weight.dtype == torch.int8:
        return weight.to(torch.float32), "int"
    if weight.dtype in _FP8_DTYPES:
        return weight.to(torch.float32), "fp8"
    raise NotImplementedError(f"weight dtype {weight.dtype} (weight_dtype={weight_dtype!r}) is not emulated")


def _expand_antiquant(param: torch.Tensor, k: int, n: int, group_size: int, what: str) -> torch.Tensor:
    """Per-tensor ``(1,)``/``(1,1)``, per-channel ``(N,)``/``(1,N)`` or per-group ``(ceil(K/g), N)`` → ``(K|1, N|1)`` (ops §2.2)."""
    if group_size > 0:
        groups = math.ceil(k / group_size)
        if tuple(param.shape) != (groups, n):
            raise ValueError(f"per-group {what} must be ({groups}, {n}) for K={k}, group {group_size}; got {tuple(param.shape)}")
        return param.repeat_interleave(group_size, dim=0)[:k]
    if param.numel() == 1:
        return param.reshape(1, 1)
    if param.numel() == n and (param.dim() == 1 or tuple(param.shape) == (1, n)):
        return param.reshape(1, n)
    raise ValueError(f"{what} of shape {tuple(param.shape)} is neither per-tensor nor per-channel for N={n}")


def npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
    weight_dtype: object = None,
) -> torch.Tensor:
    """``y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias`` (ops §2.1: the offset is **added**).

    - ``x``: fp16/bf16 ``(…, M, K)``. The output has x's dtype, or int8 when ``quant_scale`` is given.
    - ``weight``: int8 ``(K, N)``; int32 int4pack ``(K, N/8)``; uint8 with ``weight_dtype`` int4/FP4
      (2 per byte); or fp8. Any of these may be a transposed view of a contiguous ``(N, …)`` tensor, detected by
      strides as in ops §2.5. A packed dim is always the stored (contiguous) one.
    - ``antiquant_scale``/``antiquant_offset``: per-tensor, per-channel or per-group ``(ceil(K/g), N)``
      (ops §2.2), in x's dtype (other float dtypes are first cast to it). With int64 ``antiquant_scale``
      (ops §2.6): ``y = (x @ fp16(w + off)) * fp16(FP19(scale))``. With uint8 E8M0 scale ``(ceil(K/32), N)`` and
      an FP4 weight (MX, 950): ``W = rnd_x(w * 2**(e-127))``.
    - Dequant rounding (ops §2.6): fp16 x rounds ``w + off`` and then ``* scale`` to fp16. bf16 x computes
      ``(w + off) * scale`` in fp32 and casts to bf16 (RNE). Then ``x @ W`` is accumulated in fp32, the bias is
      added in fp32 (fp16 bias for fp16 x, fp32 for bf16 x), and the result is cast to x's dtype.
    - ``quant_scale`` (+ ``quant_offset``): an fp32 scale is encoded with :func:`npu_trans_quant_param` as the
      host does (ops §2.4), int64 is used as given. The result is requantized to int8 (ops §4.2).
    - ``inner_precise`` is accepted and ignored (the "high-performance" kernel's rounding is unknown, ops §2.4).
    """
    del inner_precise
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16 or bf16, got {x.dtype}")
    w, kind = _wqbmm_weight(weight, weight_dtype)
    k, n = w.shape[-2], w.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k}")
    xd = x.dtype
    scale_factor = None  # applied after the matmul (int64 antiquant scale)

    if antiquant_scale.dtype == torch.uint8:  # MX antiquant (ops §2.2, §2.6 "MX mode")
        if kind != "fp4":
            raise ValueError("an E8M0 antiquant_scale needs an FP4 weight")
        s = e8m0_decode(_expand_antiquant(antiquant_scale, k, n, 32, "antiquant_scale"))
        wd = (w.to(torch.float32) * s).to(xd)  # FP4 value × power of two: exact in fp32, one rounding
    elif antiquant_scale.dtype in (torch.int64, torch.uint64):  # ops §2.6 "int64 antiquant_scale"
        scale, _ = decode_quant_param(antiquant_scale.reshape(-1), fp19=True)
        scale_factor = _expand_antiquant(scale.to(torch.float16).reshape(antiquant_scale.shape), k, n, 0, "antiquant_scale")
        wd = w.to(torch.float16)
        if antiquant_offset is not None:
            off = _expand_antiquant(antiquant_offset.to(torch.float16), k, n, 0, "antiquant_offset")
            wd = _round_from_f64(w.to(torch.float64) + off.to(torch.float64), torch.float16)
        wd = wd.to(xd)
    else:
        s = _expand_antiquant(antiquant_scale.to(xd), k, n, antiquant_group_size, "antiquant_scale")
        o = None
        if antiquant_offset is not None:
            if antiquant_offset.shape != antiquant_scale.shape:
                raise ValueError("antiquant_offset must have the shape of antiquant_scale (ops §2.2)")
            o = _expand_antiquant(antiquant_offset.to(xd), k, n, antiquant_group_size, "antiquant_offset")
        if xd == torch.float16:  # every op rounded to fp16
            # w + o and t * s of fp16 operands are exact in fp32 (a sum of an int8 and an fp16 value, or a product of
            # two 11-bit significands, fits in 24 bits), so one fp32 op + one RNE cast equals the fp16 op.
            t = w if o is None else (w.to(torch.float32) + o.to(torch.float32)).to(torch.float16)
            wd = (t.to(torch.float32) * s.to(torch.float32)).to(torch.float16)
        else:  # fp32 then one RNE cast to bf16
            t = w if o is None else w + o.to(torch.float32)
            wd = (t * s.to(torch.float32)).to(torch.bfloat16)

    y = _mm_f32(x, wd)
    if scale_factor is not None:
        y = y * scale_factor.to(torch.float32)
    if BF16_ROUND_BEFORE_BIAS and xd == torch.bfloat16:
        y = y.to(torch.bfloat16).to(torch.float32)
    if bias is not None:
        y = y + bias.to(xd if xd == torch.float16 else torch.float32).to(torch.float32)
    if quant_scale is None:
        return y.to(xd)
    if quant_scale.dtype in (torch.int64, torch.uint64):
        qs, qo = decode_quant_param(quant_scale)
    else:
        qs, qo = decode_quant_param(trans_quant_param(quant_scale.reshape(-1).to(torch.float32), quant_offset))
    return _requant_int8(y * qs, qo)


# ----------------------------------------------------------------------------------------------
# quantized matmul (ops §4)
# ----------------------------------------------------------------------------------------------


def _qmm_operand(t: torch.Tensor, marker: object, which: str) -> tuple[torch.Tensor, str]:
    """Logical values of an ``npu_quant_matmul`` operand as float64, and its kind ("int" or "float")."""
    name = npu_dtype_name(marker)
    if t.dtype == torch.int8 and name not in _INT4_NAMES:
        return t.to(torch.float64), "int"
    if t.dtype == torch.int32:  # 8 x int4 per int32 along the stored last dim (ops §4.4 A4W4)
        return _along_storage(t, int4unpack).to(torch.float64), "int"
    if t.dtype in (torch.int8, torch.uint8) and name in _INT4_NAMES:
        return _along_storage(t, int4unpack_bytes).to(torch.float64), "int"
    if t.dtype == torch.uint8 and name in _FP4_NAMES:
        fmt = _FP4_NAMES[name]
        return _along_storage(t, lambda v: fp4_decode(fp4_unpack(v), fmt=fmt)).to(torch.float64), "float"
    if t.dtype in _FP8_DTYPES:
        return t.to(torch.float64), "float"
    raise NotImplementedError(f"{which} dtype {t.dtype} ({which}_dtype={marker!r}) is not emulated")


def _mx_x1_scale(pertoken_scale: torch.Tensor, m: int, kb: int) -> torch.Tensor:
    """x1 MX scale, logical ``(…, M, ceil(K/64), 2)`` → fp32 ``(…, M, Kb)`` (ops §4.5)."""
    if pertoken_scale.dtype != torch.uint8 or pertoken_scale.shape[-1] != 2 or pertoken_scale.shape[-3] != m:
        raise ValueError(f"MX pertoken_scale must be uint8 (…, {m}, ceil(K/64), 2), got {pertoken_scale.dtype} {tuple(pertoken_scale.shape)}")
    return e8m0_decode(layouts.mx_scale_unpairs(pertoken_scale, kb))


def _mx_x2_scale(scale: torch.Tensor, n: int, kb: int) -> torch.Tensor:
    """x2 MX scale, logical ``(…, ceil(K/64), N, 2)``: block j of column n at ``[j//2, n, j%2]`` → fp32 ``(…, Kb, N)``."""
    kb2 = math.ceil(kb / 2)
    if scale.dtype != torch.uint8 or scale.shape[-1] != 2:
        raise ValueError(f"MX scale must be uint8 (…, {kb2}, {n}, 2), got {scale.dtype} {tuple(scale.shape)}")
    if tuple(scale.shape[-3:-1]) == (kb2, n):
        pairs = scale
    elif tuple(scale.shape[-3:-1]) == (n, kb2):  # memory layout of a transposed x2, passed without the view
        pairs = scale.transpose(-3, -2)
    else:
        raise ValueError(f"MX scale shape {tuple(scale.shape)} does not fit K blocks {kb}, N {n}")
    return e8m0_decode(pairs.transpose(-1, -2).reshape(*pairs.shape[:-3], 2 * kb2, n)[..., :kb, :])


def _block_scaled_mm(a: torch.Tensor, b: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, gk: int) -> torch.Tensor:
    """``Σ_j (Σ_{k∈block j} a·b) · s1[…, m, j] · s2[…, j, n]`` (ops §4.1 G-B), in float64."""
    k = a.shape[-1]
    kb = math.ceil(k / gk)
    pad = kb * gk - k
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b.transpose(-1, -2), (0, pad)).transpose(-1, -2)
    a = a.reshape(*a.shape[:-1], kb, gk)  # (…, M, Kb, gk)
    b = b.reshape(*b.shape[:-2], kb, gk, b.shape[-1])  # (…, Kb, gk, N)
    partial = torch.einsum("...mjk,...jkn->...jmn", a, b)
    weights = s1.to(torch.float64).transpose(-1, -2).unsqueeze(-1) * s2.to(torch.float64).unsqueeze(-2)  # (…, Kb, M, N)
    return (partial * weights).sum(-3)


def npu_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    x1_dtype: object = None,
    x2_dtype: object = None,
    pertoken_scale_dtype: object = None,
    scale_dtype: object = None,
    group_sizes: Sequence[int] | int | None = None,
) -> torch.Tensor:
    """``npu_quant_matmul`` (ops §4). ``scale`` is the x2 (weight) scale, ``pertoken_scale`` the x1 scale.

    Operands: int8 ``(…, M, K)`` × int8 ``(…, K, N)``; int4×int4 as int32 int4pack ``(M, K/8)`` ×
    ``(K, N/8)`` (or a ``(K/8, N)`` transposed view); MX: fp8 (torch dtypes) or FP4 (uint8 with
    ``x*_dtype=float4_e2m1fn_x2``/296). Any x2 may be a transposed view (ops §4.4).

    Integer modes. ``acc`` is the exact int32 accumulation:

    - ``output_dtype=torch.int32``: ``acc (+ int32 bias)``, and the scales are ignored.
    - T-C/T-T (no ``pertoken_scale``): an int32 bias gives ``fp32(acc + bias) * scale_eff``, a float bias gives
      ``fp32(acc) * scale_eff + bias``. An fp32 ``scale`` is FP19-truncated for fp16/int8 output, because
      torch_npu calls ``npu_trans_quant_param`` itself (ops §4.2). For bf16 output see
      :data:`QMM_FP19_FOR_BF16_OUTPUT`. An int64 scale is decoded from its low 32 bits with FP19 truncation
      (:data:`npuconv.layouts.INT64_SCALE_FP19`).
    - K-C (``pertoken_scale`` fp32 ``(M,)``): ``(fp32(acc + int32 bias) * scale) * pertoken_scale``, then
      ``+ float bias``. There is no truncation.
    - int8 output (the default ``output_dtype``): requant ``clip(clip(rint(y), -256, 255) + offset, -128, 127)``,
      with ``offset`` (fp32 ``(1,)``/``(N,)``) or the offset encoded in an int64 scale (ops §4.2).
    - G-B (``group_sizes=[gm, gn, gk]`` with ``gk > 1``, int8): ``Σ_j acc_j · x1Scale[m/gm, j] · x2Scale[j, n/gn] + bias``.

    MX mode (x1/x2 float, ``group_sizes`` gk = 32): the scales are uint8 E8M0, ``pertoken_scale`` is
    ``(…, M, ceil(K/64), 2)`` and ``scale`` is ``(…, ceil(K/64), N, 2)``. K-block ``j`` is at ``[j//2, …, j%2]``.
    out = ``(x1 · 2**(s1-127)) @ (x2 · 2**(s2-127)) + bias_fp32``, cast to ``output_dtype`` (fp16/bf16/fp32,
    which must be given) (ops §4.5).
    """
    del pertoken_scale_dtype, scale_dtype  # the emulation reads the scale dtypes from the tensors
    a, kind1 = _qmm_operand(x1, x1_dtype, "x1")
    b, kind2 = _qmm_operand(x2, x2_dtype, "x2")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"x1 K={a.shape[-1]} does not match x2 K={b.shape[-2]}")
    k, m, n = a.shape[-1], a.shape[-2], b.shape[-1]
    groups = _group_sizes(group_sizes)

    if kind1 == "float" or kind2 == "float":  # MX (ops §4.5)
        if kind1 != kind2:
            raise NotImplementedError("mixed integer/float operands are not emulated")
        if output_dtype is None or output_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError("MX npu_quant_matmul needs output_dtype fp16, bf16 or fp32")
        if pertoken_scale is None:
            raise ValueError("MX npu_quant_matmul needs pertoken_scale (the x1 E8M0 scale)")
        gk = groups[2] if groups is not None and groups[2] else 32
        kb = math.ceil(k / gk)
        s1 = _mx_x1_scale(pertoken_scale, m, kb).repeat_interleave(gk, dim=-1)[..., :k]
        s2 = _mx_x2_scale(scale, n, kb).repeat_interleave(gk, dim=-2)[..., :k, :]
        y = _mm(a * s1.to(torch.float64), b * s2.to(torch.float64)).to(torch.float32)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(output_dtype)

    out_dtype = torch.int8 if output_dtype is None else output_dtype
    int_bias = bias is not None and bias.dtype == torch.int32
    float_bias = bias.to(torch.float32) if bias is not None and not int_bias else None

    if groups is not None and groups[2] > 1:  # G-B block-scaled int8 (ops §4.1)
        gm, gn, gk = (max(g, 1) for g in groups)
        kb = math.ceil(k / gk)
        s1 = pertoken_scale.to(torch.float32).repeat_interleave(gm, dim=-2)[..., :m, :]
        s2 = scale.to(torch.float32)
        nb = math.ceil(n / gn)
        as_is = tuple(s2.shape[-2:]) == (kb, nb)
        swapped = tuple(s2.shape[-2:]) == (nb, kb)
        if swapped and (not as_is or _is_transposed(x2)):
            s2 = s2.transpose(-1, -2)  # x2Scale given as (ceil(N/gn), Kb), as for a transposed x2
        elif not as_is:
            raise ValueError(f"G-B scale shape {tuple(scale.shape)} fits neither ({kb}, {nb}) nor ({nb}, {kb})")
        s2 = s2.repeat_interleave(gn, dim=-1)[..., :n]
        y = _block_scaled_mm(a, b, s1, s2, gk).to(torch.float32)
        if float_bias is not None:
            y = y + float_bias
        return y.to(out_dtype)

    acc = torch.round(_mm(a, b)).to(torch.int64)
    if int_bias:
        acc = acc + bias.to(torch.int64)
    acc32 = _wrap_int32(acc)
    if out_dtype == torch.int32:
        return acc32

    quant_offset = None
    if scale.dtype in (torch.int64, torch.uint64):
        s, quant_offset = decode_quant_param(scale)
    elif scale.dtype == torch.float32 and pertoken_scale is None and (out_dtype != torch.bfloat16 or QMM_FP19_FOR_BF16_OUTPUT):
        s, quant_offset = decode_quant_param(trans_quant_param(scale.reshape(-1), offset))  # ops §4.2 torch level
    else:
        s = scale.to(torch.float32)
    if offset is not None:
        quant_offset = offset.to(torch.float32)

    y = acc32.to(torch.float32) * s
    if pertoken_scale is not None:
        y = y * _per_row(pertoken_scale, y)
    if float_bias is not None:
        y = y + float_bias
    if out_dtype == torch.int8:
        return _requant_int8(y, quant_offset)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# activation quantization (ops §5, §8)
# ----------------------------------------------------------------------------------------------


def npu_dynamic_quant(
    x: torch.Tensor,
    *,
    smooth_scales: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    dst_type: object = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization (ops §5.1). Returns ``(y, scale)``.

    ``x' = fp32(x)`` (times ``fp32(smooth_scales)``; with ``group_index``, a cumulative row count per expert,
    row r uses ``smooth_scales[e]`` where ``group_index[e-1] <= r < group_index[e]``). ``amax = max|x'|`` per row,
    ``mult = DTYPE_MAX / amax`` (fp32 division), ``y = rint_half_even(x' * mult)``, and
    ``scale = amax * fp32(1/DTYPE_MAX)``. DTYPE_MAX is 127 (int8) or 7 (``torch.quint4x2``).
    ``y``: int8 with x's shape, or int32 int4pack ``(…, K/8)`` for quint4x2. ``scale``: fp32 ``x.shape[:-1]``.
    For an all-zero row see :data:`DYNAMIC_QUANT_NAN_TO`.
    """
    dmax = _dtype_max(dst_type)
    xf = x.to(torch.float32)
    if smooth_scales is not None:
        ss = smooth_scales.to(torch.float32)
        if group_index is not None:
            rows = xf.reshape(-1, xf.shape[-1])
            ends = group_index.to(torch.int64).reshape(-1)
            expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=x.device), right=True)
            expert = expert.clamp(max=ss.shape[0] - 1)
            xf = (rows * ss[expert]).reshape(xf.shape)
        else:
            xf = xf * ss
    amax = xf.abs().amax(-1, keepdim=True)
    mult = torch.tensor(float(dmax), dtype=torch.float32, device=x.device) / amax
    y = torch.nan_to_num(torch.round(xf * mult), nan=float(DYNAMIC_QUANT_NAN_TO)).clamp(-dmax, dmax).to(torch.int8)
    scale = (amax * torch.tensor(1.0 / dmax, dtype=torch.float32, device=x.device)).squeeze(-1)
    if dmax == 7:
        if x.shape[-1] % 8:
            raise ValueError("quint4x2 dynamic quant needs K % 8 == 0")
        y = int4pack(y)
    return y, scale


def _mx_quantize_cublas(x: torch.Tensor, elem: str, block_size: int, max_low_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scale_alg = 1 (FP8 only, ops §5.2): round ``amax / max`` up to a power of two."""
    _, max_norm, _, _, element_dtype = layouts.MX_ELEMENTS[elem]
    k = x.shape[-1]
    nb = math.ceil(k / block_size)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, nb * block_size - k))
    blocks = xf.reshape(*xf.shape[:-1], nb, block_size)
    amax = blocks.abs().amax(-1)
    if max_low_bound > 0:
        amax = amax.clamp(min=max_low_bound)
    bits = (amax / torch.tensor(max_norm, dtype=torch.float32, device=x.device)).view(torch.int32).to(torch.int64)
    e, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    bump = ((e > 0) & (e < 254) & (mant > 0)) | ((e == 0) & (mant > 2**22))
    e = e + bump.to(torch.int64)
    recip = layouts.exp2_int(127 - e)  # fp32(1/scale), exact
    y = (blocks * recip.unsqueeze(-1)).reshape(*xf.shape[:-1], nb * block_size)[..., :k]
    return y.clamp(-max_norm, max_norm).to(getattr(torch, element_dtype)), e.to(torch.uint8)


def npu_dynamic_mx_quant(
    x: torch.Tensor,
    *,
    axis: int = -1,
    round_mode: str = "rint",
    dst_type: object = 296,
    block_size: int = 32,
    scale_alg: int = 0,
    dst_type_max: float = 0.0,
    max_low_bound: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX quantization along ``axis`` (ops §5.2). Returns ``(y, mxscale)``.

    ``dst_type``: 296 FP4 E2M1 (default), 297 E1M2, 292/``torch.float8_e4m3fn``, 291/``torch.float8_e5m2``.
    ``y``: FP8 with x's shape, or uint8 FP4 pairs with the **last** dim halved, even when ``axis`` is not the last.
    ``mxscale``: uint8 E8M0 with x's shape, except ``shape[axis] = ceil(ceil(D/block_size)/2)``, plus a trailing 2.
    Block j is at ``[…, j//2 (at axis), …, j%2]`` and the block count is padded with byte 0.
    scale_alg 0 is :func:`npuconv.layouts.mx_quantize`. scale_alg 1 is the cuBLAS-style FP8 rule.
    """
    del dst_type_max
    elem = layouts.mx_element(dst_type)
    fp4 = layouts.MX_ELEMENTS[elem][4] is None
    a = axis % x.dim()
    moved = x.movedim(a, -1)
    if scale_alg == 0:
        codes, scale = layouts.mx_quantize(moved, elem, block_size, round_mode)
    elif scale_alg == 1 and not fp4:
        codes, scale = _mx_quantize_cublas(moved, elem, block_size, max_low_bound)
    else:
        raise NotImplementedError(f"scale_alg={scale_alg} for {elem} is not emulated")
    codes = codes.movedim(-1, a)
    mxscale = layouts.mx_scale_pairs(scale).movedim(-2, a).contiguous()
    y = layouts.fp4_pack(codes.contiguous()) if fp4 else codes.contiguous()
    return y, mxscale


def npu_quantize(
    x: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    dtype: torch.dtype,
    axis: int = 1,
    div_mode: bool = True,
) -> torch.Tensor:
    """Static quantization (ops §8), with torch_npu's defaults ``axis=1, div_mode=True``.

    ``div_mode=True``: ``y = x / scales + zero_points``. ``div_mode=False`` (AscendQuantV2, which vllm-ascend W8A8
    static uses with ``axis=-1``): ``y = x * scales + zero_points``. Either is computed in fp32 and rounded half-even,
    then saturated (:data:`QUANTIZE_SATURATES`). ``scales``/``zero_points`` are 1-D of length ``x.shape[axis]`` or 1.
    ``dtype``: ``torch.qint8``/``torch.int8`` → int8; ``torch.quint8``/``torch.uint8`` → uint8;
    ``torch.qint32``/``torch.int32`` → int32; ``torch.quint4x2`` → int32 int4pack ``(…, K/8)``.
    """
    xf = x.to(torch.float32)
    a = axis % x.dim()
    shape = [1] * x.dim()
    shape[a] = -1

    def _shaped(v: torch.Tensor) -> torch.Tensor:
        v = v.to(torch.float32).reshape(-1)
        return v.reshape(()) if v.numel() == 1 else v.reshape(shape)

    y = xf / _shaped(scales) if div_mode else xf * _shaped(scales)
    if zero_points is not None:
        y = y + _shaped(zero_points)
    y = torch.nan_to_num(torch.round(y), nan=0.0)
    ranges = {
        torch.qint8: (-128, 127, torch.int8),
        torch.int8: (-128, 127, torch.int8),
        torch.quint8: (0, 255, torch.uint8),
        torch.uint8: (0, 255, torch.uint8),
        torch.qint32: (-(2**31), 2**31 - 1, torch.int32),
        torch.int32: (-(2**31), 2**31 - 1, torch.int32),
        torch.quint4x2: (-8, 7, torch.int8),
    }
    if dtype not in ranges:
        raise NotImplementedError(f"npu_quantize to {dtype} is not emulated")
    lo, hi, out = ranges[dtype]
    if QUANTIZE_SATURATES:
        q = y.to(torch.float64).clamp(lo, hi).to(torch.int64)
    else:
        span = hi - lo + 1
        q = ((y.to(torch.float64).clamp(-(2**62), 2**62).to(torch.int64) - lo) % span) + lo
    q = q.to(out)
    return int4pack(q) if dtype == torch.quint4x2 else q


# ----------------------------------------------------------------------------------------------
# layout ops
# ----------------------------------------------------------------------------------------------


def npu_trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0) -> torch.Tensor:
    """:func:`npuconv.layouts.trans_quant_param` (ops §4.3)."""
    return trans_quant_param(scale, offset, round_mode)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """int32 int4 values ``(d0, d1)`` → int32 ``(d0, d1/8)`` (ops §1). The values are masked with ``& 0xF``, not saturated.

    An fp32 weight (950 path) is first mapped to E2M1 codes with the truncating table lookup
    (:func:`npuconv.layouts.fp4_from_fp32_truncating`). ``inner_k_tiles`` is reserved and ignored. The
    emulation keeps ND: it never produces the NZ int32 C0=8 re-layout of an NZ input (use
    :func:`npuconv.layouts.nd_to_nz` for that storage).
    """
    del inner_k_tiles
    if weight.dtype == torch.float32:
        return int4pack(layouts.fp4_from_fp32_truncating(weight))
    if weight.dtype != torch.int32:
        raise ValueError(f"npu_convert_weight_to_int4pack needs int32 (or fp32 E2M1) input, got {weight.dtype}")
    return int4pack(weight.contiguous())


#: aclFormat ids the emulation accepts (ops §0.3). ND and every FRACTAL_NZ variant.
ACL_FORMATS = {2, 29, 50, 51, 52, 53, 54}


def npu_format_cast(t: torch.Tensor, acl_format: int, customize_dtype: object = None, input_dtype: object = None) -> torch.Tensor:
    """Identity. Emulated tensors always stay ND, because NZ is a hidden storage attribute that does not change the
    logical view (ops §3.1). The NZ storage bytes come from :func:`npuconv.layouts.nd_to_nz`."""
    del customize_dtype, input_dtype
    if int(acl_format) not in ACL_FORMATS:
        raise NotImplementedError(f"aclFormat {acl_format} is not emulated")
    return t


# ----------------------------------------------------------------------------------------------
# grouped matmul, MoE form (ops §6)
# ----------------------------------------------------------------------------------------------


def _expert_rows(group_list: torch.Tensor, group_list_type: int, experts: int) -> list[tuple[int, int]]:
    values = [int(v) for v in group_list.reshape(-1).tolist()]
    if group_list_type == 1:
        values = [sum(values[: i + 1]) for i in range(len(values))]
    elif group_list_type != 0:
        raise NotImplementedError(f"group_list_type={group_list_type} is not emulated")
    if len(values) != experts:
        raise ValueError(f"group_list has {len(values)} entries for {experts} experts")
    starts = [0, *values[:-1]]
    if any(e < s for s, e in zip(starts, values)):
        raise ValueError("group_list must be non-decreasing")
    return list(zip(starts, values))


def _a8w4_expert(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, pts: torch.Tensor | None) -> torch.Tensor:
    """A8W4 GMM numerics (ops §6.3): ``pts · (Σ_g s[g,n] Σ_{k∈g} x·W − 8·Σ_k W·s[g(k),n] + bias)``, fp32.

    Computed the kernel's way: each int8 ``x`` is split into ``x_hi = floor(x/16)`` and
    ``x_lo = (x & 0xF) − 8`` and the group sums are ``16·(x_hi@W) + (x_lo@W)`` (exact), which is
    ``x@W − 8·ΣW``; the ``bias`` (``scale_bias = 8·ΣW·s``) is what restores the missing term.
    """
    wv = _along_storage(w, int4unpack).to(torch.float64)  # (K, N)
    k, n = wv.shape
    if scale.dtype in (torch.int64, torch.uint64):
        s = decode_quant_param(scale)[0]
    else:
        s = scale.to(torch.float32)
    s = s.reshape(-1, n).to(torch.float64)  # (G, N)
    gs = k // s.shape[0]
    if gs * s.shape[0] != k:
        raise ValueError(f"{s.shape[0]} scale groups do not divide K={k}")
    # the kernel's two int4 halves of each int8 activation: x = 16·x_hi + x_lo + 8, both in [-8, 7]
    xi = x.to(torch.int16)
    x_hi = torch.div(xi, 16, rounding_mode="floor")
    x_lo = (xi & 0x0F) - 8
    wg = wv.reshape(s.shape[0], gs, n)

    def grouped(v: torch.Tensor) -> torch.Tensor:  # exact int4 × int4 partial sums per group (M, G, N)
        return torch.einsum("mgk,gkn->mgn", v.to(torch.float64).reshape(x.shape[0], s.shape[0], gs), wg)

    acc = 16.0 * grouped(x_hi) + grouped(x_lo)  # = Σ x·W − 8·Σ W per group
    y = (acc * s).sum(1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    if pts is not None:
        y = y * pts.to(torch.float64).reshape(-1, 1)
    return y.to(torch.float32)


def npu_grouped_matmul(
    x: Sequence[torch.Tensor],
    weight: Sequence[torch.Tensor],
    *,
    bias: Sequence[torch.Tensor] | None = None,
    scale: Sequence[torch.Tensor] | None = None,
    offset: Sequence[torch.Tensor] | None = None,
    antiquant_scale: Sequence[torch.Tensor] | None = None,
    antiquant_offset: Sequence[torch.Tensor] | None = None,
    per_token_scale: Sequence[torch.Tensor] | None = None,
    group_list: torch.Tensor | None = None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item: int = 0,
    group_type: int | None = None,
    group_list_type: int = 0,
    act_type: int = 0,
    output_dtype: torch.dtype | None = None,
    tuning_config=None,
) -> list[torch.Tensor]:
    """The MoE form of ``npu_grouped_matmul`` (ops §6.1): ``x=[(M, K)]``, ``weight=[(E, K, N)]``, ``group_type=0``.

    ``split_item`` is 2 or 3, giving one output ``(M, N)``. ``group_list`` int64 ``[E]`` holds cumulative row ends
    (``group_list_type=0``) or counts (1). Rows past the last end stay 0. Each expert's rows run through:

    - float x, integer weight: :func:`npu_weight_quant_batchmatmul` with ``antiquant_scale[e]`` (``[N]`` or
      ``[G, N]`` with group size K/G) and ``antiquant_offset[e]``, plus ``(w + off) * s``;
    - int8 x, int8 weight (or int32 × int32 int4): :func:`npu_quant_matmul` with ``scale[e]``,
      ``per_token_scale`` rows and ``bias[e]``;
    - int8 x, int32 int4 weight (A8W4, ops §6.3): the ``x_hi/x_lo`` decomposition formula with its ``-8·ΣW·s``
      term. The ``bias`` (``scale_bias = 8·ΣW·s``) cancels it;
    - float x, float weight: ``x @ W + bias``.

    The default ``output_dtype`` is bf16 for a bf16 scale and A8W4, fp16 for an fp32 scale, int8 for an int64 scale
    with int8 × int8, and x's dtype for float x.
    """
    del activation_input, activation_quant_scale, activation_quant_offset, act_type, tuning_config
    if len(x) != 1 or len(weight) != 1 or weight[0].dim() != 3:
        raise NotImplementedError("only the MoE form x=[(M,K)], weight=[(E,K,N)] is emulated")
    if split_item not in (2, 3) or group_type not in (0, None):
        raise NotImplementedError("only split_item 2/3 with group_type 0 is emulated")
    if group_list is None:
        raise ValueError("the MoE form needs group_list")
    xt, wt = x[0], weight[0]
    experts = wt.shape[0]

    def pick(params: Sequence[torch.Tensor] | None, e: int) -> torch.Tensor | None:
        return None if not params else params[0][e]

    rows = _expert_rows(group_list, group_list_type, experts)
    a8w4 = xt.dtype == torch.int8 and wt.dtype == torch.int32
    quant = not xt.dtype.is_floating_point
    if output_dtype is None:
        if not quant:
            output_dtype = xt.dtype
        elif a8w4:
            output_dtype = torch.bfloat16
        else:
            sdt = scale[0].dtype if scale else torch.float32
            output_dtype = {torch.bfloat16: torch.bfloat16, torch.int64: torch.int8, torch.uint64: torch.int8}.get(sdt, torch.float16)
    pts_all = per_token_scale[0] if per_token_scale else None

    outs: list[tuple[int, int, torch.Tensor]] = []
    n_out = None
    for e, (start, end) in enumerate(rows):
        if end == start:
            continue
        xe, we = xt[start:end], wt[e]
        pts = None if pts_all is None else pts_all[start:end]
        if a8w4:
            ye = _a8w4_expert(xe, we, scale[0][e], pick(bias, e), pts).to(output_dtype)
        elif quant:
            ye = npu_quant_matmul(
                xe, we, scale[0][e], offset=pick(offset, e), pertoken_scale=pts, bias=pick(bias, e), output_dtype=output_dtype
            )
        elif antiquant_scale:
            s = antiquant_scale[0][e]
            k = xe.shape[-1]
            group = 0 if s.dim() == 1 or s.shape[0] == 1 else k // s.shape[0]
            off = pick(antiquant_offset, e)
            if group == 0:
                s = s.reshape(-1)
                off = None if off is None else off.reshape(-1)
            ye = npu_weight_quant_batchmatmul(xe, we, s, off, bias=pick(bias, e), antiquant_group_size=group).to(output_dtype)
        else:
            ye = _mm(xe, we).to(torch.float32)
            b = pick(bias, e)
            if b is not None:
                ye = ye + b.to(torch.float32)
            ye = ye.to(output_dtype)
        n_out = ye.shape[-1]
        outs.append((start, end, ye))
    if n_out is None:  # no rows at all: infer N from the weight
        n_out = wt.shape[-1] * (8 if wt.dtype == torch.int32 and not _is_transposed(wt) else 1)
    y = torch.zeros((xt.shape[0], n_out), dtype=output_dtype, device=xt.device)
    for start, end, ye in outs:
        y[start:end] = ye
    return [y]


# ----------------------------------------------------------------------------------------------
# dual-level MX (ops §5.3, §5.4; Ascend 950)
# ----------------------------------------------------------------------------------------------


def npu_dynamic_dual_level_mx_quant(
    x: torch.Tensor, *, smooth_scale: torch.Tensor | None = None, round_mode: str = "rint"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dual-level MX FP4 quantization along the last dim (ops §5.3): :func:`npuconv.layouts.dual_level_mx_quantize`.

    Returns ``(y, level0_scale, level1_scale)``: ``y`` uint8 FP4 pairs ``(…, D/2)``; ``level0_scale`` fp32
    ``(…, ceil(D/512))``; ``level1_scale`` uint8 ``(…, ceil(D/64), 2)`` (block j at ``[…, j//2, j%2]``, the block
    count padded to even with byte 0). ``smooth_scale`` is not supported by the op yet.
    """
    if smooth_scale is not None:
        raise NotImplementedError("smooth_scale is not supported by npu_dynamic_dual_level_mx_quant (ops §5.3)")
    if x.shape[-1] % 2:
        raise ValueError("dual-level MX quantization needs an even last dim (FP4 pairs)")
    codes, level0, level1 = layouts.dual_level_mx_quantize(x, round_mode)
    return layouts.fp4_pack(codes), level0, layouts.mx_scale_pairs(level1)


def npu_dual_level_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    x1_level0_scale: torch.Tensor,
    x2_level0_scale: torch.Tensor,
    x1_level1_scale: torch.Tensor,
    x2_level1_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dual-level MXFP4 matmul (ops §5.4 golden), ``(M, N)`` in ``output_dtype`` (bf16/fp16).

    ``x1`` uint8 FP4 ``(M, K/2)``; ``x2`` uint8 FP4 ``(N, K/2)`` (the weight stored N × K; FRACTAL_NZ on the
    device, ND here); ``x1_level0_scale`` fp32 ``(M, ceil(K/512))``, ``x2_level0_scale`` fp32 ``(ceil(K/512), N)``;
    ``x1_level1_scale`` uint8 ``(M, ceil(K/64), 2)``, ``x2_level1_scale`` uint8 ``(N, ceil(K/64), 2)``; ``bias`` fp32 ``(N,)``::

        out[m,n] = Σ_i x1_l0[m,i]·x2_l0[i,n]·Σ_{k∈512-block i} (x1[m,k]·2**(s1[m,k/32]−127))·(x2[n,k]·2**(s2[n,k/32]−127)) + bias[n]

    summed in float64, rounded once to fp32, then cast to ``output_dtype``.
    """
    if x1.dtype != torch.uint8 or x2.dtype != torch.uint8:
        raise ValueError("dual-level quant matmul takes uint8 FP4 pairs for x1 and x2")
    a = fp4_decode(fp4_unpack(x1)).to(torch.float64)  # (M, K)
    b = fp4_decode(fp4_unpack(x2)).to(torch.float64)  # (N, K)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"x1 K={a.shape[-1]} does not match x2 K={b.shape[-1]}")
    m, k = a.shape
    n = b.shape[0]
    kb = math.ceil(k / layouts.DUAL_L1_BLOCK)
    nb0 = math.ceil(k / layouts.DUAL_L0_BLOCK)
    s1 = e8m0_decode(layouts.mx_scale_unpairs(x1_level1_scale, kb)).to(torch.float64)  # (M, Kb)
    s2 = e8m0_decode(layouts.mx_scale_unpairs(x2_level1_scale, kb)).to(torch.float64)  # (N, Kb)
    a = a * s1.repeat_interleave(layouts.DUAL_L1_BLOCK, dim=-1)[:, :k]
    b = b * s2.repeat_interleave(layouts.DUAL_L1_BLOCK, dim=-1)[:, :k]
    pad = nb0 * layouts.DUAL_L0_BLOCK - k
    a = torch.nn.functional.pad(a, (0, pad)).reshape(m, nb0, layouts.DUAL_L0_BLOCK)
    b = torch.nn.functional.pad(b, (0, pad)).reshape(n, nb0, layouts.DUAL_L0_BLOCK)
    partial = torch.einsum("mik,nik->imn", a, b)  # (nb0, M, N)
    l0 = x1_level0_scale.to(torch.float64).T.unsqueeze(-1) * x2_level0_scale.to(torch.float64).unsqueeze(1)  # (nb0, M, N)
    y = (partial * l0).sum(0).to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(output_dtype)
