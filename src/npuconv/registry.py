"""One registration mechanism for readers (source formats) and targets (output layouts).

Both are registered by name as ``"module:attribute"`` strings, so the names can be listed (CLI
``--help``, shell completion, ``npuconv inspect``) without importing torch or any format module;
a module is imported the first time its class is asked for.

Library API::

    from npuconv.registry import get_target, target_names, layer_target
    target_names()                      # ['float', 'npu-int4', …] in registration order
    target = get_target("npu-int4")     # a Target with default options
    target = layer_target(manifest, manifest["layers"]["model.layers.0.mlp.down_proj"])

Adding a format or a target = one module defining the class + one :func:`register_reader` /
:func:`register_target` line (below for the built-ins; a plugin calls the same functions).
Readers are tried in registration order by :func:`npuconv.readers.open_reader` (first match wins),
so the order of :data:`_READERS` is the detection order.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from npuconv.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from npuconv.readers.base import Reader
    from npuconv.writers.base import Target, WriterOptions


class Registry:
    """Ordered ``name → "module:attribute"`` table with lazy import of the registered object."""

    def __init__(self, kind: str):
        self.kind = kind
        self._paths: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, path: str) -> None:
        """Register ``name`` as ``"package.module:Attribute"`` (re-registering a name replaces it)."""
        if ":" not in path:
            raise ValueError(f"{self.kind} {name!r}: path must be 'module:attribute', got {path!r}")
        self._paths[name] = path
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, in registration order (no import)."""
        return list(self._paths)

    def get(self, name: str) -> Any:
        """The registered object; an unknown name is an :class:`InputError` listing the known ones."""
        if name not in self._paths:
            raise InputError(f"unknown {self.kind} {name!r} (choose from: {', '.join(sorted(self._paths))})")
        if name not in self._loaded:
            module, attribute = self._paths[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]


READERS = Registry("format")
TARGETS = Registry("target")


def register_reader(name: str, path: str) -> None:
    """Register a source format (its Reader class at ``path``); detection tries readers in order."""
    READERS.register(name, path)


def register_target(name: str, path: str) -> None:
    """Register a target (its Target class at ``path``)."""
    TARGETS.register(name, path)


# ------------------------------------------------------------------ built-ins
# detection order (first match wins), following each engine's own rules: msModelSlim
# (quant_model_description*.json) → npuconv output (npuconv.json) → compressed-tensors → AWQ →
# GPTQ → plain float (matches every checkpoint, so it is last)
for _name, _path in (
    ("modelslim", "npuconv.readers.modelslim:ModelSlimReader"),
    ("npuconv", "npuconv.readers.npuconv_output:NpuconvReader"),
    ("compressed-tensors", "npuconv.readers.compressed_tensors:CompressedTensorsReader"),
    ("awq", "npuconv.readers.awq:AWQReader"),
    ("gptq", "npuconv.readers.gptq:GPTQReader"),
    ("float", "npuconv.readers.float:FloatReader"),
):
    register_reader(_name, _path)

for _name, _path in (
    ("npu", "npuconv.writers.npu:NpuTarget"),  # the default: each layer to its natural NPU target
    ("float", "npuconv.writers.float:FloatTarget"),
    ("npu-int4", "npuconv.writers.npu_int4:NpuInt4Target"),
    ("npu-int8", "npuconv.writers.npu_int8:NpuInt8Target"),
    ("npu-w8a8", "npuconv.writers.npu_w8a8:NpuW8A8Target"),
    ("npu-mxfp8", "npuconv.writers.npu_mxfp8:NpuMxfp8Target"),
    ("npu-mxfp4", "npuconv.writers.npu_mxfp4:NpuMxfp4Target"),
    ("npu-w4a8", "npuconv.writers.npu_w4a8:NpuW4A8Target"),
    ("npu-w4a4", "npuconv.writers.npu_w4a4:NpuW4A4Target"),
    ("npu-mxfp4-dual", "npuconv.writers.npu_mxfp4_dual:NpuMxfp4DualTarget"),
    ("npu-float", "npuconv.writers.npu_float:NpuFloatTarget"),
    ("modelslim", "npuconv.writers.modelslim:ModelSlimTarget"),
):
    register_target(_name, _path)


# ------------------------------------------------------------------ readers
def reader_names() -> list[str]:
    """Source format names, in detection order (no import)."""
    return READERS.names()


def get_reader(name: str) -> type[Reader]:
    """The Reader class of a source format."""
    return READERS.get(name)


def reader_classes() -> list[type[Reader]]:
    """Every Reader class, in detection order."""
    return [READERS.get(name) for name in READERS.names()]


# ------------------------------------------------------------------ targets
def target_names() -> list[str]:
    """Target names, in registration order (no import)."""
    return TARGETS.names()


def target_class(name: str) -> type[Target]:
    """The Target class registered as ``name`` (:class:`InputError` if unknown)."""
    return TARGETS.get(name)


def get_target(name: str, options: WriterOptions | None = None) -> Target:
    """A Target instance (default options unless given: ``nz`` the target's default, vllm-ascend MX layout)."""
    return target_class(name)(options)


def layer_target(manifest: dict, entry: dict) -> Target:
    """The Target of ONE layer of an npuconv output.

    ``entry["target"]`` (every layer entry records it), falling back to ``manifest["target"]`` for
    manifests written before per-layer targets. The instance gets the output's recorded
    ``options.mx_layout`` (what :meth:`Target.read_layer` of an MX target needs); a layer entry's own
    ``mx_layout`` wins over it.
    """
    name = entry.get("target") or (manifest or {}).get("target")
    if not name:
        raise InputError("layer entry names no target (and the manifest has no 'target')")
    return target_class(name).for_layer(manifest or {}, entry)


def native_target(spec) -> Target | None:
    """The NPU target whose kernel serves a layer of this canonical scheme as it is (for checking an
    unconverted checkpoint against the kernels), or None when no Ascend kernel runs it.

    Targets declare it with ``Target.native_rank`` (lower is preferred; None: never chosen) and
    ``Target.serves(spec)``.
    """
    candidates = [target_class(name) for name in TARGETS.names()]
    ranked = sorted((c for c in candidates if c.native_rank is not None), key=lambda c: c.native_rank)
    for cls in ranked:
        target = get_target(cls.name)
        if target.serves(spec):
            return target
    return None
