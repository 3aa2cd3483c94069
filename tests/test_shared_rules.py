"""Every shared rule has one home; these tests would have caught the copies that disagreed.

- E2M1 / E8M0 decoding: the canonical reference (:func:`npuconv.model.dequantize`) and the kernels'
  decode (:mod:`npuconv.layouts`, used by the emulation) agree for every code and both settings of
  ``E8M0_BYTE0_IS_ZERO`` (the model used to have its own table that ignored the switch).
- fp32 → int64 scale widening: every target writes the engines' ``frombuffer(int32).astype(int64)``
  (npu-w4a8 used to zero-extend, modelslim to sign-extend).
- W4A8 ``scale_bias``: npu-w4a8 and modelslim agree on which layers are column-parallel and on the
  16 partial sums (they used different constants, name lists and name matching).
- One definition of each shared function in the source tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from npuconv import layouts
from npuconv.model import FP4_E2M1, INT, SCALE_E8M0, ActivationQuant, LinearSpec, QuantizedLinear, decode_codes, dequantize
from npuconv.parallel import COLUMN, ROW, parallel_kind
from npuconv.registry import get_target
from npuconv.writers import WriterOptions

SRC = Path(__file__).resolve().parents[1] / "src" / "npuconv"


# ------------------------------------------------------------------ E2M1 / E8M0
def test_fp4_codes_decode_the_same_in_the_reference_and_the_kernels():
    codes = torch.arange(16, dtype=torch.uint8)
    # ops §0.2: bit 3 sign, bits 0..2 index [0, .5, 1, 1.5, 2, 3, 4, 6]
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert decode_codes(codes, FP4_E2M1).tolist() == expected == layouts.fp4_decode(codes).tolist()


@pytest.mark.parametrize("byte0_is_zero", [False, True])
def test_e8m0_switch_reaches_reference_and_kernels(monkeypatch, byte0_is_zero):
    monkeypatch.setattr(layouts, "E8M0_BYTE0_IS_ZERO", byte0_is_zero)
    spec = LinearSpec("m.proj", 2, 64, 4, 32, True, weight_format=FP4_E2M1, scale_format=SCALE_E8M0, scale_dtype=torch.uint8)
    codes = torch.full((2, 64), 2, dtype=torch.uint8)  # E2M1 1.0
    scale = torch.tensor([[0, 127], [128, 0]], dtype=torch.uint8)
    reference = dequantize(QuantizedLinear(spec, codes, scale))
    kernels = layouts.mx_dequantize(codes, scale, "float4_e2m1fn_x2")
    assert torch.equal(reference, kernels)
    assert (reference[0, 0].item() == 0.0) == byte0_is_zero  # byte 0: 0.0 or 2**-127
    assert reference[0, 32].item() == 1.0 and reference[1, 0].item() == 2.0


# ------------------------------------------------------------------ fp32 → int64
def _engines_int64(values: torch.Tensor) -> list[int]:
    """vLLM-Ascend scale_from_float_to_int64 / msModelSlim deqscale2int64 (loaders §1.4a), in numpy."""
    return np.frombuffer(values.float().numpy().tobytes(), dtype=np.int32).astype(np.int64).tolist()


def test_int64_scales_are_widened_one_way_in_every_target():
    act8 = ActivationQuant(INT, 8, dynamic=True, strategy="token")
    spec = LinearSpec("m.o_proj", 8, 32, 4, -1, True, scale_dtype=torch.float32, activation=act8)
    scale = torch.tensor([[0.5], [-0.25], [1.0], [-2.0], [0.125], [3.0], [-1.5], [0.75]])
    layer = QuantizedLinear(spec, torch.randint(0, 16, (8, 32), dtype=torch.uint8), scale)
    w4a8 = get_target("npu-w4a8").write_layer(layer)["m.o_proj.scale"]
    assert w4a8.tolist() == _engines_int64(scale[:, 0])

    static = ActivationQuant(INT, 8, dynamic=False, strategy="tensor")
    spec8 = LinearSpec("m.q_proj", 2, 32, 8, -1, True, scale_dtype=torch.float32, activation=static)
    layer8 = QuantizedLinear(spec8, torch.randint(0, 256, (2, 32), dtype=torch.uint8), torch.tensor([[0.5], [-0.25]]))
    layer8.input_scale, layer8.input_zero = torch.tensor([0.5]), torch.tensor([0.0])
    fp16 = WriterOptions(model_dtype=torch.float16)
    for target in ("npu-w8a8", "modelslim"):
        written = get_target(target, fp16).write_layer(layer8)["m.q_proj.deq_scale"]
        assert written.dtype == torch.int64
        assert written.tolist() == _engines_int64(torch.tensor([0.25, -0.125])), target


# ------------------------------------------------------------------ W4A8 scale_bias
@pytest.mark.parametrize("name", [
    "m.self_attn.q_proj", "m.self_attn.o_proj", "m.mlp.gate_up_proj", "m.mlp.down_proj", "m.experts.3.w1",
    "m.experts.3.w2", "m.self_attention.dense", "m.mlp.dense_4h_to_h", "m.self_attn.kv_b_proj", "m.mlp.fc2",
])
def test_w4a8_targets_agree_on_scale_bias(name):
    act8 = ActivationQuant(INT, 8, dynamic=True, strategy="token")
    n, k = 8, 64
    spec = LinearSpec(name, n, k, 4, -1, True, scale_dtype=torch.float32, activation=act8)
    gen = torch.Generator().manual_seed(0)
    layer = QuantizedLinear(spec, torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                            torch.rand(n, 1, generator=gen) + 0.1)
    npu = get_target("npu-w4a8").write_layer(layer)
    slim = get_target("modelslim").write_layer(layer)[f"{name}.scale_bias"]
    kind = parallel_kind(name)
    assert kind in (COLUMN, ROW)
    if kind == COLUMN:
        assert f"{name}.scale_bias_partials" not in npu and slim.shape == (n, 1)
        assert torch.allclose(slim[:, 0], npu[f"{name}.scale_bias"], rtol=1e-5, atol=1e-4)
    else:
        partials = npu[f"{name}.scale_bias_partials"]
        assert partials.shape == slim.shape == (n, layouts.A8W4_SCALE_BIAS_CHUNKS)
        assert torch.allclose(slim, partials, rtol=1e-5, atol=1e-4)  # fp32 vs fp64 sums


def test_scale_bias_by_hand():
    # ops §6.3: 8 · Σ_k W[n,k] · s[n] per chunk of K
    values = torch.tensor([[1, -2, 3, -4], [7, 7, -8, 0]])
    scale = torch.tensor([[0.5], [2.0]])
    assert layouts.a8w4_scale_bias(values, scale).tolist() == [[8 * (-1.0)], [8 * 12.0]]
    assert layouts.a8w4_scale_bias(values, scale, 2).tolist() == [[8 * -0.5, 8 * -0.5], [8 * 28.0, 8 * -16.0]]


# ------------------------------------------------------------------ one definition each
SHARED_FUNCTIONS = ("unpack_columns", "unpack_rows", "e8m0_decode", "decode_e8m0", "fp4_decode", "float_bits_to_int64",
                    "deq_scale_int64", "a8w4_scale_bias", "parallel_kind", "scale_bias_kind")


def test_each_shared_function_is_defined_once():
    defined: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in SHARED_FUNCTIONS:
                defined.setdefault(node.name, []).append(str(path.relative_to(SRC)))
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}
    assert "decode_e8m0" not in defined and "deq_scale_int64" not in defined and "scale_bias_kind" not in defined


# ------------------------------------------------------------------ offline quantization: explicit result
def test_offline_quantization_returns_layer_and_report_without_side_attributes():
    from dataclasses import fields

    from npuconv.offline import MXFP4_DUAL_RECIPE, FloatLinear, OfflineResult

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 1024, generator=gen).to(torch.bfloat16)
    weight[:, 512:] = 0  # an all-zero 512-block: level 0 is DUAL_ZERO_BLOCK_L0 by the rule
    linear = FloatLinear("m.proj", 4, 1024, "bfloat16", "m.proj.weight", None)
    spec = MXFP4_DUAL_RECIPE.spec(linear)
    result = MXFP4_DUAL_RECIPE.quantize(spec, weight, None)
    assert isinstance(result, OfflineResult) and 0 < result.rel_l2 < 0.2
    # nothing hung on the layer (qweight is a declared field stored as _qweight behind its lazy-unpack property)
    assert {name.removeprefix("_") for name in vars(result.layer)} == {f.name for f in fields(result.layer)}
    # the levels the target writes are the ones the rule made (split back from the canonical scale)
    _, level0, level1 = layouts.dual_level_mx_quantize(weight)
    split0, split1 = layouts.split_dual_level_scale(result.layer.scale, 1024)
    assert torch.equal(split0, level0) and torch.equal(split1, level1)
    assert bool((split0[:, 1] == layouts.DUAL_ZERO_BLOCK_L0).all())
