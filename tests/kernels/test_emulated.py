"""Hand-checked vectors for the emulated torch_npu ops (npuconv.kernels.emulated).

"ops §x" = docs/research/torch_npu_ops.md. Every test runs on CPU, and on CUDA when present.
"""

from __future__ import annotations

import math

import pytest
import torch

from spec_decoders import e8m0, fp4_of_bytes, ocp_mx_reference

from npuconv import layouts as L
from npuconv.kernels import emulated as E
from npuconv.kernels import get_backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def dev(request) -> str:
    return request.param


def t(values, dtype, dev):
    return torch.tensor(values, dtype=dtype, device=dev)


# ---------------------------------------------------------------- backend selection


def test_backend_names(dev):
    backend = get_backend(dev)
    assert backend.name == f"emulated-{dev}" and backend.emulated
    assert backend.ops.npu_quant_matmul is E.npu_quant_matmul


# ---------------------------------------------------------------- npu_dynamic_quant (ops §5.1)


def test_dynamic_quant_half_even_ties(dev):
    x = t([[127.0, 63.5, 62.5, 0.5, -1.5, -2.5, 1.5, 0.0]], torch.float32, dev)
    y, scale = E.npu_dynamic_quant(x)
    # amax 127 -> mult = 127/127 = 1 -> rint half-even
    assert y.dtype == torch.int8 and y.tolist() == [[127, 64, 62, 0, -2, -2, 2, 0]]
    expected = torch.tensor(127.0) * torch.tensor(1 / 127, dtype=torch.float32)  # amax * fp32(1/127)
    assert scale.shape == (1,) and scale.item() == expected.item()


def test_dynamic_quant_mult_rounding(dev):
    # mult = fp32(127 / 254) = 0.5; 3 * 0.5 = 1.5 -> 2, 5 * 0.5 = 2.5 -> 2
    x = t([[254.0, 3.0, 5.0, -7.0]], torch.bfloat16, dev)
    y, scale = E.npu_dynamic_quant(x)
    assert y.tolist() == [[127, 2, 2, -4]]
    assert scale.item() == (torch.tensor(254.0) * torch.tensor(1 / 127, dtype=torch.float32)).item()


def test_dynamic_quant_int4(dev):
    x = t([[7.0, 2.5, -3.5, 1.5, 0.5, -0.5, 6.0, -7.0]], torch.float16, dev)
    y, scale = E.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    # DTYPE_MAX 7, amax 7 -> mult 1; ties to even; packed (…, K/8) int32
    assert y.dtype == torch.int32 and y.shape == (1, 1)
    assert L.int4unpack(y).tolist() == [[7, 2, -4, 2, 0, 0, 6, -7]]
    assert scale.item() == (torch.tensor(7.0) * torch.tensor(1 / 7, dtype=torch.float32)).item()


def test_dynamic_quant_smooth_and_groups(dev):
    x = torch.ones(4, 8, device=dev)
    smooth = torch.stack([torch.full((8,), 2.0), torch.full((8,), 3.0)]).to(dev)
    smooth[1, 0] = 6.0
    # rows 0..0 use expert 0, rows 1..3 expert 1 (group_index = cumulative ends)
    y, scale = E.npu_dynamic_quant(x, smooth_scales=smooth, group_index=t([1, 4], torch.int32, dev))
    assert scale[0].item() == pytest.approx(2.0 / 127, rel=1e-6)
    assert y[0].tolist() == [127] * 8
    assert y[1].tolist() == [127] + [64] * 7  # 3 * 127/6 = 63.5 -> 64 (half-even)
    assert scale[1].item() == pytest.approx(6.0 / 127, rel=1e-6)


def test_dynamic_quant_zero_row(dev):
    y, scale = E.npu_dynamic_quant(torch.zeros(1, 8, device=dev))
    assert y.tolist() == [[0] * 8] and scale.tolist() == [0.0]  # DYNAMIC_QUANT_NAN_TO


# ---------------------------------------------------------------- npu_weight_quant_batchmatmul (ops §2)


def test_wqbmm_offset_is_added(dev):
    # ops §2.1: W = (w + offset) * scale. w = [3, 5], offset -2, scale 0.5 -> [0.5, 1.5]; x = [1, 1] -> 2.0
    # (with a subtracted offset it would be 6.0)
    x = t([[1.0, 1.0]], torch.float16, dev)
    w = t([[3], [5]], torch.int8, dev)
    y = E.npu_weight_quant_batchmatmul(x, w, t([0.5], torch.float16, dev), t([-2.0], torch.float16, dev))
    assert y.dtype == torch.float16 and y.tolist() == [[2.0]]


def test_wqbmm_fp16_vs_bf16_rounding(dev):
    # ops §2.6: fp16 x rounds w + off to fp16 (100 + 0.3 -> 100.3125); bf16 x computes (w + off) * s in fp32
    # with off = bf16(0.3) = 0.30078125 and casts once to bf16 (100.30078125 -> 100.5)
    w = t([[100]], torch.int8, dev)
    y16 = E.npu_weight_quant_batchmatmul(t([[1.0]], torch.float16, dev), w, t([1.0], torch.float16, dev), t([0.3], torch.float16, dev))
    assert y16.item() == 100.3125
    ybf = E.npu_weight_quant_batchmatmul(t([[1.0]], torch.bfloat16, dev), w, t([1.0], torch.bfloat16, dev), t([0.3], torch.bfloat16, dev))
    assert ybf.dtype == torch.bfloat16 and ybf.item() == 100.5


def _group_reference(x, wq, scale, offset, group):
    k = wq.shape[0]
    s = scale.float().repeat_interleave(group, 0)[:k]
    o = offset.float().repeat_interleave(group, 0)[:k]
    wd = ((wq.float() + o) * s).to(x.dtype)  # bf16: fp32 then one cast
    return (x.double() @ wd.double()).float().to(x.dtype)


def test_wqbmm_per_group_asym_int4_layouts(dev):
    gen = torch.Generator().manual_seed(1)
    k, n, g = 64, 16, 32
    wq = torch.randint(-8, 8, (k, n), generator=gen, dtype=torch.int8)
    scale = (torch.rand(k // g, n, generator=gen) * 0.1 + 0.01).to(torch.bfloat16)
    offset = torch.randint(-3, 4, (k // g, n), generator=gen).to(torch.bfloat16)
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    ref = _group_reference(x, wq, scale, offset, g)
    x, wq, scale, offset = (v.to(dev) for v in (x, wq, scale, offset))
    args = dict(antiquant_scale=scale, antiquant_offset=offset, antiquant_group_size=g)
    y8 = E.npu_weight_quant_batchmatmul(x, wq, **args)
    assert torch.equal(y8.cpu(), ref)
    # int4pack along N: (K, N/8); and the transposed view of (N, K/8) (ops §2.5 stride detection)
    y_packed = E.npu_weight_quant_batchmatmul(x, L.int4pack(wq), **args)
    transposed = L.int4pack(wq.t().contiguous()).t()
    assert transposed.shape == (k // 8, n) and not transposed.is_contiguous()
    y_t = E.npu_weight_quant_batchmatmul(x, transposed, **args)
    # uint8 with weight_dtype int4 (2 per byte along the stored dim)
    y_b = E.npu_weight_quant_batchmatmul(x, L.int4pack_bytes(wq).view(torch.uint8), weight_dtype="int4", **args)
    assert torch.equal(y_packed, y8) and torch.equal(y_t, y8) and torch.equal(y_b, y8)


def test_wqbmm_per_channel_bias_and_transposed_scale(dev):
    x = t([[1.0, 2.0], [0.5, -1.0]], torch.float16, dev)
    w = t([[1, -2, 3], [4, 5, -6]], torch.int8, dev)  # K=2, N=3
    scale = t([[0.5], [0.25], [2.0]], torch.float16, dev).t()  # (N,1).t() view, ops §2.2
    bias = t([1.0, 0.0, -1.0], torch.float16, dev)
    y = E.npu_weight_quant_batchmatmul(x, w, scale, bias=bias)
    wd = torch.tensor([[0.5, -0.5, 6.0], [2.0, 1.25, -12.0]])
    assert y.tolist() == ((x.float().cpu() @ wd) + bias.float().cpu()).tolist()


def test_wqbmm_int64_scale(dev):
    # ops §2.6: y = (x @ fp16(w + off)) * fp16(FP19(scale bits))
    x = t([[1.0, 1.0]], torch.float16, dev)
    w = t([[3], [5]], torch.int8, dev)
    scale = L.float_bits_to_int64(t([0.1], torch.float32, dev))
    y = E.npu_weight_quant_batchmatmul(x, w, scale, t([1], torch.int32, dev))
    expected = torch.tensor(10.0) * torch.tensor(0.0999755859375).half().float()
    assert y.item() == expected.half().item()


def test_wqbmm_quant_scale_int8_out(dev):
    x = t([[1.0, 1.0]], torch.float16, dev)
    w = t([[3], [5]], torch.int8, dev)
    y = E.npu_weight_quant_batchmatmul(
        x, w, t([1.0], torch.float16, dev), quant_scale=t([0.25], torch.float32, dev), quant_offset=t([-1.0], torch.float32, dev)
    )
    assert y.dtype == torch.int8 and y.item() == 1  # rint(8 * 0.25) - 1


def test_wqbmm_mx_fp4(dev):
    codes = t([[1, 7], [2, 15]], torch.uint8, dev)  # K=2, N=2 values [[0.5, 6], [1, -6]]
    packed = L.fp4_pack(codes)  # (K, N/2)
    scale = t([[128, 126]], torch.uint8, dev)  # (ceil(K/32), N): x2, x0.5
    y = E.npu_weight_quant_batchmatmul(t([[1.0, 1.0]], torch.bfloat16, dev), packed, scale, weight_dtype=296)
    assert y.tolist() == [[3.0, 0.0]]


# ---------------------------------------------------------------- npu_quant_matmul (ops §4)

X1 = [[1, -2, 3], [4, 5, -6]]
X2 = [[1, 2], [3, -4], [5, 6]]
ACC = [[10, 28], [-11, -48]]  # X1 @ X2 by hand


def test_quant_matmul_int32_out_and_bias(dev):
    x1, x2 = t(X1, torch.int8, dev), t(X2, torch.int8, dev)
    y = E.npu_quant_matmul(x1, x2, t([1.0], torch.float32, dev), output_dtype=torch.int32)
    assert y.dtype == torch.int32 and y.tolist() == ACC
    y = E.npu_quant_matmul(x1, x2, t([1.0], torch.float32, dev), bias=t([1, -1], torch.int32, dev), output_dtype=torch.int32)
    assert y.tolist() == [[11, 27], [-10, -49]]


def test_quant_matmul_kc_pertoken(dev):
    # ops §4.1 K-C: (acc + int32 bias) * scale * pertoken; float bias added after
    x1, x2 = t(X1, torch.int8, dev), t(X2, torch.int8, dev)
    scale, pts = t([0.5, 0.25], torch.float32, dev), t([1.0, 2.0], torch.float32, dev)
    y = E.npu_quant_matmul(x1, x2, scale, pertoken_scale=pts, bias=t([2, 4], torch.int32, dev), output_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.tolist() == [[6.0, 8.0], [-9.0, -22.0]]
    y = E.npu_quant_matmul(x1, x2, scale, pertoken_scale=pts, bias=t([2.0, 4.0], torch.float32, dev), output_dtype=torch.float16)
    assert y.tolist() == [[7.0, 11.0], [-9.0, -20.0]]


def test_quant_matmul_tc_int32_bias_fp19(dev):
    # ops §4.2: T-C with int32 bias: fp32(acc + bias) * FP19(scale); fp32 scale is truncated by torch_npu for
    # fp16/int8 output. acc + bias = 15; 15 * 0.1 = 1.5 -> rint 2, but FP19(0.1) = 0.0999755859375 -> 1.49963 -> 1
    x1, x2 = t([[1, 2]], torch.int8, dev), t([[3], [6]], torch.int8, dev)  # acc = 15
    y = E.npu_quant_matmul(x1, x2, t([0.1], torch.float32, dev), bias=t([0], torch.int32, dev))
    assert y.dtype == torch.int8 and y.item() == 1
    y16 = E.npu_quant_matmul(x1, x2, t([0.1], torch.float32, dev), bias=t([5], torch.int32, dev), output_dtype=torch.float16)
    assert y16.item() == torch.tensor(20 * 0.0999755859375).half().item()
    # an int64 scale carries the same FP19 value; a bit-cast one (loaders §1.4a) is masked too (INT64_SCALE_FP19)
    for scale in (L.trans_quant_param(t([0.1], torch.float32, dev)), L.float_bits_to_int64(t([0.1], torch.float32, dev))):
        assert E.npu_quant_matmul(x1, x2, scale, bias=t([5], torch.int32, dev), output_dtype=torch.float16).item() == y16.item()


def test_quant_matmul_int8_offset(dev):
    x1, x2 = t([[1, 2]], torch.int8, dev), t([[3], [6]], torch.int8, dev)  # acc = 15
    one = t([1.0], torch.float32, dev)
    assert E.npu_quant_matmul(x1, x2, one, offset=t([-3.0], torch.float32, dev)).item() == 12
    assert E.npu_quant_matmul(x1, x2, one, offset=t([300.0], torch.float32, dev)).item() == 127  # 9-bit clamp then int8
    assert E.npu_quant_matmul(x1, x2, L.trans_quant_param(one, t([-20.0], torch.float32, dev))).item() == -5
    big = t([[127, 127]], torch.int8, dev)
    assert E.npu_quant_matmul(big, t([[127], [127]], torch.int8, dev), one).item() == 127  # requant saturates


def test_quant_matmul_float_bias_tc(dev):
    x1, x2 = t(X1, torch.int8, dev), t(X2, torch.int8, dev)
    y = E.npu_quant_matmul(x1, x2, t([0.5], torch.float32, dev), bias=t([0.25, -0.25], torch.float32, dev), output_dtype=torch.float16)
    assert y.tolist() == [[5.25, 13.75], [-5.25, -24.25]]


def test_quant_matmul_int4(dev):
    gen = torch.Generator().manual_seed(3)
    m, k, n = 4, 32, 16
    a = torch.randint(-8, 8, (m, k), generator=gen, dtype=torch.int8).to(dev)
    b = torch.randint(-8, 8, (k, n), generator=gen, dtype=torch.int8).to(dev)
    scale, pts = torch.rand(n, generator=gen).to(dev), torch.rand(m, generator=gen).to(dev)
    ref = E.npu_quant_matmul(a, b, scale, pertoken_scale=pts, output_dtype=torch.float16)
    acc = E.npu_quant_matmul(a, b, scale, output_dtype=torch.int32)
    assert torch.equal(acc.cpu().long(), a.cpu().long() @ b.cpu().long())
    packed_a = L.int4pack(a)  # (M, K/8)
    y = E.npu_quant_matmul(packed_a, L.int4pack(b), scale, pertoken_scale=pts, output_dtype=torch.float16)
    y_t = E.npu_quant_matmul(packed_a, L.int4pack(b.t().contiguous()).t(), scale, pertoken_scale=pts, output_dtype=torch.float16)
    assert torch.equal(y, ref) and torch.equal(y_t, ref)


def test_quant_matmul_transposed_int8_and_batch(dev):
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(-128, 128, (2, 3, 40), generator=gen, dtype=torch.int8).to(dev)
    b = torch.randint(-128, 128, (2, 24, 40), generator=gen, dtype=torch.int8).to(dev)  # stored (N, K)
    y = E.npu_quant_matmul(a, b.transpose(-1, -2), torch.ones(1, device=dev), output_dtype=torch.int32)
    assert torch.equal(y.cpu().long(), a.cpu().long() @ b.cpu().long().transpose(-1, -2))


def test_quant_matmul_gb_blocks(dev):
    gen = torch.Generator().manual_seed(5)
    m, k, n = 2, 256, 128
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)  # transposed weight
    s1, s2 = torch.rand(m, 2, generator=gen), torch.rand(1, 2, generator=gen)  # (m, K/128), (N/128, K/128)
    ref = sum(
        (a[:, j * 128 : (j + 1) * 128].double() @ b[:, j * 128 : (j + 1) * 128].double().t()) * s1[:, j : j + 1].double() * s2[0, j].double()
        for j in range(2)
    )
    y = E.npu_quant_matmul(
        a.to(dev), b.to(dev).t(), s2.to(dev), pertoken_scale=s1.to(dev), output_dtype=torch.bfloat16, group_sizes=[1, 128, 128]
    )
    assert torch.equal(y.cpu(), ref.float().to(torch.bfloat16))


def _mx_reference(x, w, element, x_round="rint"):
    """The OCP MX rule computed in the test (tests/spec_decoders.py), not from npuconv.layouts:
    both operands quantized along K in 32-blocks, dequantized, multiplied in float64."""
    return (ocp_mx_reference(x, element, x_round) @ ocp_mx_reference(w, element).t()).float()


@pytest.mark.parametrize("k", [64, 96])  # 96: Kb = 3 is odd, the scale pairs are padded (ops §4.5)
def test_quant_matmul_mxfp8(dev, k):
    gen = torch.Generator().manual_seed(6)
    m, n = 3, 5
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)  # checkpoint layout (N, K)
    xq, xs = L.mx_quantize(x, "e4m3fn")
    wq, ws = L.mx_quantize(w, "e4m3fn")  # ws (N, Kb)
    ref = _mx_reference(x, w, "fp8")
    bias = torch.randn(n, generator=gen)
    kwargs = dict(pertoken_scale=L.mx_scale_pairs(xs).to(dev), bias=bias.to(dev), output_dtype=torch.float32, group_sizes=[1, 1, 32])
    # vllm-ascend: contiguous (K, N) weight and (Kb/2, N, 2) scale
    y = E.npu_quant_matmul(xq.to(dev), wq.t().contiguous().to(dev), L.mx_scale_to_npu(ws).to(dev), **kwargs)
    assert torch.equal(y.cpu(), ref + bias)
    # sglang: transposed views of (N, K) and (N, Kb/2, 2)
    y_views = E.npu_quant_matmul(xq.to(dev), wq.to(dev).t(), L.mx_scale_pairs(ws).to(dev).transpose(0, 1), **kwargs)
    assert torch.equal(y_views, y)


def test_quant_matmul_mxfp4(dev):
    gen = torch.Generator().manual_seed(7)
    m, n, k = 2, 4, 64
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    xc, xs = L.mx_quantize(x, "e2m1", round_mode="round")
    wc, ws = L.mx_quantize(w, "e2m1")
    ref = _mx_reference(x, w, "fp4", "round")
    y = E.npu_quant_matmul(
        L.fp4_pack(xc).to(dev),
        L.fp4_pack(wc).to(dev).t(),  # uint8 (N, K/2) -> transposed view (K/2, N)
        L.mx_scale_pairs(ws).to(dev).transpose(0, 1),
        pertoken_scale=L.mx_scale_pairs(xs).to(dev),
        x1_dtype=296,
        x2_dtype="float4_e2m1fn_x2",
        scale_dtype=293,
        pertoken_scale_dtype=293,
        output_dtype=torch.bfloat16,
        group_sizes=[1, 1, 32],
    )
    assert torch.equal(y.cpu(), ref.to(torch.bfloat16))


# ---------------------------------------------------------------- npu_dynamic_mx_quant (ops §5.2)


def test_dynamic_mx_quant_tail_axis(dev):
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(8)).to(dev)
    y, s = E.npu_dynamic_mx_quant(x)  # default dst 296 = FP4 E2M1
    assert y.dtype == torch.uint8 and y.shape == (3, 48) and s.shape == (3, 2, 2)
    # decoded with the spec decoders (pairs low nibble first, block j at [.., j//2, j%2]) = the OCP MX rule
    decoded = fp4_of_bytes(y.cpu()) * e8m0(s.cpu().reshape(3, 4))[:, torch.arange(96) // 32]
    assert torch.equal(decoded, ocp_mx_reference(x.cpu(), "fp4"))
    y8, s8 = E.npu_dynamic_mx_quant(x.to(torch.bfloat16), dst_type=torch.float8_e4m3fn)
    assert y8.dtype == torch.float8_e4m3fn and y8.shape == (3, 96) and s8.shape == (3, 2, 2)


def test_dynamic_mx_quant_non_tail_axis(dev):
    x = torch.randn(96, 6, generator=torch.Generator().manual_seed(9)).to(dev)
    y, s = E.npu_dynamic_mx_quant(x, axis=0, dst_type=292)
    assert y.shape == (96, 6) and s.shape == (2, 6, 2)
    decoded = y.cpu().double() * e8m0(s.cpu().permute(1, 0, 2).reshape(6, 4))[:, torch.arange(96) // 32].T
    assert torch.equal(decoded, ocp_mx_reference(x.cpu().t(), "fp8").T)  # block j of column p at s[j//2, p, j%2]
    assert (s[1, :, 1] == 0).all()  # padded block
    yf, _ = E.npu_dynamic_mx_quant(x, axis=0)
    assert yf.shape == (96, 3)  # FP4 pairs always along the last dim


def test_dynamic_mx_quant_scale_alg1(dev):
    x = torch.zeros(1, 32, device=dev)
    x[0, 0] = 448.0 * 3  # S = 3 -> E = 128, mantissa > 0 -> rounded up to 4 = byte 129
    y, s = E.npu_dynamic_mx_quant(x, dst_type=292, scale_alg=1)
    # 1344 / 4 = 336: a tie between 320 and 352 (e4m3 step 32) -> RNE -> 320
    assert s[0, 0, 0].item() == 129 and y.float()[0, 0].item() == 320.0


# ---------------------------------------------------------------- npu_quantize (ops §8)


def test_quantize_mul_mode_half_even(dev):
    x = t([[0.5, 1.5, 2.5, -0.5, 200.0, -3.5]], torch.float16, dev)
    y = E.npu_quantize(x, t([1.0], torch.float32, dev), None, torch.qint8, -1, False)
    assert y.dtype == torch.int8 and y.tolist() == [[0, 2, 2, 0, 127, -4]]


def test_quantize_div_mode_and_axis(dev):
    x = t([[1.0, 2.0], [3.0, 4.0]], torch.float32, dev)
    y = E.npu_quantize(x, t([0.5, 2.0], torch.float32, dev), t([1.0, -1.0], torch.float32, dev), torch.qint8, -1, True)
    assert y.tolist() == [[3, 0], [7, 1]]  # x / s + z; 2/2 - 1 = 0, 4/2 - 1 = 1
    rows = E.npu_quantize(x, t([1.0, 10.0], torch.float32, dev), None, torch.qint8, -2, False)
    assert rows.tolist() == [[1, 2], [30, 40]]


def test_quantize_int4_packs(dev):
    x = torch.arange(-8, 8, dtype=torch.float32, device=dev).reshape(2, 8)
    y = E.npu_quantize(x, t([1.0], torch.float32, dev), None, torch.quint4x2, -1, False)
    assert y.dtype == torch.int32 and y.shape == (2, 1)
    assert torch.equal(L.int4unpack(y), x.to(torch.int8))


# ---------------------------------------------------------------- layout ops


def test_layout_ops_delegate(dev):
    w = torch.randint(-8, 8, (4, 16), dtype=torch.int32, device=dev)
    assert torch.equal(E.npu_convert_weight_to_int4pack(w), L.int4pack(w))
    fp = t([[1.25, 5.0, 0.25, -6.0, 0.0, 0.5, 1.0, 6.0]], torch.float32, dev)
    assert L.int4unpack(E.npu_convert_weight_to_int4pack(fp)).tolist() == [[2, 6, 0, -1, 0, 1, 2, 7]]  # codes as nibbles
    s = t([0.1, 1.0], torch.float32, dev)
    assert torch.equal(E.npu_trans_quant_param(s), L.trans_quant_param(s))
    assert E.npu_format_cast(w, 29) is w
    with pytest.raises(NotImplementedError):
        E.npu_format_cast(w, 3)


# ---------------------------------------------------------------- npu_grouped_matmul (ops §6)


def test_grouped_matmul_antiquant(dev):
    gen = torch.Generator().manual_seed(10)
    e, k, n = 3, 64, 16
    x = torch.randn(7, k, generator=gen).to(torch.float16).to(dev)
    w = torch.randint(-128, 128, (e, k, n), generator=gen, dtype=torch.int8).to(dev)
    s = (torch.rand(e, n, generator=gen) * 0.01).to(torch.float16).to(dev)
    o = torch.randint(-4, 4, (e, n), generator=gen).to(torch.float16).to(dev)
    group_list = t([2, 2, 7], torch.int64, dev)  # cumulative; expert 1 gets no rows
    (y,) = E.npu_grouped_matmul([x], [w], antiquant_scale=[s], antiquant_offset=[o], group_list=group_list, split_item=2, group_type=0)
    assert y.shape == (7, n) and y.dtype == torch.float16
    assert torch.equal(y[:2], E.npu_weight_quant_batchmatmul(x[:2], w[0], s[0], o[0]))
    assert torch.equal(y[2:], E.npu_weight_quant_batchmatmul(x[2:], w[2], s[2], o[2]))
    (y_counts,) = E.npu_grouped_matmul(
        [x], [w], antiquant_scale=[s], antiquant_offset=[o], group_list=t([2, 0, 5], torch.int64, dev), split_item=3, group_type=0, group_list_type=1
    )
    assert torch.equal(y_counts, y)


def test_grouped_matmul_w8a8_pertoken(dev):
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(-128, 128, (4, 32), generator=gen, dtype=torch.int8).to(dev)
    w = torch.randint(-128, 128, (2, 32, 8), generator=gen, dtype=torch.int8).to(dev)
    scale = torch.rand(2, 8, generator=gen).to(torch.bfloat16).to(dev)
    pts = torch.rand(4, generator=gen).to(dev)
    (y,) = E.npu_grouped_matmul([x], [w], scale=[scale], per_token_scale=[pts], group_list=t([1, 4], torch.int64, dev), split_item=2, group_type=0)
    assert y.dtype == torch.bfloat16
    ref = E.npu_quant_matmul(x[1:], w[1], scale[1], pertoken_scale=pts[1:], output_dtype=torch.bfloat16)
    assert torch.equal(y[1:], ref)


def test_grouped_matmul_a8w4_scale_bias_cancels(dev):
    # ops §6.3: with bias = 8·Σ_k W·s the kernel result equals pts · (x @ (W ⊙ s))
    gen = torch.Generator().manual_seed(12)
    e, k, n, g = 2, 512, 16, 256
    x = torch.randint(-128, 128, (5, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (e, k, n), generator=gen, dtype=torch.int8)
    s = torch.rand(e, k // g, n, generator=gen).half().float()  # VA rounds through fp16 (loaders §3.6)
    s_full = s.repeat_interleave(g, 1)
    bias = 8 * (w.double() * s_full.double()).sum(1)  # [E, N]
    pts = torch.rand(5, generator=gen)
    (y,) = E.npu_grouped_matmul(
        [x.to(dev)],
        [L.int4pack(w).to(dev)],
        scale=[L.float_bits_to_int64(s).to(dev)],
        bias=[bias.float().to(dev)],
        per_token_scale=[pts.to(dev)],
        group_list=t([2, 3], torch.int64, dev),
        split_item=2,
        group_type=0,
        group_list_type=1,
        output_dtype=torch.float32,
    )
    ref = torch.cat([x[:2].double() @ (w[0].double() * s_full[0].double()), x[2:].double() @ (w[1].double() * s_full[1].double())])
    ref = ref * pts.double().unsqueeze(-1)
    assert torch.allclose(y.cpu().double(), ref, rtol=1e-5, atol=1e-3)
    assert math.isfinite(y.abs().max().item())
