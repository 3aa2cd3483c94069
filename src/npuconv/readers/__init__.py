"""Readers, one module per source format, and format detection.

Detection order (first match wins), following each engine's own rules:
msModelSlim (``quant_model_description*.json``) → npuconv output (``npuconv.json``) →
compressed-tensors → AWQ → GPTQ → plain float.
"""

from __future__ import annotations

from npuconv.checkpoint import Checkpoint
from npuconv.readers.base import Reader

_REGISTRY: list[type[Reader]] = []


def register(cls: type[Reader]) -> type[Reader]:
    _REGISTRY.append(cls)
    return cls


def reader_classes() -> list[type[Reader]]:
    _load_builtin()
    return list(_REGISTRY)


def open_reader(checkpoint: Checkpoint) -> Reader:
    """The reader of the first format that matches the checkpoint (float as the fallback)."""
    for cls in reader_classes():
        if cls.matches(checkpoint):
            return cls(checkpoint)
    raise AssertionError("the float reader matches every checkpoint")


def _load_builtin() -> None:
    if _REGISTRY:
        return
    from npuconv.readers import awq, compressed_tensors, float as float_reader, gptq, modelslim, npuconv_output

    for module in (modelslim, npuconv_output, compressed_tensors, awq, gptq, float_reader):
        register(module.READER)
