"""The cases of the SGLang engine tests (shared by conftest.py and test_sglang.py)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parents[2]
FIXTURES = REPO / "tests" / "fixtures"

#: case → (fixture, npuconv target): the cases of issue 13's "Done when"
CASES = {
    "gptq_int4_asym_actorder": ("gptq_v1_b4_g64_asym_descact", "npu-int4"),
    "awq_int4": ("awq_gemm_g128", "npu-int4"),
    "ct_w4a16": ("ct020_w4a16_g32_asym", "npu-int4"),
    "modelslim_w8a8": ("ms_w8a8_static_fp16", "npu-w8a8"),
    "modelslim_w8a16_group": ("ms_w8a16_per_group32_asym", "npu-int8"),
    "moe_qwen2_w4a16": ("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4"),
    "moe_mixtral_w8a8": ("ct020_moe_mixtral_w8a8_int", "npu-w8a8"),
}
