"""Plain float checkpoints: no quantized linears; every tensor passes through.

This is the fallback reader, so it also refuses what only *looks* like a float checkpoint because
the file saying how it is quantized is missing: a tensor with a suffix that only quantized
formats write (``qweight``, ``weight_packed``, ``weight_scale``, …), or a ``quant_method`` of
``npuconv`` without its ``npuconv.json`` manifest. Passing those through would turn packed codes
into "float" weights.
"""

from __future__ import annotations

from npuconv.checkpoint import Checkpoint
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import LinearSpec
from npuconv.readers.base import Reader

KNOWN_QUANT_METHODS = {"gptq", "gptqmodel", "awq", "compressed-tensors", "npuconv"}
# tensor suffixes that only quantized checkpoints write (GPTQ/AWQ, compressed-tensors, msModelSlim)
QUANTIZED_SUFFIXES = (
    ".qweight",
    ".qzeros",
    ".weight_packed",
    ".weight_scale",
    ".weight_zero_point",
    ".weight_offset",
    ".deq_scale",
)


class FloatReader(Reader):
    format = "float"

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        method = checkpoint.quantization_config.get("quant_method")
        if method and method not in KNOWN_QUANT_METHODS:
            raise UnsupportedError(
                f"config.json: quantization_config.quant_method {method!r} is not supported "
                "(supported: gptq, awq, compressed-tensors, msModelSlim, float)"
            )
        return True

    def scan(self) -> list[LinearSpec]:
        if self.ckpt.quantization_config.get("quant_method") == "npuconv":
            raise InputError(
                "config.json: quant_method 'npuconv' but npuconv.json (the conversion manifest) is missing"
            )
        for name in self.ckpt.names():
            if name.endswith(QUANTIZED_SUFFIXES):
                raise InputError(
                    f"tensor '{name}' holds quantized data, but no quantization config was found "
                    "(config.json quantization_config, quantize_config.json or quant_model_description.json)"
                )
        return []


READER = FloatReader
