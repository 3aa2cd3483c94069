"""npuconv outputs served by vLLM 0.23.0 + vLLM-Ascend 0.23.0.post1's real code (see vllm_case.py).

Per case and TP size (1, 2 over gloo): the model's linear layers (fused qkv / gate_up, row-parallel
o / down) and its FusedMoE are built by the engine with quantization method ``npuconv`` (resolved by
vLLM's own config code from ``quant_method: npuconv``), loaded through the engine's weight loaders,
run on the emulated torch_npu, and compared with ``x_effective @ dequant(source)ᵀ`` within verify's
limits. Whatever cannot split exactly must be refused with a reason, never served. Whole models
(``MODELS``) also load through vLLM's own model loader (``get_model``; vllm_model.py) before their
modules are checked the same way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

# (fixture, target)
CASES = [
    ("gptq_v1_b4_g64_asym_descact", "npu-int4"),
    ("awq_gemm_g128", "npu-int4"),
    ("ct020_w4a16_g32_asym", "npu-int4"),
    ("ms_w8a8_static_fp16", "npu-w8a8"),
    ("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4"),
]
#: whole models through vLLM's own model loader (vllm_model.py): (fixture, target, model class)
MODELS = [
    ("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4", "Qwen2MoeForCausalLM"),  # experts gate_proj/up_proj/down_proj
    ("ct020_moe_mixtral_w8a8_int", "npu-w8a8", "MixtralForCausalLM"),  # experts w1/w3/w2, per-token int8 activations
    ("gptq_v1_b4_g64_asym_descact", "npu-int4", "LlamaForCausalLM"),
]
#: modules checked per model (a Mixtral block has no dense or shared-expert MLP)
MODEL_LAYERS = {"MixtralForCausalLM": {"qkv_proj", "o_proj", "experts"}}
#: layers that must be refused, and why: act-order groups span the TP ranks of row-parallel layers
REFUSED = {("gptq_v1_b4_g64_asym_descact", 2): {"o_proj", "down_proj"}}
EXPECTED_LAYERS = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.fixture(scope="module")
def outputs(engines, tmp_path_factory):
    engines.python("vllm")  # skip (fail under CI=true) before converting anything
    root = tmp_path_factory.mktemp("vllm-outputs")
    cases = dict(CASES) | {fixture: target for fixture, target, _ in MODELS}
    return {fixture: engines.convert(fixture, target, root / fixture) for fixture, target in cases.items()}


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def engine_results(request, engines, outputs, tmp_path_factory):
    tp = request.param
    result = tmp_path_factory.mktemp(f"vllm-tp{tp}") / "result.json"
    cases = [f"{outputs[f]}={engines.fixtures / f}" for f, _ in CASES]
    cases += [f"model:{outputs[f]}={engines.fixtures / f}" for f, _, _ in MODELS]
    script = str(engines.root / "tests" / "engines" / "vllm" / "vllm_case.py")
    proc = engines.run("vllm", [script, str(tp), str(result), *cases])
    assert proc.returncode == 0, proc.stderr[-4000:]
    if os.environ.get("NPUCONV_ENGINE_RESULTS"):  # keep the per-layer numbers (CI artifact, README table)
        Path(os.environ["NPUCONV_ENGINE_RESULTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(result, Path(os.environ["NPUCONV_ENGINE_RESULTS"]) / f"vllm-tp{tp}.json")
    return tp, json.loads(result.read_text())


@pytest.mark.parametrize("fixture,target", CASES, ids=[c[0] for c in CASES])
def test_layers_match_reference(engine_results, fixture, target):
    tp, results = engine_results
    report = results[fixture]
    expected = set(EXPECTED_LAYERS) | ({"experts"} if "moe" in fixture else set())
    refused = REFUSED.get((fixture, tp), set())
    assert set(report["refused"]) == refused, report["refused"]
    for name in refused:
        assert "act-order groups are not aligned to the rank boundary" in report["refused"][name]
    assert set(report["layers"]) == expected - refused
    for name, layer in report["layers"].items():
        assert layer["class"].startswith("Ascend"), layer  # vLLM-Ascend's layer classes
        assert layer["method"].startswith("Npuconv"), layer
        assert layer["target"] == target, layer
        # verify's limits for the layer's target (Target.thresholds at bf16), as the harness reports them
        assert layer["max_rel_l2"] <= 1e-2 and layer["min_cosine"] >= 0.9999, layer
        assert math.isfinite(layer["rel_l2"]) and layer["rel_l2"] <= layer["max_rel_l2"], (name, layer)
        assert layer["cosine"] >= layer["min_cosine"], (name, layer)


@pytest.mark.parametrize("fixture,target,model_class", MODELS, ids=[m[0] for m in MODELS])
def test_whole_model_loads_through_vllms_model_loader(engine_results, fixture, target, model_class):
    """``get_model`` with ``vllm serve OUT``'s config: the model class's own ``load_weights`` reads the
    checkpoint (stacked experts by their checkpoint names, vLLM's not-initialized check passing), then
    every quantized module's forward matches the reference; act-order row-parallel at TP 2 is refused."""
    tp, results = engine_results
    report = results["model:" + fixture]
    refused = REFUSED.get((fixture, tp))
    if refused:  # the whole load stops at the first layer that cannot be split exactly
        assert "act-order groups are not aligned to the rank boundary" in report["refused"]["model"]
        return
    assert report["class"] == model_class and not report["refused"]
    assert report["expert_params"] == report["expert_tensors"]  # the checkpoint's own names, nothing else
    assert bool(report["expert_params"]) == ("moe" in fixture)
    expected = MODEL_LAYERS.get(model_class, set(EXPECTED_LAYERS) | ({"experts"} if "moe" in fixture else set()))
    assert set(report["layers"]) == expected
    for name, layer in report["layers"].items():
        assert layer["class"].startswith("Ascend") and layer["method"].startswith("Npuconv"), layer
        assert layer["target"] == target, layer
        assert layer["max_rel_l2"] <= 1e-2 and layer["min_cosine"] >= 0.9999, layer
        assert math.isfinite(layer["rel_l2"]) and layer["rel_l2"] <= layer["max_rel_l2"], (name, layer)
        assert layer["cosine"] >= layer["min_cosine"], (name, layer)
