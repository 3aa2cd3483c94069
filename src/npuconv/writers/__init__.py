"""Writers, one module per target, registered by target name."""

from __future__ import annotations

import importlib

from npuconv.errors import InputError
from npuconv.writers.base import Writer, WriterOptions

# target name → module (imported lazily)
TARGETS: dict[str, str] = {
    "float": "npuconv.writers.float",
    "npu-int4": "npuconv.writers.npu_int4",
    "npu-int8": "npuconv.writers.npu_int8",
    "npu-w8a8": "npuconv.writers.npu_w8a8",
    "npu-mxfp8": "npuconv.writers.npu_mxfp8",
    "npu-mxfp4": "npuconv.writers.npu_mxfp4",
    "npu-w4a8": "npuconv.writers.npu_w4a8",
    "npu-w4a4": "npuconv.writers.npu_w4a4",
    "modelslim": "npuconv.writers.modelslim",
}


def writer_class(target: str) -> type[Writer]:
    module = TARGETS.get(target)
    if module is None:
        raise InputError(f"unknown target {target!r} (choose from: {', '.join(sorted(TARGETS))})")
    return importlib.import_module(module).WRITER


__all__ = ["TARGETS", "Writer", "WriterOptions", "writer_class"]
