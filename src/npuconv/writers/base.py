"""The Writer protocol: canonical layers → tensors of one target layout (no source-format knowledge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.output import MANIFEST
from npuconv.safetensors_io import TensorInfo, TensorPlan


@dataclass(frozen=True)
class WriterOptions:
    """Target options shared by all writers (each uses what applies to it)."""

    dtype: torch.dtype | None = None  # float target: output dtype of dequantized weights
    nz: bool | None = None  # FRACTAL_NZ storage; None: the target's default
    mx_layout: str = "vllm-ascend"  # MX targets: "vllm-ascend" (contiguous [K,N]) or "sglang" ([N,K] storage)
    model_dtype: torch.dtype | None = None  # activation dtype of the model (config.json torch_dtype)


class Writer:
    """Base class of the per-target writers.

    A writer first *plans* each layer (names, dtypes, shapes of the tensors it will write, from
    the :class:`LinearSpec` alone), then *writes* it from the loaded canonical layer. Planning
    is also where kernel limits are checked, so a conversion fails before it writes anything.
    """

    target: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    weight_prefix: ClassVar[str] = "model"

    def __init__(self, options: WriterOptions):
        self.options = options
        self.warnings: list[str] = []

    def unsupported_reason(self, spec: LinearSpec) -> str | None:
        """None if this target can take the layer, else a one-line reason."""
        return None

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        """The layer's tensors by role, as ``npuconv.json`` entries (:func:`npu_common.tensor_entry`)."""
        raise NotImplementedError

    def plan_layer(self, spec: LinearSpec) -> list[TensorPlan]:
        """What :meth:`write_layer` will write, in order (default: from :meth:`tensor_entries`)."""
        from npuconv.writers.npu_common import entry_plan

        return [entry_plan(entry) for entry in self.tensor_entries(spec).values()]

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        """Inverse of :meth:`write_layer`: ND tensors by manifest role → canonical layer."""
        raise NotImplementedError(f"{self.target} outputs cannot be read back")

    def layer_manifest(self, spec: LinearSpec) -> dict:
        """Per-layer entry of ``npuconv.json`` (scheme, kernel, tensors by role)."""
        return {}

    def plan_passthrough(self, info: TensorInfo) -> TensorPlan:
        return TensorPlan(info.name, info.dtype, info.shape)

    def write_passthrough(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def update_config(self, config: dict, manifest: dict) -> dict:
        """config.json of the output: ``quantization_config = {"quant_method": "npuconv", …}``.

        Targets that produce a format of their own (float, modelslim) override this.
        """
        config = dict(config)
        config["quantization_config"] = {
            "quant_method": "npuconv",
            "target": self.target,
            "manifest": MANIFEST,
            "npuconv_version": manifest["npuconv_version"],
        }
        return config

    def extra_files(self, manifest: dict) -> dict[str, object]:
        """Additional JSON side files, filename → JSON value."""
        return {}

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
