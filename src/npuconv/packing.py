"""Bit-level packing primitives shared by readers and writers. All work on bytes (uint8), vectorized.

Conventions (every function below):
- A *bitstream* is LSB-first: element ``i`` of a row occupies bits ``[i*b, i*b + b)`` of the row,
  where bit ``8*m + t`` is bit ``t`` of byte ``m``. An int32 word ``w`` stored little-endian is
  bytes ``w & 0xFF, (w >> 8) & 0xFF, …``, so "element j of a word at bits [j*b, j*b+b)" (GPTQ,
  compressed-tensors ≥ 0.18, Ascend int4pack) is exactly this bitstream over the word's bytes.
- Packing is always along the **last** dimension; callers transpose first when a format packs
  along another axis.
- Codes are unsigned ``uint8`` in ``[0, 2**b)``; signed two's-complement nibbles are their
  unsigned images (``v & 0xF``).
"""

from __future__ import annotations

import math
import sys

from npuconv.lazy_torch import torch

# AWQ GEMM: nibble i of a word holds logical column 8c + AWQ_ORDER[i]
# (AutoAWQ awq/utils/packing_utils.py, checkpoint_formats.md §2.2)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column j sits at nibble AWQ_REVERSE_ORDER[j]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("npuconv assumes a little-endian host (safetensors data is little-endian)")


def as_bytes(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret the last dim of a contiguous integer tensor as little-endian bytes (uint8)."""
    if words.dtype == torch.uint8:
        return words
    if not words.is_contiguous() or (words.dim() and words.stride(-1) != 1):
        # also catches a size-1 last dim that reports "contiguous" with a stride != 1 (.view() refuses it)
        words = torch.empty(words.shape, dtype=words.dtype).copy_(words)
    return words.view(torch.uint8)


def unpack_bitstream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` codes of ``bits`` bits from the LSB-first bitstream along the last dim.

    ``packed``: any integer dtype ``[..., W]`` (int32 words or bytes); returns uint8 ``[..., count]``.
    Values may straddle byte and word boundaries (3-bit). Works on bytes only: no int32 temporary
    of the unpacked size.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    data = as_bytes(packed)
    nbytes_needed = math.ceil(count * bits / 8)
    if data.shape[-1] < nbytes_needed:
        raise ValueError(f"{data.shape[-1]} bytes hold fewer than {count} codes of {bits} bits")
    if bits == 8:
        return data[..., :count]
    if bits == 4:
        # fast path: widen each byte to an int16 and move its high nibble to the next byte, so the
        # little-endian bytes of the int16 are (low nibble, high nibble) = codes (2m, 2m+1)
        wide = data[..., :nbytes_needed].to(torch.int16)
        high = wide & 0xF0
        high <<= 4
        wide &= 0x0F
        wide |= high
        return wide.view(torch.uint8)[..., :count]
    cycle_bytes = bits // math.gcd(bits, 8)  # bytes per repeating cycle (lcm(b, 8) / 8)
    per_cycle = 8 * cycle_bytes // bits  # codes per cycle
    cycles = math.ceil(count / per_cycle)
    data = data[..., : cycles * cycle_bytes]
    if data.shape[-1] < cycles * cycle_bytes:  # pad the last partial cycle with zero bytes
        pad = cycles * cycle_bytes - data.shape[-1]
        data = torch.nn.functional.pad(data, (0, pad))
    data = data.unflatten(-1, (cycles, cycle_bytes))
    mask = (1 << bits) - 1
    out = torch.empty(*data.shape[:-1], per_cycle, dtype=torch.uint8)
    for j in range(per_cycle):
        byte, shift = divmod(j * bits, 8)
        target = out[..., j]
        torch.bitwise_right_shift(data[..., byte], shift, out=target)
        if shift + bits > 8:
            target |= data[..., byte + 1] << (8 - shift)
        target &= mask
    return out.flatten(-2)[..., :count]


def unpack_rows(words: torch.Tensor, bits: int, count: int, *, padded: bool = False) -> torch.Tensor:
    """Unpack codes packed along the **last** dim: int32 ``[..., W]`` → uint8 ``[..., count]``.

    ``padded=False``: the LSB-first bitstream (:func:`unpack_bitstream`; codes may straddle words).
    ``padded=True``: ``32 // bits`` codes per word (:func:`unpack_padded_words`, compressed-tensors
    ≤ 0.17); the same bits as the bitstream when ``bits`` divides 32.
    """
    if padded and 32 % bits:
        return unpack_padded_words(words, bits, count)
    return unpack_bitstream(words, bits, count)


def unpack_columns(words: torch.Tensor, bits: int, count: int, *, padded: bool = False) -> torch.Tensor:
    """Unpack codes packed along **dim 0** (GPTQ ``qweight``, compressed-tensors zero points):
    words ``[W, C]`` → uint8 ``[count, C]``.

    Column ``c`` of ``words``, read top to bottom as consecutive little-endian words, is the
    LSB-first bitstream of column ``c`` of the result (``padded``: as in :func:`unpack_rows`). For
    2/4/8 bits (codes never straddle a byte) each output row is one shift-and-mask of one byte
    plane, written contiguously: no transpose of the packed or the unpacked data. Other widths fall
    back to transposing and :func:`unpack_rows`.
    """
    if (padded and 32 % bits) or bits not in (2, 4, 8) or words.dtype != torch.int32:
        # a fresh row-major copy: ``.t().contiguous()`` keeps odd strides on size-1 dims, which a byte view rejects
        rows = words.new_empty(words.shape[::-1]).copy_(words.t())
        return unpack_rows(rows, bits, count, padded=padded).t().contiguous()
    rows, cols = words.shape
    per_byte = 8 // bits
    # byte planes [rows, 4, cols]: plane m of row r holds codes 4r·per_byte + m·per_byte + j, j < per_byte
    planes = as_bytes(words).reshape(rows, cols, 4).permute(0, 2, 1).contiguous()
    out = torch.empty(rows, 4, per_byte, cols, dtype=torch.uint8)
    for j in range(per_byte):
        target = out[:, :, j]
        torch.bitwise_right_shift(planes, j * bits, out=target)
        if bits < 8:
            target &= (1 << bits) - 1
    return out.reshape(rows * 4 * per_byte, cols)[:count]


def pack_bitstream(codes: torch.Tensor, bits: int, word_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`unpack_bitstream`: codes ``[..., n]`` (values < 2**bits) → words ``[..., ceil(n*b/w)]``.

    The stream is zero-padded to a whole number of words of ``word_dtype`` (default int32).
    """
    word_dtype = torch.int32 if word_dtype is None else word_dtype
    codes = codes.to(torch.uint8)
    n = codes.shape[-1]
    word_bits = 8 * word_dtype.itemsize
    nwords = math.ceil(n * bits / word_bits)
    if bits == 8:
        data = codes
    else:
        cycle_bytes = bits // math.gcd(bits, 8)
        per_cycle = 8 * cycle_bytes // bits
        cycles = math.ceil(n / per_cycle)
        padded = torch.nn.functional.pad(codes, (0, cycles * per_cycle - n)).unflatten(-1, (cycles, per_cycle))
        out = torch.zeros(*padded.shape[:-1], cycle_bytes, dtype=torch.uint8)
        for j in range(per_cycle):
            byte, shift = divmod(j * bits, 8)
            value = padded[..., j]
            out[..., byte] |= value << shift
            if shift + bits > 8:
                out[..., byte + 1] |= value >> (8 - shift)
        data = out.flatten(-2)
    total = nwords * word_dtype.itemsize
    out = torch.zeros(*data.shape[:-1], total, dtype=torch.uint8)
    used = min(total, data.shape[-1])
    out[..., :used] = data[..., :used]
    return out.view(word_dtype)


def unpack_padded_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors ≤ 0.17 layout: ``32 // bits`` codes per int32 word, unused high bits.

    Code ``j`` of word ``w`` is at bits ``[j*b, j*b+b)`` of that word (3-bit: 10 per word, bits
    30–31 unused). ``words``: int32 ``[..., W]``; returns uint8 ``[..., count]``.
    """
    per_word = 32 // bits
    mask = (1 << bits) - 1
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (unsigned.unsqueeze(-1) >> shifts) & mask
    return codes.flatten(-2)[..., :count].to(torch.uint8)


def pack_padded_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_padded_words` (tests, and writers of the legacy layout)."""
    per_word = 32 // bits
    n = codes.shape[-1]
    nwords = math.ceil(n / per_word)
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, nwords * per_word - n)).unflatten(-1, (nwords, per_word))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: even element in the low nibble.

    ``codes``: ``[..., 2m]`` any integer dtype (only the low 4 bits are kept, so signed int4 in
    [-8, 7] packs as two's complement); returns uint8 ``[..., m]``. This is the Ascend byte rule
    (torch_npu_ops.md §0.1) and msModelSlim's ``_pack_int4`` along the packed axis.
    """
    data = codes.to(torch.uint8)
    if data.is_contiguous() and data.dim() and data.shape[-1] % 2 == 0 and data.storage_offset() % 2 == 0:
        # fast path: each little-endian int16 holds one (even, odd) pair; (x | x >> 4) puts the odd
        # nibble above the even one, and the narrowing cast keeps the low byte
        pairs = data.view(torch.int16) & 0x0F0F
        return (pairs | (pairs >> 4)).to(torch.uint8)
    nibbles = data & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8/int8 ``[..., m]`` → unsigned nibbles uint8 ``[..., 2m]``."""
    data = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed.to(torch.uint8)
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


def signed_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles 0..15 → signed int4 values -8..7 as int8 (two's complement)."""
    return ((nibbles.to(torch.int8) ^ 8) - 8).to(torch.int8)


def awq_unpack(words: torch.Tensor, count: int) -> torch.Tensor:
    """AWQ GEMM words ``[..., count/8]`` (interleaved nibble order) → uint8 codes ``[..., count]`` in logical order."""
    data = as_bytes(words)
    data = data.unflatten(-1, (data.shape[-1] // 4, 4))  # [..., words, 4 bytes]
    out = torch.empty(*data.shape[:-1], 8, dtype=torch.uint8)
    for column, nibble in enumerate(AWQ_REVERSE_ORDER):  # logical column j sits in nibble REVERSE[j]
        byte, high = divmod(nibble, 2)
        target = out[..., column]
        if high:
            torch.bitwise_right_shift(data[..., byte], 4, out=target)
        else:
            torch.bitwise_and(data[..., byte], 0xF, out=target)
    return out.flatten(-2)[..., :count]


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_unpack`: logical codes ``[..., 8m]`` → AWQ-ordered int32 ``[..., m]``."""
    grouped = codes.to(torch.uint8).unflatten(-1, (-1, 8))
    return pack_bitstream(grouped[..., list(AWQ_ORDER)].flatten(-2), 4)


# ------------------------------------------------------------------------ 4-bit word repacking
# Fused paths for 4-bit sources: the codes stay packed 8 to an int32 word and only the *position*
# of each nibble changes, so no tensor of unpacked codes (one byte per code) is ever made.

# int32 words per chunk of a multi-pass bit shuffle (2 MiB): the passes of a chunk hit the cache,
# and a layer takes ~100 torch calls, not thousands (16 producer threads queue on the GIL for each
# call). Best of 256 KiB … 8 MiB on one 4096 × 1376-word layer, one core: 17 → 9 ms.
CACHE_CHUNK_WORDS = 1 << 19
NIBBLE_HIGH_BITS = -0x77777778  # 0x88888888 as int32: bit 3 of every nibble (XOR: unsigned q <-> signed q - 8)


def transpose_nibble_blocks(
    words: torch.Tensor, dim: int, out: torch.Tensor | None = None, out_dim: int | None = None
) -> torch.Tensor:
    """Transpose each 8 × 8 nibble matrix formed by 8 int32 words along ``dim`` (size 8); returns
    ``out``: a new tensor shaped like ``words`` if None, else a tensor that must not overlap
    ``words`` with the words of each matrix along ``out_dim`` (default ``dim``) and the other dims
    as in ``words`` (so ``[R, J, 8]`` along 2 may go to ``[R, 8, J]`` along 1).

    Matrix element ``[t, i]`` is nibble ``i`` (bits ``4i..4i+3``) of word ``t``; in the result,
    nibble ``i`` of word ``t`` holds what was nibble ``t`` of word ``i``. Done as a transpose of
    2 × 2 blocks (the block transpose of Hacker's Delight §7-3, "transposing a bit matrix", applied
    to 4-bit elements): byte ``b`` of word ``t`` holds the 2 × 2 nibble block at block position
    ``(t // 2, b)``, so one byte gather moves every block to its transposed place — byte ``t // 2``
    of word ``2b + t % 2`` ← byte ``b`` of word ``t`` (bytes little-endian) — and one delta swap
    transposes inside the blocks: the high nibble of each byte of word ``2m`` is exchanged with the
    low nibble of the same byte of word ``2m + 1``. ``words`` and ``out``: int32, any shape, last
    dim contiguous, 8 words along ``dim``; arithmetic right shifts are harmless because every
    shifted value is masked to the low bits.
    """
    if words.dtype != torch.int32 or words.shape[dim] != 8 or words.stride(-1) != 1:
        raise ValueError(f"expected int32 words with 8 along dim {dim}, got {words.dtype} {list(words.shape)}")
    if out is None:
        out = torch.empty_like(words, memory_format=torch.contiguous_format)
    out_dim = dim if out_dim is None else out_dim
    if out.dtype != torch.int32 or out.shape[out_dim] != 8 or out.stride(-1) != 1:
        raise ValueError(f"expected int32 out with 8 along dim {out_dim}, got {out.dtype} {list(out.shape)}")
    source = _byte_lanes(words, dim).unflatten(-2, (4, 2))  # [..., t // 2, t % 2, byte b]
    _byte_lanes(out, out_dim).unflatten(-2, (4, 2)).copy_(source.transpose(-3, -1))  # [..., b, t % 2, byte t // 2]
    pairs = out.movedim(out_dim, 0).unflatten(0, (4, 2))  # [m, {word 2m, word 2m + 1}, ...]
    low, high = pairs[:, 0], pairs[:, 1]
    delta = torch.bitwise_right_shift(low, 4)
    delta ^= high
    delta &= 0x0F0F0F0F
    high ^= delta
    delta <<= 4
    low ^= delta
    return out


BYTE_BLOCK_ROUNDS = ((4, 32, 0x00000000FFFFFFFF), (2, 16, 0x0000FFFF0000FFFF), (1, 8, 0x00FF00FF00FF00FF))


def transpose_byte_blocks(words: torch.Tensor) -> torch.Tensor:
    """Transpose, in place, each 8 × 8 byte matrix held by 8 int64 words along dim 0: ``words``
    int64 ``[8, M]``, contiguous; matrix ``m`` is column ``m``, element ``[j, i]`` is byte ``i``
    (little-endian) of ``words[j, m]``. Afterwards byte ``i`` of word ``j`` holds what was byte
    ``j`` of word ``i``. Three delta-swap rounds (Hacker's Delight §7-3 on bytes): exchange the
    upper 4 bytes of words 0–3 with the lower 4 bytes of words 4–7, then 2-byte halves of word pairs
    two apart, then single bytes of neighbouring words. Returns ``words``.
    """
    if words.dtype != torch.int64 or words.dim() != 2 or words.shape[0] != 8 or not words.is_contiguous():
        raise ValueError(f"expected contiguous int64 [8, M], got {words.dtype} {list(words.shape)}")
    delta = torch.empty(4, words.shape[1], dtype=torch.int64)
    for step, shift, mask in BYTE_BLOCK_ROUNDS:
        pairs = words.view(8 // (2 * step), 2, step, -1)  # [block, {low word, high word}, step, M]
        low, high = pairs[:, 0], pairs[:, 1]
        d = delta.view(8 // (2 * step), step, -1)
        torch.bitwise_right_shift(low, shift, out=d)  # arithmetic shift: the sign bits are masked off
        d ^= high
        d &= mask
        high ^= d
        d <<= shift
        low ^= d
    return words


def _byte_lanes(words: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 view ``[..., 8, 4]`` of int32 ``words``: the words along ``dim`` second to last, their 4
    little-endian bytes last (``words.stride(-1) == 1``)."""
    dim %= words.dim()
    data = words.view(torch.uint8).unflatten(-1, (words.shape[-1], 4))
    return data.movedim(dim, -2)


def int4_words_k_to_n(words: torch.Tensor, flip: int = 0) -> torch.Tensor:
    """4-bit codes packed along K in words ``[K/8, N]`` (GPTQ ``qweight``) → packed along N ``[K, N/8]``.

    Input: nibble ``i`` of word ``[r, n]`` is code ``(n, k = 8r + i)``. Output: nibble ``t`` of word
    ``[k, j]`` is code ``(n = 8j + t, k)`` — the LSB-first bitstream along N of the ``[K, N]`` code
    matrix, i.e. :func:`pack_bitstream` of the transposed codes. N must be a multiple of 8; the
    input is not modified. One byte gather and one delta swap (:func:`transpose_nibble_blocks`):
    the words of one block are 8 neighbours of a row, so the gather reads memory in order.
    ``flip`` is then XORed into every output word, in place (:data:`NIBBLE_HIGH_BITS`: unsigned →
    two's-complement codes).
    """
    rows, n = words.shape
    if words.dtype != torch.int32 or n % 8:
        raise ValueError(f"expected int32 [K/8, N] with N % 8 == 0, got {words.dtype} {list(words.shape)}")
    blocks = words.contiguous().view(rows, n // 8, 8)  # [r, j, t]: nibble i = code (8j + t, 8r + i)
    out = torch.empty(rows, 8, n // 8, dtype=torch.int32)
    transpose_nibble_blocks(blocks, 2, out, 1)  # out[r, i, j]: nibble t = code (8j + t, 8r + i)
    if flip:
        out ^= flip
    return out.reshape(rows * 8, n // 8)  # [k = 8r + i, j]


def int4_words_nk_to_kn(words: torch.Tensor, flip: int = 0) -> torch.Tensor:
    """4-bit codes of ``[N, K]`` packed along K, words ``[N, K/8]`` (compressed-tensors
    ``weight_packed``, AWQ GEMV) → the same codes packed along N, words ``[K, N/8]``.

    Input: nibble ``i`` of word ``[n, r]`` is code ``(n, 8r + i)``; its transpose ``[K/8, N]`` is
    GPTQ's layout, so this is :func:`int4_words_k_to_n` of it (a plain 2-D transpose first keeps
    the nibble gather's reads in order; gathering from ``[N, K/8]`` directly is ~5× slower).
    Output and ``flip`` as in :func:`int4_words_k_to_n`. N must be a multiple of 8; the input is
    not modified.
    """
    n, width = words.shape
    if words.dtype != torch.int32 or n % 8:
        raise ValueError(f"expected int32 [N, K/8] with N % 8 == 0, got {words.dtype} {list(words.shape)}")
    return int4_words_k_to_n(words.t().contiguous(), flip)


def awq_words_to_bitstream(words: torch.Tensor, flip: int = 0) -> torch.Tensor:
    """AWQ GEMM words (nibble ``p`` holds logical element ``8c + AWQ_ORDER[p]``) → the same words
    with nibble ``t`` holding element ``8c + t`` (LSB-first bitstream order), shape unchanged.

    AWQ's order (0, 2, 4, 6, 1, 3, 5, 7) is a perfect shuffle of the nibbles; two delta swaps
    undo it: exchange nibbles 2,3 with 4,5 (→ 0 2 1 3 4 6 5 7), then 1 with 2 and 5 with 6.
    ``flip`` is XORed into every word on the way (:data:`NIBBLE_HIGH_BITS`: unsigned → two's-complement
    codes; a nibble move does not change it). ``words``: int32, any shape; the input is not
    modified. Runs over :data:`CACHE_CHUNK_WORDS`
    words at a time, so its ten passes read and write cache, not memory (~2× faster per layer).
    """
    if words.dtype != torch.int32:
        raise ValueError(f"expected int32 AWQ words, got {words.dtype}")
    out = torch.empty(words.shape, dtype=torch.int32)
    flat_in, flat_out = words.reshape(-1), out.view(-1)
    scratch = torch.empty(2, min(CACHE_CHUNK_WORDS, flat_out.numel()), dtype=torch.int32)
    for start in range(0, flat_out.numel(), CACHE_CHUNK_WORDS):
        chunk = flat_out[start:start + CACHE_CHUNK_WORDS]
        torch.bitwise_xor(flat_in[start:start + CACHE_CHUNK_WORDS], flip, out=chunk)
        delta, shifted = scratch[:, :chunk.numel()]
        for shift, mask in ((8, 0x0000FF00), (4, 0x00F000F0)):
            torch.bitwise_right_shift(chunk, shift, out=delta)
            delta ^= chunk
            delta &= mask
            chunk ^= delta
            torch.bitwise_left_shift(delta, shift, out=shifted)
            chunk ^= shifted
    return out
