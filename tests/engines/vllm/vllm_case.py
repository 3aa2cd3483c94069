"""Engine test cases, run INSIDE the vLLM venv: ``python vllm_case.py TP RESULT.json OUT=FIXTURE ... model:OUT=FIXTURE ...``
(``model:`` cases: whole models through vLLM's own model loader, vllm_model.py).

vLLM 0.23.0 + vLLM-Ascend 0.23.0.post1, unmodified, on the emulated ``torch_npu`` (tests/engines/support):
the plugin is loaded through vLLM's own ``load_general_plugins`` (entry point ``vllm.general_plugins``),
the quantization config through ``get_quantization_config("npuconv")``; the model's linear layers
(``QKVParallelLinear``, ``MergedColumnParallelLinear``, ``RowParallelLinear`` → vLLM-Ascend's classes)
and its ``FusedMoE`` (→ ``AscendFusedMoE``) are built at TP rank r of ``TP`` (gloo), loaded through
their own ``weight_loader``s with the model's own name mapping (``stacked_params_mapping``; the stacked
expert tensors keep their checkpoint names, which the models hand to ``params_dict[name]``), processed,
and run. (vllm_model.py loads whole models through vLLM's own model loader.) Every layer's output is compared with
``x_effective @ dequant(source)ᵀ (+ bias)`` in float64 (``reference_dequant.safetensors``: the writing
tool's own dequantization). Stubbed: only infrastructure (tests/engines/support/torch_npu).
Rank 0 writes ``{fixture: {"layers": {layer: {rel_l2, cosine, class, method}}, "refused": {layer: reason}}}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def main(tp: int, result: str, cases: list[str]) -> None:
    port = 29500 + (os.getpid() % 2000)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, tp, port, cases, result)) for r in range(1, tp)]
    for p in procs:
        p.start()
    rank_main(0, tp, port, cases, result)
    for p in procs:
        p.join(300)
        if p.exitcode != 0:
            raise SystemExit(f"rank exited with {p.exitcode}")


def model_config(out: str):
    """vLLM's own config code for the served model (``vllm serve OUT``): ``quant_method: npuconv`` in
    config.json must resolve to npuconv's method with no flag (``_verify_quantization`` on NPUPlatform)."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    vllm_config = VllmConfig(model_config=ModelConfig(model=out, dtype="bfloat16", enforce_eager=True))
    assert vllm_config.model_config.quantization == "npuconv", vllm_config.model_config.quantization
    global _CONFIG_CONTEXT  # held for the whole case, as a worker does (a dropped one resets the config)
    _CONFIG_CONTEXT = set_current_vllm_config(vllm_config)
    _CONFIG_CONTEXT.__enter__()
    return vllm_config


def emulate_routing_op() -> None:
    """``_C_ascend::moe_gating_top_k`` (vLLM-Ascend's compiled expert-selection kernel, not built on CPU):
    a plain-torch emulation, infrastructure like the fake torch_npu (routing is not under test; the
    reference routes with its own softmax/top-k). Single group only."""
    import torch.library

    lib = torch.library.Library("_C_ascend", "FRAGMENT")
    lib.define(
        "moe_gating_top_k(Tensor x, *, int k, int k_group, int group_count, int group_select_mode, int renorm, "
        "int norm_type, bool out_flag, float routed_scaling_factor=1.0, float eps=1e-20, Tensor? bias_opt=None) "
        "-> (Tensor, Tensor, Tensor)"
    )

    def impl(x, *, k, k_group, group_count, group_select_mode, renorm, norm_type, out_flag,
             routed_scaling_factor=1.0, eps=1e-20, bias_opt=None):
        assert group_count == 1 and bias_opt is None, "emulated for one expert group without bias only"
        logits = x.float()
        if norm_type == 0:
            scores = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        weights, ids = torch.topk(scores, k, dim=-1)
        if renorm:
            weights = weights / (weights.sum(-1, keepdim=True) + eps)
        return (weights * routed_scaling_factor).to(x.dtype), ids.to(torch.int32), scores

    lib.impl("moe_gating_top_k", impl, "CPU")
    global _ROUTING_LIB
    _ROUTING_LIB = lib


def setup(rank: int, tp: int, port: int, out: str):
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
    import torch_npu  # noqa: F401  (the fake: emulated kernels, npu device name, hooks)
    from vllm.platforms import current_platform

    platform = type(current_platform)
    assert platform.__name__ == "NPUPlatform", f"vLLM-Ascend platform not active: {platform}"
    platform.dispatch_key = "CPU"  # vLLM's custom ops (vllm::all_reduce) dispatch on CPU tensors
    from vllm.distributed import parallel_state as ps
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # vLLM's own plugin loading: finds npuconv's entry point
    emulate_routing_op()
    vllm_config = model_config(out)
    from vllm_ascend.ascend_config import init_ascend_config
    from vllm_ascend.utils import register_ascend_customop

    init_ascend_config(vllm_config)
    register_ascend_customop(vllm_config)
    ps.init_distributed_environment(tp, rank, f"tcp://127.0.0.1:{port}", rank, "gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, backend="gloo")


def rank_main(rank: int, tp: int, port: int, cases: list[str], result: str) -> None:
    outs = [c.split("=")[0].removeprefix("model:") for c in cases]
    # the parallel groups are made once per process, as a worker makes them for its model; vLLM makes
    # the expert-parallel group only for a MoE model, so set up with a MoE case when there is one
    moe = [o for o in outs if {"num_experts", "num_local_experts"} & set(json.load(open(os.path.join(o, "config.json"))))]
    setup(rank, tp, port, (moe or outs)[0])
    report = {}
    for i, case in enumerate(cases):
        if case.startswith("model:"):  # a whole model through vLLM's model loader (vllm_model.py)
            import vllm_model

            out, fixture = case[len("model:"):].split("=")
            report["model:" + os.path.basename(fixture)] = vllm_model.run_model(out, fixture, rank, tp)
            continue
        out, fixture = case.split("=")
        if i:
            model_config(out)
        report[os.path.basename(fixture)] = run_case(out, fixture, rank, tp)
    if rank == 0:
        with open(result, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


def run_case(out: str, fixture: str, rank: int, tp: int) -> dict:
    from safetensors.torch import load_file

    from npuconv.engines import layers as core
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.transformers_utils.config import get_config

    hf = get_config(out, trust_remote_code=False)
    quant_cls = get_quantization_config(hf.quantization_config["quant_method"])
    quant = quant_cls.from_config(hf.quantization_config)
    quant.maybe_update_config(out)
    stored = load_file(os.path.join(out, "model.safetensors"))
    ref = load_file(os.path.join(fixture, "reference_dequant.safetensors"))
    records: dict[str, list] = {}
    core.OBSERVERS[:] = [lambda name, x, y, xe: records.setdefault(name, []).append(xe)]
    report: dict = {"layers": {}, "refused": {}}
    for name, check in build_layers(hf, quant, tp, rank):
        try:
            module = check.build()
            load(module, check, stored)
            module.quant_method.process_weights_after_loading(module)
        except Exception as e:  # noqa: BLE001 - refusals are reported, everything else re-raised
            if type(e).__name__ != "InputError":
                raise
            report["refused"][name] = str(e)
            continue
        records.clear()
        plan = module.quant_method.plan
        target = (plan.w13 if hasattr(plan, "w13") else plan).target
        entry = (plan.w13 if hasattr(plan, "w13") else plan).entry
        limits = target.thresholds(entry, torch.bfloat16)  # verify's limits for this layer's target
        report["layers"][name] = {**check.run(module, ref, stored, records, rank, tp), "class": type(module).__name__,
                                  "method": type(module.quant_method).__name__, "target": target.name,
                                  "max_rel_l2": limits.max_rel_l2, "min_cosine": limits.min_cosine}
    return report


# ---------------------------------------------------------------------------- layers of the tiny models
class LinearCheck:
    """One (possibly fused) linear: how the model builds it, loads it and what it must compute."""

    def __init__(self, cls, kwargs, prefix, shards, shard_ids, parallel):
        self.cls, self.kwargs, self.prefix = cls, kwargs, prefix
        self.shards, self.shard_ids, self.parallel = shards, shard_ids, parallel

    def build(self):
        return self.cls(**self.kwargs, prefix=self.prefix)

    def run(self, module, ref, stored, records, rank, tp):
        torch.manual_seed(0)
        k_full = ref[self.shards[0] + ".weight"].shape[1]
        x = torch.randn(8, k_full, dtype=torch.bfloat16)
        if self.parallel == "row":
            k = k_full // tp
            y = module(x[:, rank * k:(rank + 1) * k])[0]
            if not getattr(module, "reduce_results", True):  # e.g. a shared expert: the MoE block reduces its sum
                dist.all_reduce(y)
            (xe,) = records[self.prefix]
            w = ref[self.shards[0] + ".weight"].double()[:, rank * k:(rank + 1) * k]
            partial = xe.double() @ w.T
            dist.all_reduce(partial)
            bias = stored.get(self.shards[0] + ".bias")
            want = partial + (bias.double() if bias is not None else 0)
        else:
            y = module(x)[0]
            (xe,) = records[self.prefix]
            pieces = []
            for s in self.shards:
                w = ref[s + ".weight"].double()
                n = w.shape[0] // tp
                rows = w[rank * n:(rank + 1) * n]
                b = stored.get(s + ".bias")
                pieces.append(xe.double() @ rows.T + (b.double()[rank * n:(rank + 1) * n] if b is not None else 0))
            want = torch.cat(pieces, dim=-1)
        return metrics(y, want)


class MoECheck:
    """The routed experts of a Qwen2-MoE / Mixtral block through ``FusedMoE`` (vLLM-Ascend's class).

    Compared per projection, as verify compares a layer: each routed kernel call (``w13``, ``w2``: rows
    sorted by expert, npuconv.engines.layers.moe_forward) against ``x_effective @ dequant(expert)ᵀ`` of
    this rank's slice, and the block output (router-weighted, summed per token, all-reduced) against
    the same sum of ``x_effective(w2) @ dequant(down)ᵀ``. (For weight-only kernels ``x_effective`` is
    the input itself; a kernel that quantizes activations gets its own quantized rows.) Reported:
    the worst of the three."""

    def __init__(self, cls, kwargs, prefix, leaves, gate):
        self.cls, self.kwargs, self.prefix, self.leaves, self.gate = cls, kwargs, prefix, leaves, gate

    def build(self):
        return self.cls(**self.kwargs, prefix=self.prefix)

    def run(self, module, ref, stored, records, rank, tp):
        from npuconv.engines import layers as core

        torch.manual_seed(0)
        kw = self.kwargs
        x = torch.randn(8, kw["hidden_size"], dtype=torch.bfloat16)
        router_logits = (x.float() @ stored[self.gate].float().T).to(torch.bfloat16)
        calls = {}
        core.OBSERVERS.append(lambda name, rows, y_, xe: calls.__setitem__(name.rsplit(".", 1)[1], (y_, xe)))
        try:
            result = module.quant_method.apply(layer=module, x=x, router_logits=router_logits, top_k=kw["top_k"],
                                               renormalize=kw["renormalize"], num_experts=kw["num_experts"])
        finally:
            core.OBSERVERS.pop()
        y = result.routed_out.detach().double()
        dist.all_reduce(y)
        weights, ids = reference_routing(router_logits, kw)
        order = torch.argsort(ids.flatten(), stable=True)
        experts, tokens, row_weights = ids.flatten()[order], order // kw["top_k"], weights.flatten()[order]
        per_row = [expert_weights(ref, self.prefix, self.leaves, int(e), rank, tp) for e in experts]
        worst = []
        for name, index in (("w13", 0), ("w2", 1)):
            y_rows, xe = calls[name]
            want = torch.stack([xe[i].double() @ w[index].T for i, w in enumerate(per_row)])
            worst.append(metrics(y_rows, want))
        down = torch.stack([calls["w2"][1][i].double() @ w[1].T for i, w in enumerate(per_row)])
        want = torch.zeros_like(y).index_add_(0, tokens, down * row_weights.unsqueeze(-1))
        dist.all_reduce(want)
        worst.append(metrics(y, want))
        rel = torch.tensor([max(m["rel_l2"] for m in worst), -min(m["cosine"] for m in worst)], dtype=torch.float64)
        dist.all_reduce(rel, op=dist.ReduceOp.MAX)
        return {"rel_l2": float(rel[0]), "cosine": -float(rel[1])}


def reference_routing(logits, kw):
    """Softmax top-k routing (renormalized when the model says so), in float64."""
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = torch.topk(probs, kw["top_k"], dim=-1)
    if kw["renormalize"]:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def expert_weights(ref, prefix, leaves, e, rank, tp):
    """This rank's dequantized ``w13`` (gate ‖ up rows of its N slice) and ``w2`` (its K columns) of expert ``e``."""
    gate, up, down = (ref[f"{prefix}.{e}.{leaf}.weight"].double() for leaf in leaves)
    n, k = gate.shape[0] // tp, down.shape[1] // tp
    return torch.cat([gate[rank * n:(rank + 1) * n], up[rank * n:(rank + 1) * n]]), down[:, rank * k:(rank + 1) * k]


def metrics(y, want) -> dict:
    y, want = y.detach().double(), want.detach().double()
    rel = float((y - want).norm() / want.norm())
    cos = float(torch.nn.functional.cosine_similarity(y.flatten(), want.flatten(), dim=0))
    return {"rel_l2": rel, "cosine": cos}


def build_layers(hf, quant, tp, rank):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    quant.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    p = "model.layers.0"
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    qkv_bias = bool(getattr(hf, "qkv_bias", False) or hf.model_type.startswith("qwen2"))
    common = {"quant_config": quant}
    yield "qkv_proj", LinearCheck(
        QKVParallelLinear, {"hidden_size": hf.hidden_size, "head_size": head_dim, "total_num_heads": heads,
                            "total_num_kv_heads": kv, "bias": qkv_bias, **common},
        f"{p}.self_attn.qkv_proj", [f"{p}.self_attn.{s}_proj" for s in "qkv"], ["q", "k", "v"], "column")
    yield "o_proj", LinearCheck(
        RowParallelLinear, {"input_size": heads * head_dim, "output_size": hf.hidden_size, "bias": False, **common},
        f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"], [None], "row")
    moe = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
    mlp, inter = f"{p}.mlp", getattr(hf, "intermediate_size", 0)
    if moe:
        yield from moe_layers(hf, quant, p, moe)
        if not getattr(hf, "shared_expert_intermediate_size", 0):
            return
        mlp, inter = f"{p}.mlp.shared_expert", hf.shared_expert_intermediate_size
    yield "gate_up_proj", LinearCheck(
        MergedColumnParallelLinear, {"input_size": hf.hidden_size, "output_sizes": [inter, inter], "bias": False, **common},
        f"{mlp}.gate_up_proj", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], [0, 1], "column")
    yield "down_proj", LinearCheck(
        RowParallelLinear, {"input_size": inter, "output_size": hf.hidden_size, "bias": False, **common},
        f"{mlp}.down_proj", [f"{mlp}.down_proj"], [None], "row")


def moe_layers(hf, quant, p, experts):
    from vllm.model_executor.layers.fused_moe import FusedMoE

    if hf.model_type == "mixtral":
        prefix, leaves, gate = f"{p}.block_sparse_moe.experts", ("w1", "w3", "w2"), f"{p}.block_sparse_moe.gate.weight"
        inter, renorm, top_k = hf.intermediate_size, True, hf.num_experts_per_tok
    else:
        prefix, leaves, gate = f"{p}.mlp.experts", ("gate_proj", "up_proj", "down_proj"), f"{p}.mlp.gate.weight"
        inter, renorm, top_k = hf.moe_intermediate_size, bool(hf.norm_topk_prob), hf.num_experts_per_tok
    kwargs = {"num_experts": experts, "top_k": top_k, "hidden_size": hf.hidden_size, "intermediate_size": inter,
              "renormalize": renorm, "quant_config": quant}
    yield "experts", MoECheck(FusedMoE, kwargs, prefix, leaves, gate)


# ---------------------------------------------------------------------------- weight loading (the model's mapping)
def load(module, check, stored):
    """Feed the checkpoint tensors of ``check``'s layers through the module's own weight loaders, with
    the name mapping the model's ``load_weights`` applies."""
    params = dict(module.named_parameters())
    if isinstance(check, MoECheck):
        # npuconv stores experts stacked (<prefix>.<leaf>.<role>, [E, ...]); the model's load_weights
        # hands such a name (claimed by no stacked/expert mapping) to params_dict[name].weight_loader
        for key, tensor in stored.items():
            if key.startswith(check.prefix + "."):
                param = params[key[len(check.prefix) + 1:]]
                param.weight_loader(param, tensor)
        return
    for shard, shard_id in zip(check.shards, check.shard_ids):
        for key, tensor in stored.items():
            if not key.startswith(shard + "."):
                continue
            role = key[len(shard) + 1:]
            param = params[role]
            if shard_id is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
