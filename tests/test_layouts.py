"""Hand-checked vectors and round trips for npuconv.layouts.

"ops §x" = docs/research/torch_npu_ops.md, "loaders §x" = docs/research/npu_loaders.md.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npuconv import layouts as L
from npuconv.packing import transpose_byte_blocks

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- int4pack (ops §0.1, §1)


def test_int4pack_hand_vector():
    # nibbles e0..e7 = 1, F, 2, E, 3, D, 4, 8; e_t sits in bits 4t..4t+3 -> 0x84D3E2F1 (ops §0.1 int32 rule)
    values = torch.tensor([[1, -1, 2, -2, 3, -3, 4, -8]], dtype=torch.int8)
    packed = L.int4pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() == 0x84D3E2F1 - 2**32
    assert torch.equal(L.int4pack(values.to(torch.int32)), packed)  # int32 input, as the torch_npu op takes
    assert torch.equal(L.int4unpack(packed), values)


def test_int4pack_second_word_and_wrap():
    values = torch.zeros(2, 16, dtype=torch.int32)
    values[1, 9] = 7  # word 1, nibble 1 -> bits 4..7
    values[0, 15] = 9  # out of range: masked to nibble 9 (ops §1: no saturation), which reads back as -7
    packed = L.int4pack(values)
    assert packed.shape == (2, 2)
    assert packed[1, 1].item() == 0x70 and packed[1, 0].item() == 0
    assert packed[0, 1].item() == 0x90000000 - 2**32
    assert L.int4unpack(packed)[0, 15].item() == -7


def test_int4pack_bytes_view_equals_int4pack():
    # loaders §1.2: 2 x int4 per int8 (even in the low nibble) viewed as int32 == int4pack
    values = torch.randint(-8, 8, (3, 5, 24), dtype=torch.int8)
    as_bytes = L.int4pack_bytes(values)
    assert as_bytes.dtype == torch.int8 and as_bytes.shape == (3, 5, 12)
    assert torch.equal(as_bytes.view(torch.int32), L.int4pack(values))
    assert torch.equal(L.int4unpack_bytes(as_bytes), values)


def test_int4pack_rejects_bad_input():
    with pytest.raises(ValueError):
        L.int4pack(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError):
        L.int4pack(torch.zeros(2, 8))


@FAST
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    rows=st.integers(1, 9),
    words=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    as_int32=st.booleans(),
)
def test_int4pack_round_trip(batch, rows, words, seed, as_int32):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (*batch, rows, 8 * words), generator=gen, dtype=torch.int8)
    packed = L.int4pack(values.to(torch.int32) if as_int32 else values)
    assert packed.shape == (*batch, rows, words) and packed.dtype == torch.int32
    assert torch.equal(L.int4unpack(packed), values)
    # element 8j+t in bits 4t..4t+3 of word j, checked arithmetically
    j, t = divmod(int(torch.randint(0, 8 * words, (1,), generator=gen)), 8)
    nibble = (packed[..., j].to(torch.int64) >> (4 * t)) & 0xF
    assert torch.equal(nibble, values[..., 8 * j + t].to(torch.int64) & 0xF)


# ---------------------------------------------------------------- FRACTAL_NZ (ops §3)


def test_nz_c0_table():
    # ops §3.2 A2/A3 table
    assert L.nz_c0(torch.float16) == 16 and L.nz_c0(torch.bfloat16) == 16
    assert L.nz_c0(torch.int8) == 32 and L.nz_c0(torch.uint8) == 32 and L.nz_c0(torch.float8_e4m3fn) == 32
    assert L.nz_c0(torch.float32) == 16 and L.nz_c0(torch.int32) == 16
    assert L.nz_c0(torch.int32, int4_packed=True) == 8
    with pytest.raises(ValueError):
        L.nz_c0(torch.float16, int4_packed=True)
    with pytest.raises(ValueError):
        L.nz_c0(torch.float64)


@pytest.mark.parametrize(
    ("dtype", "c0", "shape", "element", "nz_index", "storage"),
    [
        # fp16, C0=16: nd[17, 35] -> c1 = 35//16 = 2, r1 = 1, r0 = 1, c0 = 3; storage [3, 2, 16, 16]
        (torch.float16, 16, (20, 40), (17, 35), (2, 1, 1, 3), (3, 2, 16, 16)),
        # int8, C0=32: nd[2, 32] -> c1 = 1, r1 = 0, r0 = 2, c0 = 0; storage [2, 1, 16, 32]
        (torch.int8, 32, (3, 33), (2, 32), (1, 0, 2, 0), (2, 1, 16, 32)),
        # int4pack-ed int32, C0=8 (ops §1 step 3): nd[5, 8] -> (1, 0, 5, 0); storage [2, 1, 16, 8]
        (torch.int32, 8, (16, 9), (5, 8), (1, 0, 5, 0), (2, 1, 16, 8)),
        # batch dims stay in front (ops §3.1): [2, 5, 3] fp16, nd[1, 4, 2] -> (1, 0, 0, 4, 2)
        (torch.float16, 16, (2, 5, 3), (1, 4, 2), (1, 0, 0, 4, 2), (2, 1, 1, 16, 16)),
    ],
)
def test_nd_to_nz_hand_placed(dtype, c0, shape, element, nz_index, storage):
    nd = torch.zeros(shape, dtype=dtype)
    nd[element] = 7
    nz = L.nd_to_nz(nd, c0)
    assert tuple(nz.shape) == storage == L.nz_storage_shape(shape, c0)
    assert nz.is_contiguous() and nz.dtype == dtype
    assert nz[nz_index].item() == 7
    assert nz.to(torch.float32).sum().item() == 7  # every other position, padding included, is 0
    assert torch.equal(L.nz_to_nd(nz, shape[-2], shape[-1]), nd)


@pytest.mark.parametrize("dtype, c0", [(torch.int8, 32), (torch.float16, 16), (torch.int32, 8)])
def test_nd_to_nz_spans_several_tiles_in_both_directions(dtype, c0):
    # ND [40, 2*c0 + 5]: 3 row tiles (16, 16, 8 + padding) x 3 column tiles (c0, c0, 5 + padding). Every
    # element is placed by the rule itself, element by element (ops §3.1: nz[c1, r1, r0, k] = nd[16 r1 + r0, c0 c1 + k]),
    # so a swapped tile order (r1 before c1) or a transposed fractal (k before r0) cannot pass.
    rows, cols = 40, 2 * c0 + 5
    nd = (torch.arange(rows * cols) % 127 + 1).reshape(rows, cols).to(dtype)
    expected = torch.zeros(3, 3, 16, c0, dtype=dtype)
    for r in range(rows):
        for c in range(cols):
            expected[c // c0, r // 16, r % 16, c % c0] = nd[r, c]
    assert torch.equal(L.nd_to_nz(nd, c0), expected)
    assert torch.equal(L.nz_to_nd(expected, rows, cols), nd)
    # two hand-placed elements in different tiles of both axes
    assert expected[1, 2, 1, 3] == nd[33, c0 + 3] and expected[2, 0, 15, 4] == nd[15, 2 * c0 + 4]


def test_nd_to_nz_padding_is_zero():
    nd = torch.ones(20, 40, dtype=torch.float16)
    nz = L.nd_to_nz(nd, 16)
    assert nz[:, 1, 4:, :].abs().sum() == 0  # rows 20..31 (ops §3.1 padding = 0)
    assert nz[2, :, :, 8:].abs().sum() == 0  # cols 40..47
    assert nz.to(torch.float32).sum().item() == 20 * 40


def test_byte_block_transpose_hand_worked():
    # word j of matrix m holds bytes 0x<j><i> (i = byte index); transposed, word j byte i holds 0x<i><j>
    rows = [int.from_bytes(bytes(16 * j + i for i in range(8)), "little", signed=True) for j in range(8)]
    words = torch.tensor(rows, dtype=torch.int64).reshape(8, 1).repeat(1, 3).contiguous()
    transpose_byte_blocks(words)
    for j in range(8):
        assert words[j, 2].item().to_bytes(8, "little", signed=True) == bytes(16 * i + j for i in range(8))


@pytest.mark.parametrize("shape", [(32, 16), (64, 48), (2, 96, 32), (160, 48), (128, 1024)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3 * 32 * 48])  # one chunk; chunks of 3 bands, the last partial
def test_nd_to_nz_of_transposed_bytes_places_every_element(shape, dtype, chunk_bytes, monkeypatch):
    monkeypatch.setattr(L, "NZ_CHUNK_BYTES", chunk_bytes)
    # the word-wise fast path (a transposed view of contiguous bytes, C0 = 32) against the rule
    # itself, element by element: nz[..., c1, r1, r0, k] = t[..., 16 r1 + r0, 32 c1 + k]
    gen = torch.Generator().manual_seed(len(shape) * shape[-1])
    source = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen).view(dtype)
    t = source.transpose(-1, -2)  # [*B, K, N]: rows K % 16 == 0, cols N % 32 == 0
    nz = L.nd_to_nz(t, 32)
    *batch, rows, cols = t.shape
    assert nz.dtype == dtype and nz.is_contiguous() and tuple(nz.shape) == (*batch, cols // 32, rows // 16, 16, 32)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    placed = nz.view(torch.uint8)[..., c // 32, r // 16, r % 16, c % 32]
    assert torch.equal(placed, t.view(torch.uint8))


_NZ_DTYPES = [torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.float32]


@FAST
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    dtype_index=st.integers(0, len(_NZ_DTYPES) - 1),
    int4_packed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nd_nz_round_trip(batch, rows, cols, dtype_index, int4_packed, seed):
    dtype = _NZ_DTYPES[dtype_index]
    c0 = L.nz_c0(dtype, int4_packed=int4_packed and dtype == torch.int32)
    gen = torch.Generator().manual_seed(seed)
    nd = torch.randint(1, 100, (*batch, rows, cols), generator=gen).to(dtype)
    nz = L.nd_to_nz(nd, c0)
    assert tuple(nz.shape) == (*batch, math.ceil(cols / c0), math.ceil(rows / 16), 16, c0)
    assert torch.equal(L.nz_to_nd(nz, rows, cols), nd)
    # the element mapping of ops §3.1 for one random element
    r = int(torch.randint(0, rows, (1,), generator=gen))
    c = int(torch.randint(0, cols, (1,), generator=gen))
    assert nz[..., c // c0, r // 16, r % 16, c % c0].equal(nd[..., r, c])
    # padding count: every element that is not data is zero
    assert (nz != 0).sum().item() == nd.numel()


# ---------------------------------------------------------------- MX scale layout (ops §4.5)


def test_mx_scale_layout_odd_kb():
    scale = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)  # N=2, Kb=3 (odd)
    pairs = L.mx_scale_pairs(scale)  # pad with byte 0, pairs [..., N, Kb/2, 2]
    assert pairs.tolist() == [[[1, 2], [3, 0]], [[4, 5], [6, 0]]]
    npu = L.mx_scale_to_npu(scale)  # block j of channel n at [j//2, n, j%2]
    assert npu.shape == (2, 2, 2) and npu.is_contiguous()
    assert npu.tolist() == [[[1, 2], [4, 5]], [[3, 0], [6, 0]]]
    assert torch.equal(L.mx_scale_from_npu(npu, 3), scale)
    assert torch.equal(L.mx_scale_unpairs(pairs, 3), scale)
    # sglang keeps [N, Kb/2, 2] and passes a transpose(-3, -2) view: same logical indices (loaders §3.11)
    assert torch.equal(L.mx_scale_from_npu(pairs.transpose(-3, -2), 3), scale)


@FAST
@given(batch=st.lists(st.integers(1, 3), max_size=2), n=st.integers(1, 9), kb=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_mx_scale_round_trip(batch, n, kb, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.randint(0, 256, (*batch, n, kb), generator=gen, dtype=torch.uint8)
    npu = L.mx_scale_to_npu(scale)
    kb2 = math.ceil(kb / 2)
    assert npu.shape == (*batch, kb2, n, 2)
    j = int(torch.randint(0, kb, (1,), generator=gen))
    assert torch.equal(npu[..., j // 2, :, j % 2], scale[..., :, j])
    if kb % 2:
        assert (npu[..., kb2 - 1, :, 1] == 0).all()
    assert torch.equal(L.mx_scale_from_npu(npu, kb), scale)
    assert torch.equal(L.mx_scale_unpairs(L.mx_scale_pairs(scale), kb), scale)


# ---------------------------------------------------------------- quant parameter encodings (ops §4.3)


def test_trans_quant_param_truncation():
    out = L.trans_quant_param(torch.tensor([1.0, 0.1, -2.5]))
    assert out.dtype == torch.int64 and out.shape == (3,)
    # 1.0 = 0x3F800000; 0.1 = 0x3DCCCCCD -> & 0xFFFFE000 = 0x3DCCC000; -2.5 = 0xC0200000; bit 46 set
    assert out.tolist() == [0x3F800000 | 1 << 46, 0x3DCCC000 | 1 << 46, 0xC0200000 | 1 << 46]
    scale, offset = L.decode_quant_param(out)
    assert scale.tolist() == [1.0, L.fp19_truncate(torch.tensor(0.1)).item(), -2.5]
    assert scale[1].item() == 0.0999755859375  # 0x3DCCC000
    assert offset.tolist() == [0.0, 0.0, 0.0]


def test_trans_quant_param_offset_negative_and_clamped():
    out = L.trans_quant_param(torch.tensor([1.0]), torch.tensor([-3.0, 2.5, 300.0, -300.0]))
    # -3 -> 9-bit 0x1FD at bits 37..45; 2.5 -> rint half-even 2; 300 -> 255; -300 -> -256 = 0x100
    base = 0x3F800000 | 1 << 46
    assert out.tolist() == [base | 0x1FD << 37, base | 2 << 37, base | 255 << 37, base | 0x100 << 37]
    assert out[0].item() == 0x7FA03F800000
    scale, offset = L.decode_quant_param(out)
    assert scale.tolist() == [1.0] * 4 and offset.tolist() == [-3.0, 2.0, 255.0, -256.0]


def test_trans_quant_param_round_mode_1():
    def f(bits: int) -> torch.Tensor:
        return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)

    cases = {
        0x3F803000: 0x3F804000,  # tie (bit 12 set, sticky 0), lsb 1 -> round up to even
        0x3F801000: 0x3F800000,  # tie, lsb 0 -> stays
        0x3F801001: 0x3F802000,  # above the tie -> up
        0x3FFFF000: 0x40000000,  # mantissa overflow bumps the exponent: 2.0
        0x00400000: 0x00000000,  # exponent 0 -> signed zero
        0x80400000: 0x80000000,
    }
    for bits, expected in cases.items():
        out = L.trans_quant_param(f(bits if bits < 2**31 else bits - 2**32), round_mode=1)
        assert out.item() == expected | 1 << 46, hex(bits)
    assert L.trans_quant_param(f(0x3F803000), round_mode=0).item() == 0x3F802000 | 1 << 46


def test_trans_quant_param_shapes():
    assert L.trans_quant_param(torch.ones(1, 5)).shape == (1, 5)
    assert L.trans_quant_param(torch.ones(1), torch.zeros(4)).shape == (4,)
    with pytest.raises(ValueError):
        L.trans_quant_param(torch.ones(3), torch.zeros(4))


def test_float_bits_to_int64():
    # loaders §1.4a: the int32 bit pattern of the fp32, sign-extended — msModelSlim deqscale2int64,
    # vLLM-Ascend scale_from_float_to_int64, SGLang _process_scale: np.frombuffer(fp32, int32).astype(int64)
    import numpy as np

    values = [1.0, 0.1, -1.0]
    out = L.float_bits_to_int64(torch.tensor(values))
    engines = np.frombuffer(np.array(values, dtype=np.float32).tobytes(), dtype=np.int32).astype(np.int64)
    assert out.tolist() == engines.tolist() == [0x3F800000, 0x3DCCCCCD, 0xBF800000 - 2**32]
    assert L.int64_bits_to_float(out).tolist() == torch.tensor(values).tolist()
    assert L.int64_bits_to_float(out & 0xFFFFFFFF).tolist() == torch.tensor(values).tolist()  # zero-extended too
    scale, offset = L.decode_quant_param(out[:2])  # the kernel reads FP19 (INT64_SCALE_FP19) and no offset
    assert scale[1].item() == 0.0999755859375 and offset.tolist() == [0.0, 0.0]
    assert L.decode_quant_param(out, fp19=False)[0][1].item() == torch.tensor(0.1).item()


# ---------------------------------------------------------------- E8M0 / E2M1 (ops §0.2, §7)


def test_e8m0_decode():
    values = L.e8m0_decode(torch.tensor([127, 128, 126, 0, 254, 255], dtype=torch.uint8))
    assert values[:3].tolist() == [1.0, 2.0, 0.5]
    assert values[3].item() == 2.0**-127  # byte 0 (uncertain: E8M0_BYTE0_IS_ZERO)
    assert values[4].item() == 2.0**127
    assert math.isnan(values[5].item())


def test_fp4_table():
    codes = torch.arange(16, dtype=torch.uint8)
    values = L.fp4_decode(codes)
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.signbit(values[8])
    assert torch.equal(L.fp4_encode(values), codes)
    assert L.fp4_decode(torch.arange(8, dtype=torch.uint8), fmt="e1m2").tolist() == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]


def test_fp4_rounding_ties_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, math.inf, -math.inf, math.nan, -0.1, -5.0])
    rint = L.fp4_decode(L.fp4_encode(x, "rint"))
    # half-even on the grid: ties go to the even mantissa (codes 0, 2, 4, 6)
    assert rint.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -6.0, 0.0, -0.0, -4.0]
    assert L.fp4_encode(torch.tensor([-0.1])).item() == 8  # sign of zero kept
    away = L.fp4_decode(L.fp4_encode(x[:8], "round"))
    assert away.tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0]
    floor = L.fp4_decode(L.fp4_encode(torch.tensor([0.4, 1.9, 5.9, -1.25]), "floor"))
    assert floor.tolist() == [0.0, 1.5, 4.0, -1.5]  # toward -inf (FP4_FLOOR_TOWARD_NEG_INF)


def test_fp4_pack_even_low_nibble():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = L.fp4_pack(codes)
    assert packed.tolist() == [[0x21, 0x8F]]  # ops §7: even element in bits 0-3
    assert torch.equal(L.fp4_unpack(packed), codes)


def test_fp4_from_fp32_truncating():
    # ops §1 "950 path": mask 0xFFC00000 then exact-table lookup; 1.25 -> 1.0, 5.0 -> 4.0, 0.25 -> 0
    x = torch.tensor([1.25, 5.0, 0.25, -6.0, -0.0, 3.0, 1.5])
    assert L.fp4_from_fp32_truncating(x).tolist() == [2, 6, 0, 15, 8, 5, 3]


# ---------------------------------------------------------------- MX quantization (ops §5.2)


def test_mx_quantize_fp4_hand():
    x = torch.zeros(4, 40)
    x[0, :3] = torch.tensor([6.0, -1.0, 0.5])  # amax 6: floor(log2 6) - 2 = 0 -> byte 127
    x[1, :2] = torch.tensor([7.0, 1.0])  # amax 7: still 0, 7 saturates to 6
    x[2, :2] = torch.tensor([8.0, 1.25])  # amax 8: shared 1 -> byte 128; 8/2 = 4, 1.25/2 = 0.625 -> 0.5
    x[3, 33] = 3.0  # second (partial) block: shared 1 - 2 = -1 -> byte 126; 3 * 2 = 6
    codes, scale = L.mx_quantize(x, "e2m1")
    assert codes.shape == (4, 40) and codes.dtype == torch.uint8
    assert scale.shape == (4, 2) and scale.dtype == torch.uint8
    assert scale.tolist() == [[127, 0], [127, 0], [128, 0], [0, 126]]  # all-zero block -> -127 -> byte 0
    values = L.fp4_decode(codes)
    assert values[0, :3].tolist() == [6.0, -1.0, 0.5]
    assert values[1, :2].tolist() == [6.0, 1.0]
    assert values[2, :2].tolist() == [4.0, 0.5]
    assert values[3, 33].item() == 6.0


def test_mx_quantize_fp8_hand():
    x = torch.zeros(2, 32)
    x[0, :2] = torch.tensor([500.0, 1.0])  # floor(log2 500) = 8, emax 8 -> shared 0, byte 127; 500 -> 448
    # floor(log2 17) - 8 = -4 -> byte 123; 1*16 = 16; 17*16 = 272 is a tie between 256 and 288 (e4m3 step 32
    # in [256, 512)) -> RNE -> 256 (even mantissa)
    x[1, :2] = torch.tensor([1.0, 17.0])
    x[1, 2] = 1.0 + 1 / 16  # *16 = 17: between 16 and 18 (e4m3 step 2 at 16..32) -> tie, RNE -> 16
    codes, scale = L.mx_quantize(x, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn
    assert scale.tolist() == [[127], [123]]
    assert codes.float()[0, :2].tolist() == [448.0, 1.0]
    assert codes.float()[1, :3].tolist() == [16.0, 256.0, 16.0]


def test_mx_quantize_nonfinite_block():
    x = torch.ones(1, 64)
    x[0, 40] = math.inf
    codes, scale = L.mx_quantize(x, "e4m3fn")
    assert scale.tolist() == [[127 - 8, 255]]
    assert torch.isnan(codes.float()[0, 32:]).all() and not torch.isnan(codes.float()[0, :32]).any()


@pytest.mark.parametrize("elem", ["e2m1", "e1m2", "e4m3fn", "e5m2"])
def test_mx_quantize_dequantize_error(elem):
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    codes, scale = L.mx_quantize(x, elem)
    back = L.mx_dequantize(codes, scale, elem)
    amax = x.abs().reshape(5, 3, 32).amax(-1).repeat_interleave(32, -1)
    # OCP MX maps amax into [2**emax, 2**(emax+1)) and saturates, so the error is bounded by a fraction of amax
    assert ((back - x).abs() / amax).max() < 0.26
