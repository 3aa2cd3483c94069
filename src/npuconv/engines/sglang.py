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

Everything per layer comes from the engine-neutral core :mod:`npuconv.engines.layers` (the same
one the vLLM plugin uses); this module only adapts it to SGLang's classes:

- linears (:class:`NpuconvLinearMethod`): :func:`~npuconv.engines.layers.plan_linear` gives the
  parameters (role = parameter name, stored dtype, ND storage shape of this rank's piece; NZ
  restored after loading, on an NPU only); each stored tensor is cut by the layer's target
  (:meth:`LinearPlan.split`, the one TP rule, exact or refused with a one-line reason) and fused
  layers (``qkv_proj``, ``gate_up_proj``) place each part through SGLang's own shard loader (its
  pre-sharded mode, with ``output_dim`` / ``packed_dim`` / ``pack_factor`` from the plan); forward
  is :meth:`LinearPlan.forward` (``Target.run``, the one kernel call);
- MoE (:class:`NpuconvMoEMethod`): :class:`~npuconv.engines.layers.ExpertsPlan` registers the
  stacked experts under the checkpoint's names (``<experts>.gate_proj.<role>`` ``[E, …]`` …, or
  ``w1``/``w3``/``w2``), so the model's own ``load_weights`` finds them by name; gate/up are fused
  after loading and the routed experts run as one grouped kernel call per projection, with
  SGLang's top-k (``dispatch_output.topk_output``).

Kernels run on the weights' device (:func:`npuconv.kernels.get_backend`: torch_npu on an NPU, the
emulation elsewhere).
"""

from __future__ import annotations

import contextlib
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

from npuconv.engines import layers as core
from npuconv.errors import InputError

METHOD = "npuconv"
#: fused SGLang module → the checkpoint modules it stacks, in shard order (used when the model
#: passes no ``packed_modules_mapping``)
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def register() -> None:
    """Make ``npuconv`` a quantization method of SGLang (idempotent): the ``sglang.srt.plugins`` entry point."""
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES, add_quantization_method_choices
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    QUANTIZATION_METHODS[METHOD] = NpuconvConfig
    if METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([METHOD])
    _keep_fused_mixtral()


#: where SGLang 0.5.23 imported ``get_model_architecture`` by name (each binding is replaced)
_ARCH_MODULES = ("sglang.srt.model_loader.utils", "sglang.srt.model_loader.loader", "sglang.srt.model_loader")


def _keep_fused_mixtral() -> None:
    """SGLang 0.5.23's ``get_model_architecture`` builds a quantized ``MixtralForCausalLM`` as
    ``QuantMixtralForCausalLM`` (one ``ReplicatedLinear`` MLP per expert, ``experts.<e>.w1``) unless
    the quantization method is in a hard-coded list (fp8, compressed-tensors, …); it has no hook to
    extend it. npuconv stores experts stacked for ``FusedMoE``, so for ``quant_method: npuconv``
    only, the architecture stays ``MixtralForCausalLM`` (its ``FusedMoE`` layers load the stacked
    experts by name). Every other method resolves as SGLang decides. If a later SGLang moves this,
    :meth:`NpuconvConfig.get_quant_method` refuses the per-expert modules: never served wrong."""
    import importlib

    utils = importlib.import_module(_ARCH_MODULES[0])
    original = getattr(utils.get_model_architecture, "__wrapped__", utils.get_model_architecture)

    def get_model_architecture(model_config):
        archs = getattr(model_config.hf_config, "architectures", None) or []
        if model_config.quantization == METHOD and "MixtralForCausalLM" in archs:
            from sglang.srt.models.registry import ModelRegistry

            return ModelRegistry.resolve_model_cls(["MixtralForCausalLM"])
        return original(model_config)

    get_model_architecture.__wrapped__ = original
    for name in _ARCH_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "get_model_architecture"):
            module.get_model_architecture = get_model_architecture


# ---------------------------------------------------------------------------- the config
class NpuconvConfig(QuantizationConfig):
    """``quantization_config = {"quant_method": "npuconv", …}`` of an npuconv output; the manifest is
    read from the model directory (``hf_config.name_or_path``)."""

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
        return cls(core.read_manifest(Path(root)), config.get("packed_modules_mapping"))

    def get_scaled_act_names(self) -> list[str]:
        return []

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        if isinstance(layer, FusedMoE):
            experts = self.experts_prefix(prefix)
            return NpuconvMoEMethod(self, experts) if experts else None
        if isinstance(layer, LinearBase):
            self.refuse_one_expert(prefix)
            shards = self.linear_shards(prefix)
            return NpuconvLinearMethod(self, prefix, shards) if shards else UnquantizedLinearMethod()
        return None

    # ------------------------------------------------------------------ SGLang module name → manifest layers
    def resolve(self, name: str) -> str | None:
        """The manifest layer of an SGLang module name: the same name, or the one name ending in
        ``"." + name`` (some SGLang models build their layers without the checkpoint's ``model.``)."""
        if name in self.layers:
            return name
        found = [layer for layer in self.layers if layer.endswith("." + name)]
        return found[0] if len(found) == 1 else None

    def linear_shards(self, prefix: str) -> list[str]:
        """The manifest layers behind an SGLang linear module, in shard order ([] if not converted)."""
        if self.resolve(prefix):
            return [self.resolve(prefix)]
        head, _, leaf = prefix.rpartition(".")
        names = [self.resolve(f"{head}.{sub}" if head else sub) or f"{head}.{sub}" for sub in self.packed.get(leaf, [])]
        present = [n for n in names if n in self.layers]
        if not present:
            return []
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise InputError(f"npuconv: {prefix} fuses {', '.join(names)} but {', '.join(missing)} is not converted")
        return names

    def refuse_one_expert(self, prefix: str) -> None:
        """A model that builds one linear per expert (``<experts>.<e>.<leaf>``) cannot load stacked
        experts: its loader would look for ``<experts>.<e>.<leaf>.*`` and leave them unset."""
        head, _, leaf = prefix.rpartition(".")
        experts, _, index = head.rpartition(".")
        stacked = self.resolve(f"{experts}.{leaf}") if index.isdigit() else None
        if stacked and self.layers[stacked].get("spec", {}).get("num_experts"):
            raise InputError(
                f"npuconv: SGLang built {prefix} as one linear per expert; npuconv stores {stacked} stacked "
                f"for FusedMoE, which this model class does not use"
            )

    def experts_prefix(self, prefix: str) -> str | None:
        """The manifest prefix of a FusedMoE module's stacked expert layers (None if not converted)."""
        for leaves in core.EXPERT_NAMES:
            full = [self.resolve(f"{prefix}.{leaf}") for leaf in leaves]
            if all(full):
                return full[0].rpartition(".")[0]
        return None


def _backend_for(tensor: torch.Tensor):
    from npuconv.kernels import get_backend

    return get_backend(str(tensor.device))


@contextlib.contextmanager
def _presharded(layer: torch.nn.Module):
    """SGLang's loaders in their pre-sharded mode: they place the given piece, cutting nothing."""
    before = getattr(layer, "use_presharded_weights", False)
    layer.use_presharded_weights = True
    try:
        yield
    finally:
        layer.use_presharded_weights = before


# ---------------------------------------------------------------------------- linear
class NpuconvLinearMethod(LinearMethodBase):
    """One SGLang linear module (possibly fused) on its :class:`~npuconv.engines.layers.LinearPlan`."""

    def __init__(self, config: NpuconvConfig, prefix: str, shards: list[str]):
        self.config = config
        self.prefix = prefix
        self.shards = shards
        self.plan: core.LinearPlan | None = None

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        replicated = isinstance(layer, ReplicatedLinear) or not hasattr(layer, "tp_group")
        rank, world = (0, 1) if replicated else get_group_rank_size(layer.tp_group)
        parallel = core.ROW if isinstance(layer, RowParallelLinear) else core.COLUMN
        name = self.shards[0] if len(self.shards) == 1 else self.prefix
        plan = core.plan_linear(self.config.manifest, name, self.shards, parallel, rank, world)
        if plan.spec.in_features != input_size_per_partition or plan.spec.out_features != sum(output_partition_sizes):
            raise InputError(
                f"{self.prefix}: the model builds [{input_size_per_partition} → {sum(output_partition_sizes)}] per rank, "
                f"npuconv.json holds [{plan.spec.in_features} → {plan.spec.out_features}]"
            )
        engine_loader = extra_weight_attrs.get("weight_loader")
        for role, spec in plan.params.items():
            if role == "bias":  # SGLang owns the bias parameter
                continue
            param = Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.ignore_warning = True
            if spec.n_axis is not None:
                param.output_dim = spec.n_axis
                if spec.n_unit > 1:
                    param.packed_dim, param.pack_factor = spec.n_axis, spec.n_unit
            param.weight_loader = plan.weight_loader(role, _presharded_loader(layer, engine_loader))
            layer.register_parameter(role, param)
        self.plan = plan

    def process_weights_after_loading(self, layer) -> None:
        """Only NZ: restored where the manifest says ``nz`` (a no-op off the NPU)."""
        loaded = {role: getattr(layer, role).data for role in self.plan.params if role != "bias"}
        layer.npuconv_tensors = self.plan.kernel_tensors(loaded, _backend_for(next(iter(loaded.values()))))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = dict(layer.npuconv_tensors)
        if bias is not None:
            tensors["bias"] = bias
        # the tensors already are this rank's piece (Target.split); the engine does the all-reduce
        return self.plan.forward(_backend_for(x), tensors, x)


def _presharded_loader(layer: torch.nn.Module, engine_loader):
    """SGLang's shard loader in its pre-sharded mode: it places the piece it is given, cutting nothing
    (the piece already is this rank's, cut by the target's split)."""
    def load(*args) -> None:
        with _presharded(layer):
            engine_loader(*args)

    return load


# ---------------------------------------------------------------------------- MoE
class NpuconvMoEMethod(FusedMoEMethodBase):
    """A FusedMoE layer whose experts are stacked npuconv layers, on the engine-neutral
    :class:`~npuconv.engines.layers.ExpertsPlan` (SiLU-and-mul, routed by SGLang's top-k)."""

    def __init__(self, config: NpuconvConfig, prefix: str):
        self.config = config
        self.prefix = prefix  # the manifest's experts prefix
        self.plan: core.ExpertsPlan | None = None

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        plan = core.plan_experts(self.config.manifest, self.prefix, layer.moe_tp_rank, layer.moe_tp_size)
        plan.expect(num_experts, intermediate_size_per_partition)
        plan.register(layer)
        self.plan = plan

    def create_moe_runner(self, layer, moe_runner_config) -> None:
        activation = getattr(moe_runner_config, "activation", "silu")
        if activation != "silu":
            raise InputError(f"npuconv: MoE activation {activation!r} is not supported (silu only)")

    def get_moe_runner_backend(self, layer):
        return None

    def process_weights_after_loading(self, layer) -> None:
        loaded = self.plan.loaded(layer)
        device = next(iter(loaded[self.plan.leaves[0]].values()))
        layer.npuconv_w13, layer.npuconv_w2 = self.plan.kernel_tensors(loaded, _backend_for(device))

    def apply(self, layer, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        x = dispatch_output.hidden_states
        topk = dispatch_output.topk_output
        y = self.plan.forward(_backend_for(x), layer.npuconv_w13, layer.npuconv_w2, x, topk.topk_weights, topk.topk_ids)
        return StandardCombineInput(hidden_states=y)
