"""The format-free expert stacking (npuconv.experts), its hook in Reader.linear_specs/load,
the writers' handling of stacks and the grouped-matmul runtime path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from npuconv.entries import from_storage
from npuconv.kernels import get_backend
from npuconv.model import FP4_E2M1, INT, SCALE_E8M0, ActivationQuant, LinearSpec, QuantizedLinear, dequantize
from npuconv.readers.base import Reader
from npuconv.experts import stack_expert_specs, stack_layers, unstack_layer, unstack_spec
from npuconv.runtime import run_kernel
from npuconv.verify import reference_output, same_canonical
from npuconv.registry import target_class
from npuconv.writers import WriterOptions

MOE = "model.layers.0.mlp.experts"
DYNAMIC = ActivationQuant(INT, 8, dynamic=True)


def int_layer(name, n, k, bits=4, group=32, symmetric=False, seed=0, act_order=False, activation=None) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(seed)
    spec = LinearSpec(name, n, k, bits, group, symmetric, act_order=act_order, scale_dtype=torch.bfloat16,
                      activation=activation, source_scheme="test", source_tensors=(f"{name}.w", f"{name}.s"))
    groups = spec.num_groups
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zero = None if symmetric else torch.randint(0, 2**bits, (n, groups), generator=gen).to(torch.int16)
    g_idx = torch.randperm(k, generator=gen).to(torch.int32) // group if act_order else None
    return QuantizedLinear(spec, codes, scale, zero, g_idx)


class FakeReader(Reader):
    """A reader over in-memory layers (the stacking is format-free)."""

    format = "fake"
    stack_experts = True

    def __init__(self, layers: list[QuantizedLinear], stack: bool = True):
        super().__init__(checkpoint=None)  # type: ignore[arg-type]
        self.layers = {layer.spec.name: layer for layer in layers}
        self.stack_experts = stack
        self.loaded: list[str] = []

    def scan(self):
        return [layer.spec for layer in self.layers.values()]

    def load_layer(self, spec):
        self.loaded.append(spec.name)
        return self.layers[spec.name]


def moe_layers(experts=4, projs=("gate_proj", "up_proj", "down_proj"), **kw) -> list[QuantizedLinear]:
    layers = [int_layer("model.layers.0.self_attn.q_proj", 64, 64, seed=99, **kw)]
    for e in range(experts):
        for i, proj in enumerate(projs):
            n, k = (64, 128) if proj != "down_proj" else (128, 64)
            layers.append(int_layer(f"{MOE}.{e}.{proj}", n, k, seed=10 * e + i, **kw))
    return layers


# -------------------------------------------------------------------------------------- stacking
def test_experts_become_one_stacked_layer_per_projection():
    layers = moe_layers()
    reader = FakeReader(layers)
    specs = reader.linear_specs()
    assert [s.name for s in specs] == ["model.layers.0.self_attn.q_proj", f"{MOE}.gate_proj", f"{MOE}.up_proj", f"{MOE}.down_proj"]
    down = specs[3]
    assert down.num_experts == 4 and (down.out_features, down.in_features) == (128, 64)
    assert down.source_tensors == tuple(t for e in range(4) for t in (f"{MOE}.{e}.down_proj.w", f"{MOE}.{e}.down_proj.s"))
    stacked = reader.load(down)
    assert reader.loaded == [f"{MOE}.{e}.down_proj" for e in range(4)]  # the reader's own load, per expert
    members = [reader.layers[f"{MOE}.{e}.down_proj"] for e in range(4)]
    assert torch.equal(stacked.qweight, torch.stack([m.qweight for m in members]))
    assert torch.equal(stacked.scale, torch.stack([m.scale for m in members]))
    assert torch.equal(stacked.zero, torch.stack([m.zero for m in members]))
    assert stacked.g_idx is None and stacked.bias is None
    assert torch.equal(dequantize(stacked), torch.stack([dequantize(m) for m in members]))
    assert reader.expert_members(specs[0]) is None and not reader.warnings
    # a dense layer still loads through the same wrapped load
    assert reader.load(specs[0]) is reader.layers["model.layers.0.self_attn.q_proj"]


def test_unstack_restores_the_member_layers():
    layers = moe_layers(experts=3, projs=("w1",))
    reader = FakeReader(layers)
    (stacked_spec,) = [s for s in reader.linear_specs() if s.num_experts]
    assert stacked_spec.name == f"{MOE}.w1"
    back = unstack_layer(reader.load(stacked_spec))
    assert [b.spec.name for b in back] == [f"{MOE}.{e}.w1" for e in range(3)]
    for b, original in zip(back, layers[1:]):
        assert b.spec == replace(original.spec, source_tensors=()) and same_canonical(b, original)
    assert unstack_spec(layers[0].spec) is None  # a dense layer has no members


def test_act_order_and_mixed_symmetry_stack_with_filled_in_fields():
    layers = [int_layer(f"{MOE}.{e}.w2", 16, 64, act_order=(e == 0), seed=e) for e in range(2)]
    layers[1] = layers[1].with_spec(act_order=True)  # same spec, but this member carries no g_idx
    stacked = stack_layers(replace(layers[0].spec, name=f"{MOE}.w2", num_experts=2), layers)
    assert stacked.g_idx.shape == (2, 64)
    assert torch.equal(stacked.g_idx[1].long(), torch.arange(64) // 32)
    sym = [int_layer(f"{MOE}.{e}.w2", 16, 64, symmetric=(e == 1), seed=e) for e in range(2)]
    mixed = stack_layers(replace(sym[0].spec, name=f"{MOE}.w2", num_experts=2), sym)
    assert torch.equal(mixed.zero[1], torch.full((16, 2), 8, dtype=torch.int16))  # the midpoint


@pytest.mark.parametrize("case,warning", [
    ("gap", "expert indices [0, 1, 3] are not 0..2"),
    ("offset", "expert indices [4, 5, 6, 7] are not 0..3"),
    ("bits", "expert 2 is not quantized like expert 0"),
    ("taken", "exists already"),
])
def test_groups_that_cannot_stack_stay_per_expert(case, warning):
    layers = moe_layers(projs=("w1",))
    if case == "gap":
        layers = [l for l in layers if ".experts.2." not in l.spec.name]
    elif case == "offset":  # an expert-parallel shard
        layers = layers[:1] + [l.with_spec(name=f"{MOE}.{e + 4}.w1") for e, l in enumerate(layers[1:])]
    elif case == "bits":
        layers[3] = layers[3].with_spec(bits=3)
    else:
        layers.append(int_layer(f"{MOE}.w1", 64, 128))
    reader = FakeReader(layers)
    names = [s.name for s in reader.linear_specs()]
    assert all(s.num_experts is None for s in reader.linear_specs())
    assert len(names) == len(layers)
    assert any(warning in w for w in reader.warnings), reader.warnings


def test_stacking_is_opt_in_per_reader():
    layers = moe_layers(projs=("w1",))
    assert [s.name for s in FakeReader(layers, stack=False).linear_specs()] == [l.spec.name for l in layers]
    specs, members, notes = stack_expert_specs([l.spec for l in layers[:2]])  # one expert: nothing to do
    assert len(specs) == 2 and not members and not notes
    from npuconv.registry import get_reader

    assert all(get_reader(name).stack_experts for name in ("compressed-tensors", "gptq", "modelslim", "awq"))
    assert not get_reader("float").stack_experts and not get_reader("npuconv").stack_experts


# ----------------------------------------------------------------------------- writers and runtime
def stacked_layer(n=64, k=128, experts=4, **kw) -> QuantizedLinear:
    members = [int_layer(f"{MOE}.{e}.up_proj", n, k, seed=e, **kw) for e in range(experts)]
    return stack_layers(replace(members[0].spec, name=f"{MOE}.up_proj", num_experts=experts), members)


def kernel_tensors(target: str, layer: QuantizedLinear, **options):
    writer = target_class(target)(WriterOptions(**options))
    entry = writer.layer_manifest(layer.spec)
    stored = writer.write_layer(layer)
    return writer, entry, {role: from_storage(stored[e["name"]], e) for role, e in entry["tensors"].items()}


@pytest.mark.parametrize("target,kw", [
    ("npu-int4", {}),
    ("npu-int4", {"symmetric": True, "group": -1}),
    ("npu-int8", {"bits": 8, "group": -1}),
    ("npu-w8a8", {"bits": 8, "group": -1, "symmetric": True, "activation": DYNAMIC}),
])
def test_grouped_matmul_equals_each_expert_through_the_dense_kernel(target, kw):
    layer = stacked_layer(**kw)
    writer, entry, tensors = kernel_tensors(target, layer)
    assert writer.read_layer(layer.spec, tensors).qweight.shape == (4, 64, 128)
    backend = get_backend("cpu")
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y, x_eff = run_kernel(backend, entry, layer.spec, tensors, x)
    assert y.shape == (4, 5, 64) and x_eff.shape == (5, 128)
    for e, member in enumerate(unstack_layer(layer)):
        _, dense_entry, dense = kernel_tensors(target, member)
        y_e, _ = run_kernel(backend, dense_entry, member.spec, dense, x)
        assert torch.equal(y[e], y_e), e
    y_ref = reference_output(layer, x_eff.double())
    assert y_ref.shape == y.shape
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2


def test_writers_refuse_or_adapt_what_the_grouped_matmul_cannot_take():
    reason = lambda target, layer: target_class(target)(WriterOptions()).accepts(layer.spec)  # noqa: E731
    assert "act-order" in reason("npu-int4", stacked_layer(act_order=True))
    static = ActivationQuant(INT, 8, dynamic=False, strategy="tensor")
    assert "dynamic only" in reason("npu-w8a8", stacked_layer(bits=8, group=-1, symmetric=True, activation=static))
    writer = target_class("npu-int4")(WriterOptions(nz=True))
    entries = writer.layer_manifest(stacked_layer(group=64).spec)["tensors"]
    assert entries["weight"]["layout"] == "nd" and any("ND" in w for w in writer.warnings)


def test_float_and_modelslim_write_experts_one_by_one():
    layer = stacked_layer()
    for target in ("float", "modelslim"):
        writer = target_class(target)(WriterOptions(dtype=torch.float32))
        planned = [p.name for p in writer.plan_layer(layer.spec)]
        written = writer.write_layer(layer)
        assert list(written) == planned
        assert {name.rsplit(".", 1)[0] for name in planned} == {f"{MOE}.{e}.up_proj" for e in range(4)}
    written = target_class("float")(WriterOptions(dtype=torch.float32)).write_layer(layer)
    assert torch.equal(written[f"{MOE}.2.up_proj.weight"], dequantize(layer)[2])


def mxfp4_stacked_layer(n=64, k=128, experts=4) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(5)
    spec = LinearSpec(f"{MOE}.up_proj", n, k, 4, 32, True, weight_format=FP4_E2M1, scale_format=SCALE_E8M0,
                      scale_dtype=torch.uint8, num_experts=experts, source_scheme="test")
    codes = torch.randint(0, 16, (experts, n, k), generator=gen, dtype=torch.uint8)
    scale = torch.randint(118, 126, (experts, n, k // 32), generator=gen, dtype=torch.uint8)
    return QuantizedLinear(spec, codes, scale)


W4A4 = ActivationQuant(INT, 4, dynamic=True)
MOE_TARGETS = [  # every target whose manifest can hold a stacked expert layer with a kernel
    ("npu-int4", {}),
    ("npu-int4", {"symmetric": True, "group": -1}),
    ("npu-int8", {"bits": 8, "group": -1}),
    ("npu-w8a8", {"bits": 8, "group": -1, "symmetric": True, "activation": DYNAMIC}),
    ("npu-w4a8", {"symmetric": True, "group": -1, "activation": DYNAMIC}),
    ("npu-w4a4", {"symmetric": True, "group": -1, "activation": W4A4}),
    ("npu-mxfp4", None),
]


@pytest.mark.parametrize("target,kw", MOE_TARGETS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(MOE_TARGETS)])
def test_routed_experts_equal_dense_all_experts_then_pick(target, kw, monkeypatch):
    """``Target.run(..., group_list=...)`` (rows sorted by expert, tokens per expert) gives each row
    exactly what the dense every-token-through-every-expert call gives that token at its expert, with
    per-token activation scales kept per routed row; where the engines' MoE kernel is
    ``npu_grouped_matmul`` it is ONE call with the routed rows (``group_list_type=1``)."""
    layer = mxfp4_stacked_layer() if kw is None else stacked_layer(**kw)
    writer, entry, tensors = kernel_tensors(target, layer)
    assert writer.accepts(layer.spec) is None
    backend = get_backend("cpu")
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ids = torch.tensor([0, 3, 3, 1, 0, 3, 2, 3, 0, 3, 3, 0])  # top-2 of 6 tokens: 12 routed rows, all 4 experts
    tokens = torch.arange(12) % 6
    order = torch.argsort(ids, stable=True)
    rows, expert_of_row, token_of_row = x[tokens[order]], ids[order], tokens[order]
    group_list = torch.bincount(ids, minlength=4)
    calls = []
    real = backend.ops.npu_grouped_matmul
    monkeypatch.setattr(backend.ops, "npu_grouped_matmul",
                        lambda xs, w, **kw: calls.append((xs[0].shape[0], kw["group_list"].tolist(), kw["group_list_type"])) or real(xs, w, **kw))
    y, x_eff = run_kernel(backend, entry, layer.spec, tensors, rows, group_list=group_list)
    routed_calls = list(calls)
    y_all, x_all = run_kernel(backend, entry, layer.spec, tensors, x)
    assert y.shape == (12, 64) and x_eff.shape == (12, 128)
    want = y_all[expert_of_row, token_of_row]
    assert torch.equal(y, want), (y.double() - want.double()).abs().max()
    x_want = x_all[expert_of_row, token_of_row] if x_all.dim() == 3 else x_all[token_of_row]
    assert torch.equal(x_eff.double(), x_want.double())
    if target in ("npu-int4", "npu-int8", "npu-w8a8", "npu-w4a8"):  # the engines' grouped MoE kernels
        assert routed_calls == [(12, group_list.tolist(), 1)]
    else:  # a dense kernel per expert (the engines have no grouped form for it)
        assert routed_calls == []
