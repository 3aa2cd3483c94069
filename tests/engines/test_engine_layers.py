"""The engine-neutral core (npuconv.engines.layers): per-rank params, TP split, kernel through the target.

Runs without any engine: each rank's pieces of a converted fixture go through the same calls an
engine integration makes, and the (all-reduced) result must match ``x_effective @ dequant(source)ᵀ``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from npuconv.engines import layers as core
from npuconv.errors import InputError
from npuconv.kernels import get_backend

P = "model.layers.0."
MODULES = [  # (engine module, fused shards, parallel)
    ("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], core.COLUMN),
    ("self_attn.o_proj", ["self_attn.o_proj"], core.ROW),
    ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"], core.COLUMN),
    ("mlp.down_proj", ["mlp.down_proj"], core.ROW),
]


def _run_module(out, fixture, module, shards, parallel, world):
    manifest = core.read_manifest(out)
    stored = load_file(out / "model.safetensors")
    ref = load_file(fixture / "reference_dequant.safetensors")
    backend = get_backend("cpu")
    shards = [P + s for s in shards]
    ys, refs = [], []
    for rank in range(world):
        plan = core.plan_linear(manifest, P + module, shards, parallel, rank, world)
        loaded = {}
        for role, param in plan.params.items():
            pieces = [plan.split(role, stored[f"{s}.{role}"], i) for i, s in enumerate(shards)]
            if param.shared:
                for i, piece in enumerate(pieces[1:], 1):
                    plan.check_shared(role, pieces[0], piece, i)
            loaded[role] = torch.cat(pieces, param.n_axis) if not param.shared else pieces[0]
            assert tuple(loaded[role].shape) == param.shape
        tensors = plan.kernel_tensors(loaded, backend)
        k = plan.specs[0].in_features
        x = torch.randn(6, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        seen = []
        core.OBSERVERS[:] = [lambda name, x_, y_, xe: seen.append(xe)]
        try:
            if parallel == core.ROW:
                lo, hi = rank * k // world, (rank + 1) * k // world
                ys.append(plan.forward(backend, tensors, x[:, lo:hi]).double())
                refs.append(seen[0].double() @ ref[shards[0] + ".weight"].double()[:, lo:hi].T)
            else:
                ys.append(plan.forward(backend, tensors, x).double())
                rows = [ref[s + ".weight"].double() for s in shards]
                rows = [w[rank * (w.shape[0] // world):(rank + 1) * (w.shape[0] // world)] for w in rows]
                refs.append(seen[0].double() @ torch.cat(rows).T)
        finally:
            core.OBSERVERS.clear()
    y, want = (sum(ys), sum(refs)) if parallel == core.ROW else (torch.cat(ys, -1), torch.cat(refs, -1))
    limit = plan.target.thresholds(plan.entry, torch.bfloat16).max_rel_l2  # verify's limit for this target
    return float((y - want).norm() / want.norm()), limit


@pytest.mark.parametrize("fixture,target", [("ct020_w4a16_g32_asym", "npu-int4"), ("ms_w8a8_static_fp16", "npu-w8a8")])
@pytest.mark.parametrize("world", [1, 2])
def test_modules_match_reference_per_rank(engines, tmp_path, fixture, target, world):
    out = engines.convert(fixture, target, tmp_path / "out")
    for module, shards, parallel in MODULES:
        rel, limit = _run_module(out, engines.fixtures / fixture, module, shards, parallel, world)
        assert rel <= limit, (module, rel)


def test_act_order_row_parallel_is_refused_at_tp2(engines, tmp_path):
    out = engines.convert("gptq_v1_b4_g64_asym_descact", "npu-int4", tmp_path / "out")
    fixture = engines.fixtures / "gptq_v1_b4_g64_asym_descact"
    assert _run_module(out, fixture, "mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"], core.COLUMN, 2)[0] < 1e-2
    with pytest.raises(InputError, match="act-order groups are not aligned to the rank boundary"):
        _run_module(out, fixture, "mlp.down_proj", ["mlp.down_proj"], core.ROW, 2)


def test_split_that_is_not_exact_is_refused(engines, tmp_path):
    out = engines.convert("ms_w8a8_static_fp16", "npu-w8a8", tmp_path / "out")
    manifest = core.read_manifest(out)
    with pytest.raises(InputError, match="do not split into 128 ranks"):
        core.plan_linear(manifest, P + "self_attn.k_proj", None, core.COLUMN, 0, 128)  # 64 features over 128 ranks


def test_fused_shards_must_share_a_kernel(engines, tmp_path):
    out = engines.convert("ct020_w4a16_g32_asym", "npu-int4", tmp_path / "out")
    manifest = core.read_manifest(out)
    manifest["layers"][P + "self_attn.k_proj"]["antiquant_group_size"] = 64
    with pytest.raises(InputError, match="differ in antiquant_group_size"):
        core.plan_linear(manifest, P + "self_attn.qkv_proj", [P + f"self_attn.{s}_proj" for s in "qkv"], core.COLUMN)


def test_plugin_entry_point_is_declared():
    import tomllib

    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["vllm.general_plugins"]["npuconv"] == "npuconv.engines.vllm_plugin:register"


# ---------------------------------------------------------------------------- MoE experts
MOE_CASES = [("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4", "mlp", ("gate_proj", "up_proj", "down_proj")),
             ("ct020_moe_mixtral_w8a8_int", "npu-w8a8", "block_sparse_moe", ("w1", "w3", "w2"))]


def _model_load(model: torch.nn.Module, stored: dict) -> set[str]:
    """What a model's ``load_weights`` does with a name that no stacked/expert mapping claims:
    ``params_dict[name].weight_loader(param, tensor)`` (names not in ``params_dict`` are skipped)."""
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in stored.items():
        if name in params:
            params[name].weight_loader(params[name], tensor)
            loaded.add(name)
    return loaded


def _expert_weights(ref, prefix, leaves, e, rank, world):
    """Rank ``rank``'s dequantized ``w13`` (gate ‖ up rows of its N slice) and ``w2`` (its K columns) of expert ``e``."""
    w = lambda leaf: ref[f"{prefix}.{e}.{leaf}.weight"].double()  # noqa: E731
    gate, up, down = (w(leaf) for leaf in leaves)
    n, k = gate.shape[0] // world, down.shape[1] // world
    return torch.cat([gate[rank * n:(rank + 1) * n], up[rank * n:(rank + 1) * n]]), down[:, rank * k:(rank + 1) * k]


@pytest.mark.parametrize("fixture,target,block,leaves", MOE_CASES, ids=[c[0] for c in MOE_CASES])
@pytest.mark.parametrize("world", [1, 2])
def test_experts_load_by_checkpoint_names_and_run_routed(engines, tmp_path, monkeypatch, fixture, target, block, leaves, world):
    """ExpertsPlan: parameters under the checkpoint's stacked names (found by a name lookup, loaded by
    their own weight_loader with the TP split), fused into w13/w2 after loading, run routed with ONE
    grouped kernel call per projection. Each call's routed rows match ``x_effective @ dequant(expert)ᵀ``
    within verify's limit, and the block output (router-weighted, summed per token, all-reduced over
    the ranks) matches the same reference built from the kernels' effective activations."""
    out = engines.convert(fixture, target, tmp_path / "out")
    manifest = core.read_manifest(out)
    stored = load_file(out / "model.safetensors")
    ref = load_file(engines.fixtures / fixture / "reference_dequant.safetensors")
    prefix = f"{P}{block}.experts"
    backend = get_backend("cpu")
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    weights, ids = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
    weights = weights.to(torch.bfloat16)
    counts = torch.bincount(ids.flatten(), minlength=4)
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    token_of_row = torch.argsort(ids.flatten(), stable=True) // 2
    calls, records = [], {}
    real = backend.ops.npu_grouped_matmul
    monkeypatch.setattr(backend.ops, "npu_grouped_matmul", lambda xs, w, **kw: calls.append(kw["group_list"].tolist()) or real(xs, w, **kw))
    monkeypatch.setattr(core, "OBSERVERS", [lambda name, rows, y_, xe: records.update({name.rsplit(".", 1)[1]: (y_, xe)})])
    y, want = 0, torch.zeros(7, 128, dtype=torch.float64)
    for rank in range(world):
        plan = core.plan_experts(manifest, prefix, rank, world)
        model = torch.nn.Module()  # the model's module tree down to the experts layer
        experts = model
        for part in prefix.split("."):
            experts.add_module(part, torch.nn.Module())
            experts = getattr(experts, part)
        plan.register(experts)
        expected = {f"{prefix}.{leaf}.{role}" for leaf in leaves for role in manifest["layers"][f"{prefix}.{leaf}"]["tensors"]}
        assert _model_load(model, stored) == expected == {n for n, _ in model.named_parameters()}
        t13, t2 = plan.kernel_tensors(plan.loaded(experts), backend)
        calls.clear()
        y = y + plan.forward(backend, t13, t2, x, weights, ids).double()
        assert calls == [counts.tolist()] * 2  # one routed npu_grouped_matmul for w13, one for w2
        limit = plan.w13.target.thresholds(plan.w13.entry, torch.bfloat16).max_rel_l2
        per_row = [_expert_weights(ref, prefix, leaves, int(e), rank, world) for e in expert_of_row]
        for name, index in (("w13", 0), ("w2", 1)):
            y_rows, xe = records[name]
            want_rows = torch.stack([xe[i].double() @ w[index].T for i, w in enumerate(per_row)])
            assert float((y_rows.double() - want_rows).norm() / want_rows.norm()) <= limit, (name, rank)
        down_rows = torch.stack([records["w2"][1][i].double() @ w[1].T for i, w in enumerate(per_row)])
        row_weights = weights.flatten()[torch.argsort(ids.flatten(), stable=True)].double().unsqueeze(-1)
        want.index_add_(0, token_of_row, down_rows * row_weights)
    rel = float((y - want).norm() / want.norm())
    assert rel <= limit, rel


def test_experts_loader_refuses_a_wrong_tensor_and_unequal_shared_roles(engines, tmp_path):
    out = engines.convert("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4", tmp_path / "out")
    plan = core.plan_experts(core.read_manifest(out), P + "mlp.experts", 0, 2)
    stored = load_file(out / "model.safetensors")
    weight = stored[P + "mlp.experts.down_proj.weight"]
    with pytest.raises(InputError, match="manifest says"):
        plan.load("down_proj", "weight", weight[:2])
    with pytest.raises(InputError, match="no expert projection"):
        plan.load("gate_up_proj", "weight", weight)
    assert plan.load("down_proj", "weight", weight).shape == plan.params["down_proj"]["weight"].shape
