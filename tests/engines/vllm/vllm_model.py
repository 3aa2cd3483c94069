"""Whole models through vLLM's own model loader, run INSIDE the vLLM venv by vllm_case.py
(``python vllm_case.py TP RESULT.json model:OUT=FIXTURE ...``, in the same processes and TP group).

vLLM 0.23.0 + vLLM-Ascend 0.23.0.post1, unmodified, on the emulated ``torch_npu``: per case, the
``VllmConfig`` of ``ModelConfig(OUT)`` (``quant_method: npuconv`` resolved by vLLM's own config code),
then ``vllm.model_executor.model_loader.get_model`` — vLLM-Ascend's model classes and layers
(``Qwen2MoeForCausalLM``, ``LlamaForCausalLM`` → Ascend linears and ``AscendFusedMoE``), the checkpoint
read by vLLM's own safetensors iterator, the model class's own ``load_weights`` (name mapping, shard
loaders; stacked expert tensors by their checkpoint names), vLLM's "weights not initialized from
checkpoint" check and ``process_weights_after_loading``. Then every quantized module's forward (linears
and the MoE experts, as vllm_case.py checks them) is compared with ``x_effective @ dequant(source)ᵀ``.

Stubbed, infrastructure only (besides the fake torch_npu of vllm_case.py): the load device is the CPU
(``LoadConfig.device="cpu"``: there is no NPU), and ``_C_ascend::moe_gating_top_k`` is emulated
(vllm_case.emulate_routing_op). A whole-model forward is not run: vLLM-Ascend's attention runs only
through its compiled NPU kernels (``torch_npu._npu_flash_attention``/paged attention and the KV cache
of a model runner), which no CPU emulation provides.
Reported per case: ``{"layers": {...}, "refused": {"model": reason}, "class": model class, "experts": [names]}``.
"""

from __future__ import annotations

import os

import torch

import vllm_case as case


def load_model(out: str):
    """``get_model`` with ``vllm serve OUT``'s config, loading on the CPU."""
    from vllm.model_executor.model_loader import get_model

    vllm_config = case.model_config(out)
    vllm_config.load_config.device = "cpu"
    return vllm_config, get_model(vllm_config=vllm_config)


def run_model(out: str, fixture: str, rank: int, tp: int) -> dict:
    from safetensors.torch import load_file

    from npuconv.engines import layers as core
    from npuconv.errors import InputError

    try:
        vllm_config, model = load_model(out)
    except InputError as e:
        return {"layers": {}, "refused": {"model": str(e)}, "class": None}
    quant = vllm_config.quant_config
    hf = vllm_config.model_config.hf_config
    stored = load_file(os.path.join(out, "model.safetensors"))
    ref = load_file(os.path.join(fixture, "reference_dequant.safetensors"))
    records: dict[str, list] = {}
    core.OBSERVERS[:] = [lambda name, x, y, xe: records.setdefault(name, []).append(xe)]
    report = {"layers": {}, "refused": {}, "class": type(model).__name__,
              # the experts' parameters vs the checkpoint's expert tensors (by name)
              "expert_params": sorted(n for n, _ in model.named_parameters() if ".experts." in n),
              "expert_tensors": sorted(k for k in stored if ".experts." in k)}
    for name, check in case.build_layers(hf, quant, tp, rank):
        module = model.get_submodule(check.prefix)
        records.clear()
        plan = module.quant_method.plan
        sub = plan.w13 if hasattr(plan, "w13") else plan
        limits = sub.target.thresholds(sub.entry, torch.bfloat16)
        report["layers"][name] = {**check.run(module, ref, stored, records, rank, tp), "class": type(module).__name__,
                                  "method": type(module.quant_method).__name__, "target": sub.target.name,
                                  "max_rel_l2": limits.max_rel_l2, "min_cosine": limits.min_cosine}
    return report
