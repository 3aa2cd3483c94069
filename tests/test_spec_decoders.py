"""Every target's output decoded by tests/spec_decoders.py (written from the layout text, not from
npuconv) and compared with the WRITING TOOL's dequantization of the source (the fixtures'
``reference_dequant``), NZ variants included; float sources against the OCP MX rule computed here.

Neither side of these comparisons runs npuconv's layouts, packing, readers' dequantization or
kernels: a reader bug, or a layout convention changed consistently on npuconv's write and
read-back sides, fails here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, load_reference
from schemes.scheme_helpers import make_float_model
from spec_decoders import assert_decodes_to_tool, decode_output, fp4_of_bytes, nz_to_nd, ocp_mx_reference, signed_nibbles_of_int32

from npuconv.convert import ConvertOptions, convert
from npuconv.writers import WriterOptions

#: fixture → the NPU targets it converts to (all of them; `npuconv convert` refuses the others)
CASES = {
    "awq_gemm_g128": ["npu-int4"],
    "ct020_mxfp8a16": ["npu-mxfp8"],
    "ct020_moe_mixtral_w8a8_int": ["npu-int8", "npu-w8a8"],
    "ct020_moe_qwen2_w4a16_g32_asym": ["npu-int4"],
    "ct020_w4a16_g32_asym": ["npu-int4"],
    "ct020_w8a8_int": ["npu-int8", "npu-w8a8"],
    "gptq_v1_b4_g32_sym": ["npu-int4"],
    "gptq_v1_b4_g64_asym_descact": ["npu-int4"],
    "gptq_v1_b8_g128_asym_descact": ["npu-int8"],
    "gptq_v2_b3_g32_asym": ["npu-int4"],
    "gptq_v2_b4_g32_asym": ["npu-int4"],
    "ms_w4a8_dynamic": ["npu-int4", "npu-w4a8", "npu-w4a4"],
    "ms_w8a16_per_group32_asym": ["npu-int8"],
    "ms_w8a8_mxfp8": ["npu-mxfp8"],
    "ms_w8a8_static_fp16": ["npu-int8", "npu-w8a8"],
}
PARAMS = [(f, t, nz) for f, targets in sorted(CASES.items()) for t in targets for nz in (False, True)]


@pytest.mark.parametrize("fixture, target, nz", PARAMS, ids=[f"{f}-{t}-{'nz' if nz else 'nd'}" for f, t, nz in PARAMS])
def test_spec_decoder_matches_the_writing_tool(fixture, target, nz, tmp_path):
    out = tmp_path / "out"
    convert(FIXTURES / fixture, out, ConvertOptions(target, WriterOptions(nz=nz)))
    assert_decodes_to_tool(out, load_reference(fixture))


# ------------------------------------------------------------------------------ float sources: OCP MX
@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("float_src")
    return root, make_float_model(root)


@pytest.mark.parametrize("target, element", [("npu-mxfp8", "fp8"), ("npu-mxfp4", "fp4")])
@pytest.mark.parametrize("layout", ["vllm-ascend", "sglang"])
def test_offline_mx_is_the_ocp_rule(float_model, target, element, layout, tmp_path):
    src, tensors = float_model
    convert(src, tmp_path / "o", ConvertOptions(target, WriterOptions(mx_layout=layout)))
    decoded = decode_output(tmp_path / "o")
    assert decoded
    for name, weight in decoded.items():
        expected = ocp_mx_reference(tensors[f"{name}.weight"].float(), element)
        assert torch.equal(weight, expected), (name, (weight - expected).abs().max())


def test_dual_level_output_decodes_close_to_the_float_weight(float_model, tmp_path):
    src, tensors = float_model
    convert(src, tmp_path / "o", ConvertOptions("npu-mxfp4-dual"))
    decoded = decode_output(tmp_path / "o")
    assert decoded
    for name, weight in decoded.items():
        original = tensors[f"{name}.weight"].double()
        assert ((weight - original).norm() / original.norm()) < 0.15, name


# ------------------------------------------------------------------------------ the decoders' own hand vectors
def test_nz_hand_vector_spans_tiles_in_both_directions():
    # ND [40, 80] int8 with C0 = 32: 3 row tiles (16, 16, 8 padded) × 3 column tiles (32, 32, 16 padded)
    nd = torch.arange(40 * 80, dtype=torch.int64).reshape(40, 80)
    storage = torch.zeros(3, 3, 16, 32, dtype=torch.int64)  # [C1, R1, 16, C0]
    for r in range(40):
        for c in range(80):  # ops §3.1, element by element
            storage[c // 32, r // 16, r % 16, c % 32] = nd[r, c]
    assert torch.equal(nz_to_nd(storage, 40, 80), nd)
    # hand-placed: row 17 col 33 sits in column tile 1, row tile 1, at [1, 1, 1, 1]; row 35 col 70 at [2, 2, 3, 6]
    assert storage[1, 1, 1, 1] == 17 * 80 + 33 and storage[2, 2, 3, 6] == 35 * 80 + 70


def test_int4_and_fp4_hand_vectors():
    # 0x76543210 → elements 0..7; 0x89ABCDEF → -1, -2, ..., -8 (ops §0.1, two's complement)
    words = torch.tensor([[0x76543210, 0x89ABCDEF - 2**32]], dtype=torch.int64).to(torch.int32)
    assert signed_nibbles_of_int32(words).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, -1, -2, -3, -4, -5, -6, -7, -8]]
    # byte 0x9A: low nibble 0xA = -1.0 (even element), high nibble 0x9 = -0.5 (OCP E2M1)
    assert fp4_of_bytes(torch.tensor([0x9A, 0x7F], dtype=torch.uint8)).tolist() == [-1.0, -0.5, -6.0, 6.0]
