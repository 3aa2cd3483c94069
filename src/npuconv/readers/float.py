"""Plain float checkpoints: no quantized linears; every tensor passes through."""

from __future__ import annotations

from npuconv.checkpoint import Checkpoint
from npuconv.errors import UnsupportedError
from npuconv.readers.base import Reader

KNOWN_QUANT_METHODS = {"gptq", "gptqmodel", "awq", "compressed-tensors", "npuconv"}


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


READER = FloatReader
