"""Tool reference for compressed-tensors sources: CT's own model-free dequantizer.

Each module's on-disk tensors go through ``CompressedTensorsDequantizer.process`` of the installed
compressed-tensors (``compressed_tensors.entrypoints.convert.converters``), which matches the module
to its config group with CT's own target/ignore rules and calls the registered compressor's
``decompress(state_dict, scheme)``. Floating-point scales are upcast to float32 first, so the
library computes in float32 (its product in a bf16 scale's dtype would add a rounding the
checkpoint does not contain); the result is float32 ``[N, K]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from npuconv.references import ToolReference, dump_main

SCALE_SUFFIXES = ("_scale", "_global_scale")


def _upcast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name: t.float() if name.endswith(SCALE_SUFFIXES) and t.dtype.is_floating_point else t
        for name, t in tensors.items()
    }


def _dequantizer(root: Path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    return CompressedTensorsDequantizer(str(root), dtype=torch.float32)


class Reference(ToolReference):
    library = "compressed_tensors"
    distribution = "compressed-tensors"

    def __init__(self, reader):
        super().__init__(reader)
        self.dequantizer = _dequantizer(self.ckpt.root)

    def module_weight(self, spec):
        out = self.dequantizer.process(_upcast(self.tensors(spec)))
        weight = out.get(f"{spec.name}.weight")
        return None if weight is None else weight.float()


def dequantize_directory(path: str) -> dict[str, torch.Tensor]:
    """Every quantized module of a compressed-tensors directory → float32 weight (module prefix → tensor)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        if file.name != "reference_dequant.safetensors":
            tensors.update(load_file(file))
    # CT's name-only matching takes every ``*.weight`` for a ``Linear`` target (it cannot see module
    # classes): hand it only the modules that carry a weight scale, i.e. the quantized ones
    quantized = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_scale")}
    tensors = {name: t for name, t in tensors.items() if name.rsplit(".", 1)[0] in quantized}
    out = _dequantizer(Path(path)).process(_upcast(tensors))
    return {prefix: out[f"{prefix}.weight"].float() for prefix in sorted(quantized)}


if __name__ == "__main__":
    dump_main(dequantize_directory, sys.argv[1:])
