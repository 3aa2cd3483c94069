"""vLLM / vLLM-Ascend plugin: quantization method ``npuconv`` loads npuconv outputs as written.

Installed with npuconv as the ``vllm.general_plugins`` entry point ``npuconv`` →
:func:`register`, which vLLM calls in every process before it reads a model config. Registering
``npuconv`` with ``register_quantization_config`` also appends it to the current platform's
``supported_quantization`` — which is how the vLLM-Ascend platform (``NPUPlatform``) accepts it
(engines.md). A model whose ``config.json`` says ``quantization_config.quant_method: npuconv`` (what
``npuconv convert`` writes) then resolves to :class:`NpuconvConfig` with no ``--quantization`` flag.

Per module, from ``npuconv.json`` (:mod:`npuconv.engines.layers`):

* :class:`NpuconvLinearMethod` — column / row / fused (``qkv_proj``, ``gate_up_proj``) linears:
  creates exactly the manifest's tensors of this TP rank (role names, dtypes, storage shapes); the
  checkpoint tensor goes through the target's TP split and then through vLLM's own shard loader
  (``output_dim``/``packed_dim``/``packed_factor`` place ``q``/``k``/``v`` and ``gate``/``up``;
  ``is_sharded_weight`` because the split is already done). After loading, NZ is restored where
  the manifest says ``nz``; ``apply`` calls the layer's kernel through its target.
* :class:`NpuconvMoEMethod` — stacked experts: parameters under the checkpoint's own names
  (``<prefix>.gate_proj.<role>`` … or ``w1``/``w3``/``w2``, one per manifest role, this rank's piece),
  so the model's ``load_weights`` (``qwen2_moe``, ``mixtral``: names no stacked/expert mapping claims
  go to ``params_dict[name]``) loads them through their ``weight_loader`` with the target's TP split;
  gate/up fused into ``w13`` after loading (:class:`npuconv.engines.layers.ExpertsPlan`); run routed
  by the engine's expert selection, one ``npu_grouped_matmul`` for ``w13`` and one for ``w2``.
* Layers not in the manifest (``lm_head``, routers, anything left in float) get vLLM's
  unquantized method. Mixed-precision outputs: each layer's target comes from its own entry.
Whatever cannot be split exactly at the engine's TP size is refused at load with a one-line
:class:`npuconv.errors.InputError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import Parameter

from npuconv.engines import layers as core
from npuconv.errors import InputError

NAME = "npuconv"
_REGISTERED = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register quantization method ``npuconv`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(NAME)(NpuconvConfig)
    _REGISTERED = True


from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig  # noqa: E402
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402


class NpuconvConfig(QuantizationConfig):
    """``quant_method: npuconv``; the per-layer truth is ``npuconv.json`` beside ``config.json``."""

    def __init__(self, quant_config: dict[str, Any] | None = None, manifest: dict | None = None) -> None:
        super().__init__()
        self.quant_config = dict(quant_config or {})
        self.manifest = manifest
        #: vLLM-Ascend reads ``quant_config.quant_description`` (msModelSlim's per-tensor description) from
        #: whatever quantization config is active: ``AscendRMSNorm`` creates a norm bias for each
        #: ``*norm.bias`` key, ``AscendConfig`` scans it for indexer layers. An npuconv output has
        #: neither: empty, so every model's norms build (without it ``vllm serve OUT`` fails there).
        self.quant_description: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"NpuconvConfig(target={self.quant_config.get('target')!r})"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # no CUDA capability involved: the kernels are torch_npu's

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json; the manifest is read in maybe_update_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NpuconvConfig:
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Read ``npuconv.json`` of the model being served (a local directory or a Hub repo)."""
        if self.manifest is None:
            self.manifest = _read_manifest(model_name, revision)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str, **_: Any):
        from vllm.model_executor.layers.fused_moe import FusedMoE

        if self.manifest is None:
            raise InputError("npuconv: the manifest was not read (maybe_update_config was not called with the model path)")
        if isinstance(layer, FusedMoE):
            return NpuconvMoEMethod(self, layer, prefix)
        if isinstance(layer, LinearBase):
            shards = self._shards(prefix)
            if not any(s in self.manifest["layers"] for s in shards):
                return UnquantizedLinearMethod()
            return NpuconvLinearMethod(self, prefix, shards)
        return None

    def _shards(self, prefix: str) -> list[str]:
        """Manifest layer names behind vLLM module ``prefix`` (``qkv_proj`` → q/k/v, per the model's
        ``packed_modules_mapping``, which vLLM sets on the config from the model class)."""
        head, _, leaf = prefix.rpartition(".")
        packed = (getattr(self, "packed_modules_mapping", None) or {}).get(leaf)
        if not packed:
            return [prefix]
        return [f"{head}.{name}" if head else name for name in packed]


def _read_manifest(model: str, revision: str | None) -> dict:
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, core.MANIFEST, revision=revision)).parent
    return core.read_manifest(path)


def _backend(layer: torch.nn.Module):
    device = next((p.device for p in layer.parameters()), torch.device("cpu"))
    return core.npu_backend(device)


# ---------------------------------------------------------------------------- linear layers
class NpuconvLinearMethod(LinearMethodBase):
    """One (possibly fused) linear module of an npuconv output."""

    def __init__(self, config: NpuconvConfig, prefix: str, shards: list[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.shards = shards
        self.plan: core.LinearPlan | None = None

    def create_weights(
        self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
        input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs,
    ) -> None:
        parallel = core.ROW if isinstance(layer, RowParallelLinear) else core.COLUMN
        rank, world = int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
        if not hasattr(layer, "tp_size"):  # ReplicatedLinear: whole on every rank
            rank, world = 0, 1
        plan = core.plan_linear(self.config.manifest, self.prefix, self.shards, parallel, rank, world)
        expected = [s.out_features // world if parallel == core.COLUMN else s.out_features for s in plan.specs]
        if list(output_partition_sizes) != expected or plan.spec.in_features != input_size_per_partition:
            raise InputError(
                f"{self.prefix}: the model builds [{input_size_per_partition} → {list(output_partition_sizes)}] per rank, "
                f"npuconv.json holds [{plan.spec.in_features} → {expected}]"
            )
        engine_loader = extra_weight_attrs["weight_loader"]
        for role, spec in plan.params.items():
            if role == "bias":  # vLLM owns the bias parameter (created by the layer itself when the model has one)
                continue
            param = Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            attrs = {"weight_loader": plan.weight_loader(role, engine_loader)}
            if spec.n_axis is not None:
                attrs.update(output_dim=spec.n_axis, packed_dim=spec.n_axis, packed_factor=spec.n_unit, is_sharded_weight=True)
            else:
                attrs.update(ignore_warning=True)
            layer.register_parameter(role, param)
            set_weight_attrs(param, attrs)
        self.plan = plan

    def process_weights_after_loading(self, layer) -> None:
        loaded = {role: getattr(layer, role).data for role in self.plan.params if role != "bias"}
        layer.npuconv_tensors = self.plan.kernel_tensors(loaded, _backend(layer))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = dict(layer.npuconv_tensors)
        if bias is not None and "bias" in self.plan.params:
            tensors["bias"] = bias
        return self.plan.forward(_backend(layer), tensors, x)


# ---------------------------------------------------------------------------- MoE experts
class NpuconvMoEMethod(FusedMoEMethodBase):
    """Stacked experts of an npuconv output (``<prefix>.gate_proj|up_proj|down_proj`` or ``w1|w3|w2``),
    on the engine-neutral :class:`npuconv.engines.layers.ExpertsPlan`: the parameters are registered
    under the checkpoint's names (sub-modules of the ``FusedMoE``), so the model's own ``load_weights``
    loads them through ``params_dict[name].weight_loader`` (the target's TP split); gate/up are fused
    into ``w13`` after loading; ``apply`` routes with vLLM-Ascend's ``select_experts`` and runs one
    routed ``npu_grouped_matmul`` per projection (``Target.run(..., group_list=...)``)."""

    def __init__(self, config: NpuconvConfig, layer, prefix: str) -> None:
        super().__init__(layer.moe_config)
        self.config = config
        self.prefix = prefix
        self.plan: core.ExpertsPlan | None = None

    def create_weights(
        self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
        params_dtype: torch.dtype, **extra_weight_attrs,
    ) -> None:
        rank, world = int(layer.tp_rank), int(layer.tp_size)
        plan = core.plan_experts(self.config.manifest, self.prefix, rank, world)
        plan.expect(num_experts, intermediate_size_per_partition)
        plan.register(layer)
        self.plan = plan

    def process_weights_after_loading(self, layer) -> None:
        layer.npuconv_w13, layer.npuconv_w2 = self.plan.kernel_tensors(self.plan.loaded(layer), _backend(layer))

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x: torch.Tensor, router_logits: torch.Tensor = None, top_k: int = None, renormalize: bool = True, **kwargs):
        """vLLM-Ascend's MoE method call: route with the engine's ``select_experts``, then the experts."""
        from vllm_ascend.ops.fused_moe.experts_selector import select_experts
        from vllm_ascend.ops.fused_moe.moe_comm_method import FusedExpertsResult

        topk_weights, topk_ids = select_experts(
            hidden_states=x, router_logits=router_logits, top_k=top_k, use_grouped_topk=kwargs.get("use_grouped_topk", False),
            renormalize=renormalize, topk_group=kwargs.get("topk_group"), num_expert_group=kwargs.get("num_expert_group"),
            custom_routing_function=kwargs.get("custom_routing_function"), scoring_func=kwargs.get("scoring_func", "softmax"),
            routed_scaling_factor=kwargs.get("routed_scaling_factor", 1.0),
            e_score_correction_bias=kwargs.get("e_score_correction_bias"), num_experts=router_logits.shape[-1],
        )
        y = self.plan.forward(_backend(layer), layer.npuconv_w13, layer.npuconv_w2, x, topk_weights, topk_ids)
        return FusedExpertsResult(routed_out=y)
