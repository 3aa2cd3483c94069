"""Targets, one module per output layout (registered by name in :mod:`npuconv.registry`).

The base class is :class:`~npuconv.writers.base.Target`; get one with
:func:`npuconv.registry.get_target` or, for a layer of an npuconv output,
:func:`npuconv.registry.layer_target`.
"""

from npuconv.writers.base import Target, Thresholds, WriterOptions

__all__ = ["Target", "Thresholds", "WriterOptions"]
