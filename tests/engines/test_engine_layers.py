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
