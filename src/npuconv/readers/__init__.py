"""Readers, one module per source format (registered by name in :mod:`npuconv.registry`), and
format detection: the first registered reader whose ``matches`` accepts the checkpoint (the
registration order is the detection order; plain float matches everything and comes last).
"""

from __future__ import annotations

from npuconv.io.checkpoint import Checkpoint
from npuconv.readers.base import Reader
from npuconv.registry import reader_classes


def open_reader(checkpoint: Checkpoint) -> Reader:
    """The reader of the first format that matches the checkpoint (float as the fallback)."""
    for cls in reader_classes():
        if cls.matches(checkpoint):
            return cls(checkpoint)
    raise AssertionError("the float reader matches every checkpoint")


__all__ = ["Reader", "open_reader", "reader_classes"]
