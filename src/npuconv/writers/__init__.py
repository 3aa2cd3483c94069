"""Writers, one module per target, registered by target name."""

from __future__ import annotations

import importlib

from npuconv.errors import InputError
from npuconv.writers.base import Writer, WriterOptions
from npuconv.writers.targets import TARGETS


def writer_class(target: str) -> type[Writer]:
    module = TARGETS.get(target)
    if module is None:
        raise InputError(f"unknown target {target!r} (choose from: {', '.join(sorted(TARGETS))})")
    return importlib.import_module(module).WRITER


__all__ = ["TARGETS", "Writer", "WriterOptions", "writer_class"]
