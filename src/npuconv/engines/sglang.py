"""SGLang integration: quantization method ``npuconv`` that serves an npuconv output as written.

Start a server the way SGLang users do; nothing else is needed once npuconv is installed in the
server's environment (the ``sglang.srt.plugins`` entry point ``npuconv`` runs :func:`register` in
every SGLang process)::

    python -m sglang.launch_server --model-path OUT          # config.json says quant_method "npuconv"

Without the entry point (npuconv only on ``PYTHONPATH``), :func:`register` must run in every SGLang
process before the model config is checked; the entry point is the supported way.

What :func:`register` does (SGLang 0.5.23 has no register function): adds :class:`NpuconvConfig` to
``sglang.srt.layers.quantization.QUANTIZATION_METHODS`` (the dict ``ModelConfig`` checks a
checkpoint's ``quant_method`` against) and ``npuconv`` to the CLI's ``--quantization`` choices
(``add_quantization_method_choices``).

Per layer the method reads ``npuconv.json`` (beside config.json) and:

- creates exactly the manifest's tensors (role = parameter name, stored dtype, ND storage shape of
  this rank's share; NZ tiles are undone when loading and restored with ``npu_format_cast`` after
  loading, on an NPU only: :func:`npuconv.runtime.to_backend`);
- loads each tensor with the rank's share cut by the layer's own target (:meth:`Target.split`, the
  one TP rule, exact or refused with a one-line reason); fused layers (``qkv_proj``,
  ``gate_up_proj``) place each part through SGLang's own shard logic (the layer's
  ``weight_loader`` with ``output_dim`` / ``packed_dim`` / ``pack_factor`` set from the manifest's
  ``split``, in its pre-sharded mode);
- runs forward through :meth:`Target.run` (the one kernel call) on the kernels of the weights'
  device (:func:`npuconv.kernels.get_backend`: torch_npu on an NPU).

MoE: the manifest stores each expert projection stacked (``<experts>.gate_proj.weight`` ``[E, …]``);
the method registers them under the same names (sub-modules ``gate_proj`` / ``up_proj`` /
``down_proj`` of the ``FusedMoE`` layer, or ``w1`` / ``w3`` / ``w2``), so SGLang's model loader finds
them by name, and runs every expert on the routed tokens through :meth:`Target.run`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.nn import Parameter

from sglang.srt.distributed.utils import get_group_rank_size
from sglang.srt.layers.linear import LinearBase, ReplicatedLinear, RowParallelLinear
from sglang.srt.layers.quantization.base_config import (
    FusedMoEMethodBase,
    LinearMethodBase,
    QuantizationConfig,
)
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

from npuconv.errors import InputError
from npuconv.model import LinearSpec, spec_from_dict
from npuconv.io.output import MANIFEST
from npuconv.registry import layer_target
from npuconv.parallel import COLUMN, ROW
from npuconv.writers.base import Target
from npuconv.entries import from_storage, nd_shape_of_storage

METHOD = "npuconv"
#: fused SGLang module → the checkpoint modules it stacks, in shard order (used when the model
#: passes no ``packed_modules_mapping``)
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
#: stacked expert projections of a FusedMoE layer: (gate, up, down) names in npuconv outputs
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def register() -> None:
    """Make ``npuconv`` a quantization method of SGLang (idempotent): the ``sglang.srt.plugins`` entry point."""
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES, add_quantization_method_choices
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    QUANTIZATION_METHODS[METHOD] = NpuconvConfig
    if METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([METHOD])


# ---------------------------------------------------------------------------- the config
class NpuconvConfig(QuantizationConfig):
    """``quantization_config = {"quant_method": "npuconv", "manifest": "npuconv.json", …}`` of an npuconv
    output; the manifest is read from the model directory (``hf_config.name_or_path``)."""

    def __init__(self, manifest: dict, packed_modules_mapping: dict[str, list[str]] | None = None):
        super().__init__()
        self.manifest = manifest
        self.layers: dict[str, dict] = manifest.get("layers", {})
        self.packed = dict(DEFAULT_PACKED)
        self.packed.update(packed_modules_mapping or {})

    @classmethod
    def get_name(cls) -> str:
        return METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the kernels are Ascend ones (or their emulation); no CUDA capability applies

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NpuconvConfig:
        hf_config = config.get("hf_config")
        root = getattr(hf_config, "name_or_path", None) or config.get("model_path")
        if not root:
            raise InputError("npuconv: cannot locate the model directory to read npuconv.json")
        path = Path(root) / config.get("manifest", MANIFEST)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"npuconv: cannot read {path} ({e})") from None
        return cls(manifest, config.get("packed_modules_mapping"))

    def get_scaled_act_names(self) -> list[str]:
        return []

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        if isinstance(layer, FusedMoE):
            parts = self.expert_parts(prefix)
            return NpuconvMoEMethod(self, parts) if parts else None
        if isinstance(layer, LinearBase):
            parts = self.linear_parts(prefix)
            return NpuconvLinearMethod(self, parts) if parts else UnquantizedLinearMethod()
        return None

    # ------------------------------------------------------------------ manifest lookup
    def resolve(self, name: str) -> str | None:
        """The manifest layer of an SGLang module name: the same name, or the one name ending in
        ``"." + name`` (some SGLang models build their layers without the checkpoint's ``model.``)."""
        if name in self.layers:
            return name
        found = [layer for layer in self.layers if layer.endswith("." + name)]
        return found[0] if len(found) == 1 else None

    def part(self, name: str) -> tuple[str, dict, LinearSpec]:
        entry = self.layers[name]
        return name, entry, spec_from_dict(entry["spec"])

    def linear_parts(self, prefix: str) -> list[tuple[str, dict, LinearSpec]]:
        """The manifest layers behind an SGLang linear module, in shard order ([] if not converted)."""
        if self.resolve(prefix):
            return [self.part(self.resolve(prefix))]
        head, _, leaf = prefix.rpartition(".")
        names = [self.resolve(f"{head}.{sub}" if head else sub) or f"{head}.{sub}" for sub in self.packed.get(leaf, [])]
        present = [n for n in names if n in self.layers]
        if not present:
            return []
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise InputError(f"npuconv: {prefix} fuses {', '.join(names)} but {', '.join(missing)} is not converted")
        return [self.part(n) for n in names]

    def expert_parts(self, prefix: str) -> list[tuple[str, dict, LinearSpec]]:
        """(gate, up, down) stacked expert layers of a FusedMoE module ([] if not converted)."""
        for names in EXPERT_NAMES:
            full = [self.resolve(f"{prefix}.{n}") for n in names]
            if all(full):
                return [self.part(n) for n in full]
        return []

    def target_of(self, entry: dict) -> Target:
        return layer_target(self.manifest, entry)


# ---------------------------------------------------------------------------- shared helpers
def _nd_storage_shape(entry: dict) -> list[int]:
    """The ND shape of the stored dtype (NZ tiles undone, packing kept)."""
    return nd_shape_of_storage(entry) if entry.get("layout") == "nz" else list(entry["storage_shape"])


def _share_shape(target: Target, role: str, entry: dict, spec: LinearSpec, rank: int, world: int, parallel: str):
    """Shape of one rank's share of a tensor: the target's split rule applied to a meta tensor (the
    base rule: overrides for single roles change values, not shapes)."""
    meta = torch.empty(_nd_storage_shape(entry), device="meta")
    return tuple(Target.split(target, role, meta, entry, spec, rank, world, parallel).shape)


def _backend_for(tensor: torch.Tensor):
    from npuconv.kernels import get_backend

    return get_backend(str(tensor.device))


def _check_stored(name: str, tensor: torch.Tensor, entry: dict) -> torch.Tensor:
    if list(tensor.shape) != list(entry["storage_shape"]):
        raise InputError(f"{name}.{entry['name']}: shape {list(tensor.shape)}, npuconv.json says {entry['storage_shape']}")
    return from_storage(tensor, entry)


@contextlib.contextmanager
def _presharded(layer: torch.nn.Module):
    """SGLang's loaders in their pre-sharded mode: they place the given share, cutting nothing."""
    before = getattr(layer, "use_presharded_weights", False)
    layer.use_presharded_weights = True
    try:
        yield
    finally:
        layer.use_presharded_weights = before


def _same_everywhere(param: Parameter, share: torch.Tensor, index: int, where: str) -> None:
    """A tensor with no output axis in a fused layer (``perm``, per-tensor input scales) must be equal
    in every part: the first part's copy is kept, a differing one is refused."""
    seen = param.__dict__.setdefault("_npuconv_parts", set())
    if seen and not torch.equal(param.data, share.to(param.dtype)):
        raise InputError(f"{where} differs between the fused parts; they cannot share one kernel call")
    if not seen:
        param.data.copy_(share)
    seen.add(index)


# ---------------------------------------------------------------------------- linear
class NpuconvLinearMethod(LinearMethodBase):
    """One SGLang linear module (possibly fused) served by the target of its manifest layers."""

    def __init__(self, config: NpuconvConfig, parts: list[tuple[str, dict, LinearSpec]]):
        self.config = config
        self.parts = parts
        first = parts[0][1]
        self.target = config.target_of(first)
        for name, entry, _ in parts[1:]:
            if config.target_of(entry).name != self.target.name or set(entry["tensors"]) != set(first["tensors"]):
                raise InputError(f"npuconv: {name} and {parts[0][0]} differ in target or tensors; SGLang fuses them")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        replicated = isinstance(layer, ReplicatedLinear) or not hasattr(layer, "tp_group")
        rank, world = (0, 1) if replicated else get_group_rank_size(layer.tp_group)
        parallel = ROW if isinstance(layer, RowParallelLinear) else COLUMN
        self.rank, self.world, self.parallel = rank, world, parallel
        self.sglang_loader = extra_weight_attrs.get("weight_loader")
        first = self.parts[0][1]
        self.roles = [role for role in first["tensors"] if role != "bias"]  # SGLang owns the bias parameter
        for role in self.roles:
            layer.register_parameter(role, self._parameter(layer, role))
        specs = [self.target.split_spec(spec, world, parallel) for _, _, spec in self.parts]
        self.spec = replace(specs[0], name=self.parts[0][0] if len(self.parts) == 1 else getattr(layer, "prefix", specs[0].name),
                            out_features=sum(s.out_features for s in specs))

    def _parameter(self, layer, role: str) -> Parameter:
        shares = [_share_shape(self.target, role, entry["tensors"][role], spec, self.rank, self.world, self.parallel)
                  for _, entry, spec in self.parts]
        entry = self.parts[0][1]["tensors"][role]
        split = entry.get("split") or {}
        n_axis, k_axis = split.get("n"), split.get("k")
        shape = list(shares[0])
        if len(self.parts) > 1 and n_axis is not None:
            shape[n_axis] = sum(s[n_axis] for s in shares)
        elif any(s != shares[0] for s in shares):
            raise InputError(f"npuconv: {role} of {self.parts[0][0]} has different shapes across fused parts")
        param = Parameter(torch.empty(shape, dtype=getattr(torch, entry["dtype"])), requires_grad=False)
        attrs: dict[str, Any] = {"output_dim": n_axis, "input_dim": k_axis, "ignore_warning": True}
        if n_axis is not None:
            unit = int(entry["shape"][n_axis]) // int(_nd_storage_shape(entry)[n_axis])
            if unit > 1:
                attrs.update(packed_dim=n_axis, pack_factor=unit)
        for key, value in attrs.items():
            if value is not None:
                setattr(param, key, value)
        param.weight_loader = lambda p, w, shard_id=None, _role=role, _layer=layer: self.load(_layer, _role, p, w, shard_id)
        return param

    def load(self, layer, role: str, param: Parameter, stored: torch.Tensor, shard_id=None) -> None:
        """Load one stored tensor (one part of a fused layer when ``shard_id`` is given)."""
        index = 0 if shard_id is None else QKV_SHARDS.get(shard_id, shard_id)
        name, entry, spec = self.parts[index]
        tensor_entry = entry["tensors"][role]
        nd = _check_stored(name, stored, tensor_entry)
        share = self.target.split(role, nd, tensor_entry, spec, self.rank, self.world, self.parallel)
        if len(self.parts) > 1 and (tensor_entry.get("split") or {}).get("n") is None:
            _same_everywhere(param, share, index, f"{name}.{role}")
            return
        with _presharded(layer):
            if shard_id is None:
                self.sglang_loader(param, share)
            else:
                self.sglang_loader(param, share, shard_id)

    def process_weights_after_loading(self, layer) -> None:
        """Only NZ: restored where the manifest says ``nz`` (a no-op off the NPU)."""
        from npuconv.runtime import to_backend

        for role in self.roles:
            param = getattr(layer, role)
            backend = _backend_for(param.data)
            param.data = to_backend(param.data, self.parts[0][1]["tensors"][role], backend)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = {role: getattr(layer, role).data for role in self.roles}
        if bias is not None:
            tensors["bias"] = bias
        backend = _backend_for(x)
        # tp=1: the tensors already are this rank's share (Target.split); the engine does the all-reduce
        y, _ = self.target.run(backend, self.parts[0][1], self.spec, tensors, x, tp=1)
        return y


# ---------------------------------------------------------------------------- MoE
class NpuconvMoEMethod(FusedMoEMethodBase):
    """A FusedMoE layer whose experts are stacked npuconv layers (gate, up: column-parallel; down:
    row-parallel), each expert run through :meth:`Target.run` (activation: SiLU-and-mul)."""

    def __init__(self, config: NpuconvConfig, parts: list[tuple[str, dict, LinearSpec]]):
        self.config = config
        self.parts = parts
        self.targets = [config.target_of(entry) for _, entry, _ in parts]

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        rank, world = layer.moe_tp_rank, layer.moe_tp_size
        self.rank, self.world = rank, world
        self.modules = []
        for (name, entry, spec), target, parallel in zip(self.parts, self.targets, (COLUMN, COLUMN, ROW)):
            if spec.num_experts != num_experts:
                raise InputError(f"npuconv: {name} stacks {spec.num_experts} experts, the model has {num_experts}")
            module = torch.nn.Module()
            for role, tensor_entry in entry["tensors"].items():
                shape = _share_shape(target, role, tensor_entry, spec, rank, world, parallel)
                param = Parameter(torch.empty(shape, dtype=getattr(torch, tensor_entry["dtype"])), requires_grad=False)
                param.weight_loader = (lambda p, w, *_, _n=name, _e=entry, _s=spec, _t=target, _r=role, _p=parallel:
                                       p.data.copy_(_t.split(_r, _check_stored(_n, w, _e["tensors"][_r]), _e["tensors"][_r],
                                                              _s, rank, world, _p)))
                module.register_parameter(role, param)
            layer.add_module(name.rpartition(".")[2], module)
            self.modules.append((module, entry, target.split_spec(spec, world, parallel), target))

    def create_moe_runner(self, layer, moe_runner_config) -> None:
        self.runner = None
        self.activation = getattr(moe_runner_config, "activation", "silu")
        if self.activation != "silu":
            raise InputError(f"npuconv: MoE activation {self.activation!r} is not supported (silu only)")

    def get_moe_runner_backend(self, layer):
        return None

    def process_weights_after_loading(self, layer) -> None:
        from npuconv.runtime import to_backend

        for module, entry, _, _ in self.modules:
            for role, param in module.named_parameters():
                param.data = to_backend(param.data, entry["tensors"][role], _backend_for(param.data))

    def _run(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Every token of ``x`` ``[M, K]`` through every expert: ``[E, M, N]``."""
        module, entry, spec, target = self.modules[index]
        tensors = {role: p.data for role, p in module.named_parameters()}
        return target.run(_backend_for(x), entry, spec, tensors, x)[0]

    def apply(self, layer, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        x = dispatch_output.hidden_states
        topk = dispatch_output.topk_output
        weights, ids = topk.topk_weights, topk.topk_ids.long()
        m = x.shape[0]
        gate, up = self._run(0, x), self._run(1, x)  # [E, M, I/tp]
        hidden = torch.nn.functional.silu(gate.float()) * up.float()
        experts = hidden.shape[0]
        down = self._run(2, hidden.to(x.dtype).reshape(experts * m, -1))  # [E, E·M, H]: expert e on rows of e
        down = torch.stack([down[e, e * m:(e + 1) * m] for e in range(experts)])  # [E, M, H]
        rows = torch.arange(m, device=x.device).unsqueeze(1).expand_as(ids)
        picked = down[ids.clamp(min=0), rows].float()  # [M, top_k, H]
        valid = (ids >= 0).unsqueeze(-1)
        y = (picked * weights.float().unsqueeze(-1) * valid).sum(1)
        return StandardCombineInput(hidden_states=y.to(x.dtype))
