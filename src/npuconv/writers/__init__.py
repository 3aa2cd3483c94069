"""Writers, one module per target, registered by target name.

Importing this package does not import torch (``npuconv --help`` lists the targets without it):
``Writer`` and ``WriterOptions`` are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from npuconv.errors import InputError
from npuconv.writers.targets import TARGETS

if TYPE_CHECKING:
    from npuconv.writers.base import Writer, WriterOptions


def writer_class(target: str) -> type[Writer]:
    module = TARGETS.get(target)
    if module is None:
        raise InputError(f"unknown target {target!r} (choose from: {', '.join(sorted(TARGETS))})")
    return importlib.import_module(module).WRITER


def __getattr__(name: str):
    if name in ("Writer", "WriterOptions"):
        from npuconv.writers import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TARGETS", "Writer", "WriterOptions", "writer_class"]
