"""The comparisons run inside the SGLang venv: each converted linear / MoE module of the SGLang
model against ``x @ dequant(source)ᵀ`` from the fixture's ``reference_dequant.safetensors`` (the
writing tool's own dequantization)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

TOKENS = 8


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _inputs(k: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, k, generator=g).to(dtype)


def run_checks(model, model_config, fixture: str, rank: int, world: int) -> dict:
    from sglang.srt.layers.linear import LinearBase, RowParallelLinear
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from npuconv.engines.sglang import NpuconvLinearMethod, NpuconvMoEMethod

    refs = load_file(os.path.join(fixture, "reference_dequant.safetensors"))
    dtype = model_config.dtype
    out = {"layers": {}}
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase) and isinstance(method, NpuconvLinearMethod):
            out["layers"][prefix] = _linear(module, method, refs, dtype, rank, world,
                                            isinstance(module, RowParallelLinear))
        elif isinstance(module, FusedMoE) and isinstance(method, NpuconvMoEMethod):
            out["layers"][prefix] = _moe(module, method, refs, dtype, rank, world)
    return out


def _activations(entry: dict, module, x: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, the activations the reference multiplies), as verify does: weight-only kernels use
    ``x``; static W8A8 gets inputs inside its calibrated range (|x| ≲ 60·input_scale) and the reference
    its int8 grid ``(clamp(round(x/s + o)) − o)·s``; dynamic W8A8 the per-token grid (absmax/127)."""
    if entry.get("kernel") != "npu_quant_matmul":
        return x, x.double()
    if "input_scale" in entry["tensors"]:
        s = float(module.input_scale.float().flatten()[0])
        o = float(module.input_offset.float().flatten()[0])
        x = (x.float() * s * 20).to(x.dtype)
        q = torch.clamp(torch.round(x.double() / s + o), -128, 127)
        return x, (q - o) * s
    pieces = []  # row-parallel: each rank quantizes its own K slice per token
    for piece in x.double().chunk(chunks, dim=-1):
        step = piece.abs().amax(-1, keepdim=True) / 127
        pieces.append(torch.round(piece / step) * step)
    return x, torch.cat(pieces, dim=-1)


def _reduced(module, y: torch.Tensor, world: int) -> torch.Tensor:
    """The all-reduce of a row-parallel output: the layer's own when ``reduce_results``, else the one
    SGLang's decoder layer does after it (the layer communicator / MoE block), done here the same way."""
    if world > 1 and not getattr(module, "reduce_results", True):
        from sglang.srt.distributed import tensor_model_parallel_all_reduce
        y = tensor_model_parallel_all_reduce(y.contiguous())
    return y


def _ref_weight(refs, name: str) -> torch.Tensor:
    return refs[f"{name}.weight"].double()


def _linear(module, method, refs, dtype, rank, world, row: bool) -> dict:
    plan = method.plan
    parts = list(plan.shards)
    full_k = plan.specs[0].in_features
    x_full, x_ref = _activations(plan.entries[0], module, _inputs(full_k, dtype, seed=len(parts[0])),
                                 world if row else 1)
    bias = getattr(module, "bias", None)
    if row:
        k = full_k // world
        y = module(x_full[:, rank * k:(rank + 1) * k])
        y = _reduced(module, y[0] if isinstance(y, tuple) else y, world)
        ref = x_ref @ _ref_weight(refs, parts[0]).T
        if bias is not None:
            ref = ref + _full_bias(refs, module, parts, world)
        kind = "row"
    else:
        y = module(x_full)
        y = y[0] if isinstance(y, tuple) else y
        blocks = []
        for name in parts:
            w = _ref_weight(refs, name)
            n = w.shape[0] // world
            blocks.append(w[rank * n:(rank + 1) * n])
        ref = x_ref @ torch.cat(blocks).T
        if bias is not None:
            ref = ref + bias.double()  # SGLang's own rank share of the checkpoint bias
        kind = "qkv" if len(parts) == 3 else "merged" if len(parts) == 2 else "column"
    limit = plan.target.thresholds(plan.entries[0], dtype).max_rel_l2
    return {"kind": kind, "target": plan.target.name, "rel_l2": rel_l2(y, ref), "limit": limit}


def _full_bias(refs, module, parts, world):
    return module.bias.double()  # a row-parallel bias is replicated in SGLang (added once, on rank 0)


def _moe(module, method, refs, dtype, rank, world) -> dict:
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    plan = method.plan
    gate = plan.w13
    experts, hidden = gate.specs[0].num_experts, gate.specs[0].in_features
    x, xd = _activations(gate.entries[0], None, _inputs(hidden, dtype, seed=7))
    g = torch.Generator().manual_seed(11)
    top_k = 2
    logits = torch.randn(TOKENS, experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k, -1)
    topk = StandardTopKOutput(topk_weights=weights.float(), topk_ids=ids.int(), router_logits=logits)
    y = _reduced(module, module(x, topk), world)
    head, leaves = plan.prefix, plan.leaves
    ref = torch.zeros(TOKENS, hidden, dtype=torch.float64)
    for m in range(TOKENS):
        for j in range(top_k):
            e = int(ids[m, j])
            wg, wu, wd = (refs[f"{head}.{e}.{leaf}.weight"].double() for leaf in leaves)
            h = torch.nn.functional.silu(xd[m] @ wg.T) * (xd[m] @ wu.T)
            ref[m] += float(weights[m, j]) * (h @ wd.T)
    limit = 2 * gate.target.thresholds(gate.entries[0], dtype).max_rel_l2
    return {"kind": "moe", "target": gate.target.name, "rel_l2": rel_l2(y, ref), "limit": limit}
