"""Engine-neutral core of the serving integrations: what one engine module needs, per TP rank.

A serving engine builds modules (a column-parallel ``qkv_proj`` fusing ``q_proj``/``k_proj``/``v_proj``,
a row-parallel ``o_proj``, a ``FusedMoE`` stacking gate/up/down experts) and asks a quantization method
to create their parameters, load the checkpoint into them and run them. For an npuconv output the
answers all come from ``npuconv.json`` and the layer's target:

* :func:`plan_linear` / :func:`plan_experts` — the tensors to create: for every role of the layer's
  manifest entry, dtype and **storage** shape of this rank's piece (fused shards concatenated along
  the storage axis that holds N), which storage axis holds N and how many output features one storage
  index carries (the engine's shard loader needs both to place ``q``/``k``/``v`` or ``gate``/``up``);
* :meth:`LinearPlan.split` — this rank's piece of one stored tensor (the target's TP split rule:
  column-parallel splits N, row-parallel splits K; refuses, with :class:`npuconv.errors.InputError`,
  whatever cannot be split exactly);
* :meth:`LinearPlan.kernel_tensors` — the loaded parameters as the kernel takes them: NZ restored where
  the manifest says ``nz`` (``npu_format_cast`` on an NPU), nothing else done;
* :meth:`LinearPlan.forward` / :func:`moe_forward` — the layer's kernel, called through its target
  (``Target.run``: the call ``verify`` and ``npuconv.runtime`` make); experts routed, one kernel call
  for ``w13`` and one for ``w2`` (``Target.run(..., group_list=...)``);
* :class:`ExpertsPlan` — the MoE experts: parameters registered under the *checkpoint's* names
  (:meth:`ExpertsPlan.register`: sub-modules ``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w3``/``w2``
  of the engine's experts module, one parameter per role), so the model's own ``load_weights`` loads
  them by name; fused into ``w13``/``w2`` kernel tensors after loading (:meth:`ExpertsPlan.kernel_tensors`).

Parameters keep the manifest's role names (``weight``, ``antiquant_scale``, ``perm``, …), so a
checkpoint tensor ``<module>.<role>`` loads into ``<fused module>.<role>`` through the engine's own
name mapping. Mixed-precision outputs: every layer is planned from its own entry and target.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from npuconv.errors import InputError
from npuconv.model import spec_from_dict

from npuconv.entries import from_storage, nd_shape_of_storage
from npuconv.io.publish import MANIFEST  # noqa: F401  (re-exported for the engine adapters)
from npuconv.parallel import COLUMN, ROW  # noqa: F401  (re-exported for the engine adapters)
from npuconv.registry import layer_target


#: ``(layer name, x, y, x_effective)`` after every kernel call; tests compare ``y`` with
#: ``x_effective @ dequant(source)ᵀ`` (``x_effective``: the activations the kernel actually used).
OBSERVERS: list[Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]] = []

#: entry keys every shard of a fused module must share (one kernel call runs them all)
_KERNEL_KEYS = ("target", "kernel", "kernel_mode", "scheme", "antiquant_group_size", "weight_dtype", "view", "bits")


def read_manifest(model_dir: str | Path) -> dict:
    """``npuconv.json`` of an npuconv output directory."""
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the npuconv manifest ({e})") from None
    if not isinstance(manifest.get("layers"), dict) or "target" not in manifest:
        raise InputError(f"{path}: missing 'target' or 'layers'")
    return manifest


@dataclass(frozen=True)
class Param:
    """One parameter to create: this rank's piece of a manifest role, in the stored dtype's ND form
    (NZ tiles undone on the host, packing kept; NZ is restored on the device after loading)."""

    role: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    n_axis: int | None  # axis holding output features (fused shards concatenate along it)
    n_unit: int  # output features per element along ``n_axis`` (the engine's "packed factor")
    shared: bool  # no N axis: one value for the whole module (fused shards must agree)


@dataclass
class LinearPlan:
    """One engine module (a linear, possibly fusing ``shards``) at TP rank ``rank`` of ``world``."""

    name: str
    shards: tuple[str, ...]
    entries: tuple[dict, ...]
    specs: tuple
    parallel: str
    rank: int
    world: int
    target: object
    params: dict[str, Param] = field(default_factory=dict)
    entry: dict = field(default_factory=dict)  # this rank's (fused) entry, as the kernel takes it
    spec: object = None  # this rank's (fused) spec

    def split(self, role: str, tensor: torch.Tensor, shard: int = 0) -> torch.Tensor:
        """This rank's piece of checkpoint tensor ``<shards[shard]>.<role>`` (as stored): NZ tiles undone,
        then the target's split rule (``Target.split``; raises InputError where it is not exact)."""
        stored = self.entries[shard]["tensors"][role]
        if list(tensor.shape) != list(stored["storage_shape"]):
            raise InputError(f"{stored['name']}: shape {list(tensor.shape)}, manifest says {stored['storage_shape']}")
        nd = from_storage(tensor, stored)
        return self.target.split(role, nd, stored, self.specs[shard], self.rank, self.world, self.parallel)

    def check_shared(self, role: str, held: torch.Tensor, piece: torch.Tensor, shard: int) -> None:
        """A fused module holds one copy of a role without an N axis (``perm``, per-tensor input
        scales): every shard must carry the same value, else the fused kernel call would be wrong."""
        if not torch.equal(held, piece):
            raise InputError(
                f"{self.name}: {self.shards[shard]}.{role} differs from {self.shards[0]}.{role}; "
                f"the engine fuses them into one kernel call"
            )

    def weight_loader(self, role: str, engine_loader: Callable[..., None]):
        """The ``weight_loader(param, stored, shard_id=None)`` of parameter ``role``: the stored tensor of
        shard ``shard_id`` (None: the only one; ``"q"``/``"k"``/``"v"`` or an int: that shard of a fused
        module) is cut by :meth:`split`; a role without an N axis is kept once (every fused shard must
        carry the same value: :meth:`check_shared`); any other piece goes to the engine's own loader,
        called as the engine calls it: ``engine_loader(param, piece)``, or ``engine_loader(param, piece,
        shard_id)`` for a part of a fused module (it places ``q``/``k``/``v`` or ``gate``/``up``)."""
        held: list[int] = []

        def load(param: torch.nn.Parameter, stored: torch.Tensor, shard_id=None) -> None:
            shard = shard_index(shard_id)
            piece = self.split(role, stored, shard)
            if self.params[role].shared:
                if held:
                    self.check_shared(role, param.data, piece.to(param.dtype), shard)
                else:
                    param.data.copy_(piece)
                held.append(shard)
                return
            if shard_id is None:
                engine_loader(param, piece)
            else:
                engine_loader(param, piece, shard_id)

        return load

    def kernel_tensors(self, loaded: dict[str, torch.Tensor], backend) -> dict[str, torch.Tensor]:
        """Loaded parameters (by role) as the kernel takes them: NZ restored (``npu_format_cast`` on an
        NPU) where the manifest says ``nz``, nothing else."""
        from npuconv.runtime import to_backend

        return {role: to_backend(tensor, self.entry["tensors"][role], backend) for role, tensor in loaded.items()}

    def forward(self, backend, tensors: dict, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The layer's kernel on this rank's tensors (``Target.run``); ``x`` ``[..., K_rank]``."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        y, x_effective = self.target.run(backend, self.entry, self.spec, tensors, rows, tp=1)
        for observe in OBSERVERS:
            observe(self.name, rows, y, x_effective)
        return y.reshape(*lead, y.shape[-1])


#: the shard ids engines give the parts of a fused ``qkv_proj``
QKV_SHARD_IDS = ("q", "k", "v")


def shard_index(shard_id) -> int:
    """Index of a fused module's part from the engine's shard id: None → 0, ``"q"``/``"k"``/``"v"`` →
    0/1/2, an int (``gate_up_proj``: 0, 1) → itself."""
    if shard_id is None:
        return 0
    return QKV_SHARD_IDS.index(shard_id) if shard_id in QKV_SHARD_IDS else int(shard_id)


def plan_linear(manifest: dict, name: str, shards: list[str] | None, parallel: str, rank: int = 0, world: int = 1) -> LinearPlan:
    """The plan of engine module ``name`` fusing manifest layers ``shards`` (default: ``[name]``).

    Raises :class:`InputError` when a shard is missing from the manifest, when fused shards need
    different kernels, or when a tensor cannot be split exactly at ``world``.
    """
    shards = list(shards or [name])
    layers = manifest["layers"]
    missing = [s for s in shards if s not in layers]
    if missing:
        raise InputError(f"{name}: no layer {missing[0]!r} in {MANIFEST}")
    entries = tuple(layers[s] for s in shards)
    first = entries[0]
    for shard, entry in zip(shards[1:], entries[1:]):
        differs = [k for k in _KERNEL_KEYS if entry.get(k) != first.get(k)] or (
            [] if set(entry["tensors"]) == set(first["tensors"]) else ["tensor roles"]
        )
        if differs:
            raise InputError(f"{name}: {shards[0]} and {shard} differ in {differs[0]}; the engine fuses them into one kernel call")
    target = layer_target(manifest, first)
    specs = tuple(spec_from_dict(e["spec"], tuple(t["name"] for t in e["tensors"].values())) for e in entries)
    plan = LinearPlan(name, tuple(shards), entries, specs, parallel, rank, world, target)
    _fill(plan, manifest)
    return plan


def _fill(plan: LinearPlan, manifest: dict) -> None:
    """Per-rank params, entry and spec of ``plan`` (pieces found by splitting meta tensors)."""
    first = plan.entries[0]
    tensors = {}
    specs = [plan.target.split_spec(spec, plan.world, plan.parallel) for spec in plan.specs]
    for role, stored in first["tensors"].items():
        dtype = _dtype(stored["dtype"])
        n_axis = (stored.get("split") or {}).get("n")
        pieces = [_meta_split(plan, role, dtype, shard) for shard in range(len(plan.shards))]
        piece = torch.cat(pieces, dim=n_axis) if n_axis is not None and len(pieces) > 1 else pieces[0]
        n_unit = plan.target.split_unit(role, stored, plan.specs[0], n_axis, COLUMN) if n_axis is not None else 1
        plan.params[role] = Param(role, dtype, tuple(piece.shape), n_axis, n_unit, n_axis is None)
        local = copy.deepcopy(stored)
        nd = nd_shape_of_storage(stored) if stored.get("layout") == "nz" else stored["storage_shape"]
        local.update(name=f"{plan.name}.{role}", storage_shape=list(piece.shape),
                     shape=[p * (int(full) // int(n)) for p, full, n in zip(piece.shape, stored["shape"], nd)])
        tensors[role] = local
    plan.spec = replace(specs[0], name=plan.name, out_features=sum(s.out_features for s in specs))
    plan.entry = {**{k: v for k, v in first.items() if k != "tensors"}, "tensors": tensors, "spec": None}


def _meta_split(plan: LinearPlan, role: str, dtype: torch.dtype, shard: int) -> torch.Tensor:
    """The shape of this rank's piece, from a meta tensor of the stored ND shape."""
    stored = plan.entries[shard]["tensors"][role]
    shape = nd_shape_of_storage(stored) if stored.get("layout") == "nz" else stored["storage_shape"]
    meta = torch.empty(shape, dtype=dtype, device="meta")
    if role == "perm" and plan.parallel == ROW and plan.world > 1:  # its values are checked at load
        size = meta.shape[-1]
        if size % plan.world:
            raise InputError(f"{plan.shards[shard]}.perm: {size} input features do not split into {plan.world} ranks")
        return meta.narrow(-1, 0, size // plan.world)
    return plan.target.split(role, meta, stored, plan.specs[shard], plan.rank, plan.world, plan.parallel)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"{MANIFEST}: unknown tensor dtype {name!r}")
    return value


# ---------------------------------------------------------------------------- MoE experts
#: (gate, up, down) leaf names of stacked expert layers, as the models name them
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class ExpertLeaf(torch.nn.Module):
    """The sub-module of an experts layer holding one checkpoint projection's parameters (by role)."""


@dataclass
class ExpertsPlan:
    """A stacked-experts module (an engine's ``FusedMoE`` at ``prefix``) at TP rank ``rank`` of ``world``.

    **Parameters under the checkpoint's names.** npuconv stores each projection of the experts stacked
    (``<prefix>.<leaf>.<role>``, ``[E, …]``, one tensor per manifest role). :meth:`register` gives the
    engine module one sub-module per leaf (``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w3``/``w2``)
    holding one parameter per role: this rank's split piece (:attr:`params`), in the stored dtype, ND.
    So a model's own ``load_weights`` finds ``<prefix>.<leaf>.<role>`` in its ``named_parameters()`` and
    calls the parameter's ``weight_loader(param, loaded_weight)``, which applies the target's TP split
    (:meth:`load`: gate/up column-parallel split N, down row-parallel splits K; refused with
    :class:`InputError` where not exact). Checked against the loaders of vLLM 0.23 (``qwen2_moe``,
    ``mixtral``) and SGLang 0.5.23 (``qwen2_moe``, ``mixtral``): the stacked names skip the
    ``stacked_params_mapping`` loop (``"mlp.experts" in name`` / no ``gate_up`` entry), match no
    ``experts.<e>.<leaf>.`` of the expert mapping and reach ``params_dict[name]``.
    (vLLM's ``deepseek_v2`` renames ``gate_proj`` → ``gate_up_proj`` for names it finds in
    ``params_dict``: not covered.)

    **After loading** (:meth:`kernel_tensors`): gate and up are fused into the ``w13`` kernel tensors
    along each role's N storage axis (a role without an N axis must be equal in both: :meth:`LinearPlan.check_shared`),
    NZ restored where the manifest says ``nz``; ``w2`` likewise. :func:`moe_forward` runs them routed.
    """

    prefix: str
    leaves: tuple[str, str, str]  # checkpoint leaf names (gate, up, down)
    w13: LinearPlan  # gate (shard 0) and up (shard 1), column-parallel
    w2: LinearPlan  # down, row-parallel
    #: {leaf: {role: Param}}: this rank's piece of each checkpoint tensor (the parameter to register)
    params: dict[str, dict[str, Param]] = field(default_factory=dict)

    def expect(self, num_experts: int, intermediate_per_rank: int) -> None:
        """Refuse (:class:`InputError`) an engine module that does not match the manifest: its expert
        count and its intermediate size per TP rank."""
        if self.w13.spec.num_experts != num_experts or self.w2.spec.in_features != intermediate_per_rank:
            raise InputError(
                f"{self.prefix}: the model builds {num_experts} experts of {intermediate_per_rank} per rank, "
                f"npuconv.json holds {self.w13.spec.num_experts} of {self.w2.spec.in_features}"
            )

    def _plan_of(self, leaf: str) -> tuple[LinearPlan, int]:
        if leaf not in self.leaves:
            raise InputError(f"{self.prefix}: no expert projection {leaf!r} (expected {', '.join(self.leaves)})")
        index = self.leaves.index(leaf)
        return (self.w13, index) if index < 2 else (self.w2, 0)

    def load(self, leaf: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's piece of checkpoint tensor ``<prefix>.<leaf>.<role>`` (stacked ``[E, …]``, as stored):
        NZ tiles undone, then the target's TP split (:meth:`LinearPlan.split`)."""
        plan, shard = self._plan_of(leaf)
        return plan.split(role, tensor, shard)

    def register(self, module: torch.nn.Module) -> None:
        """Give ``module`` (the engine's experts layer) one sub-module per leaf with one parameter per role
        (:attr:`params`), each with ``weight_loader(param, loaded_weight)`` = copy :meth:`load`'s piece.
        Registering again replaces them (vLLM-Ascend's ``AscendFusedMoE`` creates the weights twice)."""
        for leaf, roles in self.params.items():
            if hasattr(module, leaf) and not isinstance(getattr(module, leaf), ExpertLeaf):
                raise InputError(f"{self.prefix}: the engine's experts module already has an attribute {leaf!r}")
            holder = ExpertLeaf()
            for role, spec in roles.items():
                param = torch.nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
                param.weight_loader = self._loader(leaf, role)
                holder.register_parameter(role, param)
            module.add_module(leaf, holder)

    def _loader(self, leaf: str, role: str):
        def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor) -> None:
            param.data.copy_(self.load(leaf, role, loaded_weight))

        return weight_loader

    def loaded(self, module: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The registered parameters' data, ``{leaf: {role: tensor}}``."""
        return {leaf: {role: getattr(getattr(module, leaf), role).data for role in roles} for leaf, roles in self.params.items()}

    def kernel_tensors(self, loaded: dict[str, dict[str, torch.Tensor]], backend) -> tuple[dict, dict]:
        """``(w13 tensors, w2 tensors)`` by role as the kernel takes them, from the loaded pieces
        ``{leaf: {role: tensor}}`` (:meth:`loaded`): gate ‖ up concatenated along each role's N storage
        axis (roles without one must be equal: :meth:`LinearPlan.check_shared`), then NZ restored."""
        gate, up, down = (loaded[leaf] for leaf in self.leaves)
        fused = {}
        for role, param in self.w13.params.items():
            if param.n_axis is None:
                self.w13.check_shared(role, gate[role], up[role], 1)
                fused[role] = gate[role]
            else:
                fused[role] = torch.cat([gate[role], up[role]], dim=param.n_axis)
        return self.w13.kernel_tensors(fused, backend), self.w2.kernel_tensors(dict(down), backend)

    def forward(self, backend, t13: dict, t2: dict, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """:func:`moe_forward` on this plan."""
        return moe_forward(self, backend, t13, t2, x, topk_weights, topk_ids)


def plan_experts(manifest: dict, prefix: str, rank: int = 0, world: int = 1) -> ExpertsPlan:
    """The plan of the MoE experts module ``prefix`` (e.g. ``model.layers.0.mlp.experts``): its manifest
    layers ``<prefix>.gate_proj|up_proj|down_proj`` (or ``w1|w3|w2``), split for rank ``rank`` of ``world``."""
    layers = manifest["layers"]
    for leaves in EXPERT_NAMES:
        names = [f"{prefix}.{leaf}" for leaf in leaves]
        if all(n in layers for n in names):
            w13 = plan_linear(manifest, f"{prefix}.w13", names[:2], COLUMN, rank, world)
            w2 = plan_linear(manifest, f"{prefix}.w2", names[2:], ROW, rank, world)
            if w13.spec.num_experts is None or w2.spec.num_experts != w13.spec.num_experts:
                raise InputError(f"{prefix}: {', '.join(names)} are not expert stacks of one size in {MANIFEST}")
            plan = ExpertsPlan(prefix, leaves, w13, w2)
            for leaf, (sub, shard) in zip(leaves, ((w13, 0), (w13, 1), (w2, 0))):
                plan.params[leaf] = {role: replace(param, shape=tuple(_meta_split(sub, role, param.dtype, shard).shape))
                                     for role, param in sub.params.items()}
            return plan
    raise InputError(f"{prefix}: no stacked expert layers (gate/up/down or w1/w3/w2) in {MANIFEST}")


def moe_forward(
    plan: ExpertsPlan, backend, t13: dict, t2: dict, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Routed experts on this rank: ``x`` ``[T, H]``, ``topk_ids``/``topk_weights`` ``[T, k]`` → ``[T, H]``
    (this rank's partial sum; the engine all-reduces). The ``T·k`` (token, expert) rows are sorted by
    expert (stable), ``group_list`` = rows per expert; then ONE routed kernel call for ``w13``
    (``Target.run(..., group_list=...)``: one ``npu_grouped_matmul`` with ``group_list_type=1`` where
    the target's engine kernel is grouped), SiLU(gate)·up in float32, ONE routed call for ``w2``, and
    each row weighted by its router weight and summed into its token (float32). ``topk_ids`` outside
    ``[0, E)`` (experts on other ranks) contribute nothing."""
    tokens, top_k = topk_ids.shape
    experts = plan.w13.spec.num_experts
    flat = topk_ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < experts)
    order = torch.argsort(torch.where(keep, flat, experts), stable=True)[: int(keep.sum())]
    source_rows = order // top_k
    group_list = torch.bincount(flat[keep], minlength=experts)
    out = torch.zeros(tokens, plan.w2.spec.out_features, dtype=torch.float32, device=x.device)
    if not order.numel():
        return out.to(x.dtype)
    h = _routed(plan.w13, backend, t13, x[source_rows], group_list)
    inter = h.shape[-1] // 2
    a = torch.nn.functional.silu(h[:, :inter].float()) * h[:, inter:].float()
    y = _routed(plan.w2, backend, t2, a.to(x.dtype), group_list)
    weights = topk_weights.reshape(-1)[order].float().unsqueeze(-1)
    out.index_add_(0, source_rows, y.float() * weights)
    return out.to(x.dtype)


def _routed(plan: LinearPlan, backend, tensors: dict, rows: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """One routed kernel call of a stacked layer (``rows`` sorted by expert, ``group_list`` tokens per expert)."""
    y, x_effective = plan.target.run(backend, plan.entry, plan.spec, tensors, rows, tp=1, group_list=group_list)
    for observe in OBSERVERS:
        observe(plan.name, rows, y, x_effective)
    return y


def npu_backend(device: torch.device | str):
    """The kernel backend an engine on an Ascend device uses: the real ``torch_npu`` ops (whatever
    ``torch_npu`` is importable — the real one, or a test's emulation behind the same name)."""
    from npuconv.kernels import Backend, npu

    return Backend("npu", str(device), npu)
