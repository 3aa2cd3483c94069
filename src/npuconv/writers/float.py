"""``--to float``: a plain Hugging Face checkpoint with every quantized linear dequantized.

Each quantized linear ``<p>`` becomes ``<p>.weight`` ``[N, K]`` in the requested dtype, computed by
the canonical rule in float32 (:func:`npuconv.model.dequantize`) in the original K order (act-order
only changes which group a column uses, never the column order); ``<p>.bias`` is kept in that
dtype. Every other tensor is copied unchanged and ``quantization_config`` is removed from
config.json.

MoE expert stacks (``<p>.experts.<proj>``, ``num_experts = E``, see :mod:`npuconv.experts`)
are written **un-stacked**, one ``<p>.experts.<e>.<proj>.weight`` ``[N, K]`` per expert: the names
every Hugging Face MoE checkpoint uses and transformers loads (transformers 5 fuses them into its
``experts.gate_up_proj`` / ``experts.down_proj`` parameters while loading). A stacked layer whose name
has no ``experts.<proj>`` form is written as one ``<p>.weight`` ``[E, N, K]``.
"""

from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv.model import DEQUANT_CHUNK_ELEMENTS, LinearSpec, QuantizedLinear, dequantize
from npuconv.experts import unstack_layer, unstack_spec
from npuconv.io.safetensors_io import TensorPlan
from npuconv.writers.base import Target


class FloatTarget(Target):
    name = "float"
    summary = "dequantized plain Hugging Face checkpoint (fine-tuning, debugging, verify reference)"
    # measured: ≤ 50 MB over twice the output, whatever the layer size: float32 chunks of dequantize
    working_bytes_per_weight = 0.25
    working_bytes_fixed = 4 * DEQUANT_CHUNK_ELEMENTS * 4

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype or torch.bfloat16

    def plan_layer(self, spec: LinearSpec) -> list[TensorPlan]:
        members = unstack_spec(spec)
        if members is not None:
            return [plan for member in members for plan in self.plan_layer(member)]
        shape = (*spec.batch_shape, spec.out_features, spec.in_features)
        plans = [TensorPlan(f"{spec.name}.weight", self.dtype, shape)]
        if spec.has_bias:
            plans.append(TensorPlan(f"{spec.name}.bias", self.dtype, (*spec.batch_shape, spec.out_features)))
        return plans

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        if unstack_spec(layer.spec) is not None:
            return {name: t for member in unstack_layer(layer) for name, t in self.write_layer(member).items()}
        name = layer.spec.name
        out = {f"{name}.weight": dequantize(layer, self.dtype)}
        if layer.spec.has_bias:
            assert layer.bias is not None
            out[f"{name}.bias"] = layer.bias.to(self.dtype)
        return out

    def update_config(self, config: dict, manifest: dict) -> dict:
        config = dict(config)
        config.pop("quantization_config", None)
        return config

    def describe_layer(self, spec: LinearSpec) -> dict:
        members = unstack_spec(spec)
        if members is not None:  # role "experts.<e>.weight" per expert
            tensors = {f"experts.{e}.weight": self._weight_entry(m) for e, m in enumerate(members)}
            return {"scheme": "float", "kernel": "torch.nn.functional.linear", "experts": len(members), "tensors": tensors}
        return {"scheme": "float", "kernel": "torch.nn.functional.linear", "tensors": {"weight": self._weight_entry(spec)}}

    def _weight_entry(self, spec: LinearSpec) -> dict:
        rank = len(spec.batch_shape) + 2
        return {"name": f"{spec.name}.weight", "layout": "nd",
                "shape": [*spec.batch_shape, spec.out_features, spec.in_features],
                "dtype": str(self.dtype).removeprefix("torch."), "split": {"n": rank - 2, "k": rank - 1}}

