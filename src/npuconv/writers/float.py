"""``--to float``: a plain Hugging Face checkpoint with every quantized linear dequantized.

Each quantized linear ``<p>`` becomes ``<p>.weight`` ``[N, K]`` (``[E, N, K]`` for expert
stacks) in the requested dtype, computed by the canonical rule in float32
(:func:`npuconv.model.dequantize`) in the original K order (act-order only changes which group
a column uses, never the column order); ``<p>.bias`` is kept in that dtype. Every other tensor
is copied unchanged and ``quantization_config`` is removed from config.json.
"""

from __future__ import annotations

import torch

from npuconv.model import LinearSpec, QuantizedLinear, dequantize
from npuconv.safetensors_io import TensorPlan
from npuconv.writers.base import Writer


class FloatWriter(Writer):
    target = "float"
    summary = "dequantized plain Hugging Face checkpoint (fine-tuning, debugging, verify reference)"

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype or torch.bfloat16

    def plan_layer(self, spec: LinearSpec) -> list[TensorPlan]:
        shape = (*spec.batch_shape, spec.out_features, spec.in_features)
        plans = [TensorPlan(f"{spec.name}.weight", self.dtype, shape)]
        if spec.has_bias:
            plans.append(TensorPlan(f"{spec.name}.bias", self.dtype, (*spec.batch_shape, spec.out_features)))
        return plans

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
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

    def layer_manifest(self, spec: LinearSpec) -> dict:
        return {
            "scheme": "float",
            "kernel": "torch.nn.functional.linear",
            "tensors": {"weight": {"name": f"{spec.name}.weight", "layout": "nd",
                                    "shape": [*spec.batch_shape, spec.out_features, spec.in_features],
                                    "dtype": str(self.dtype).removeprefix("torch.")}},
        }


WRITER = FloatWriter
