"""Tool references for ``verify --reference``: the source dequantized by the library that wrote it.

``verify``'s default reference is npuconv's own reader (``--reference npuconv``). With
``--reference tool`` the weight each layer's kernel output is compared with comes from the
*writing library's own* dequantization instead, so a reader bug (or a convention npuconv got
wrong consistently on both sides) shows up as a failed layer. ``--reference auto`` uses the tool
when it is importable in the running Python and npuconv otherwise.

One module per source format (``REFERENCES``, imported lazily: the libraries are optional and
heavy). Each defines ``LIBRARY`` (the import name) and ``Reference(reader)``, a
:class:`ToolReference` whose :meth:`ToolReference.module_weight` dequantizes ONE source module
from its on-disk tensors with the library's code. MoE layers that npuconv stacks are rebuilt here
from their per-expert modules (``Reader.expert_members``). Biases are not part of the tool
reference (they pass through unquantized); ``verify`` takes them from the source as before.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Callable

import torch

from npuconv.errors import InputError
from npuconv.model import LinearSpec

MODES = ("npuconv", "tool", "auto")

#: source reader format → module defining ``LIBRARY`` and ``Reference``
REFERENCES: dict[str, str] = {
    "compressed-tensors": "npuconv.references.compressed_tensors",
    "modelslim": "npuconv.references.modelslim",
}


class ToolMismatch(Exception):
    """The stored tensors are not what the tool's own packer makes of their decoding (a layer failure)."""


class ToolReference:
    """Dequantizes source layers with the writing library (subclasses implement :meth:`module_weight`)."""

    library: str = ""  # import name of the library
    distribution: str = ""  # its package name on PyPI (for the version in the report)

    def __init__(self, reader):
        self.reader = reader
        self.ckpt = reader.ckpt

    @property
    def name(self) -> str:
        """``"<package> <version>"``, as the verify report prints it."""
        try:
            version = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return f"{self.distribution} {version}"

    def weight(self, spec: LinearSpec) -> torch.Tensor | None:
        """float32 ``[N, K]`` (``[E, N, K]`` for a stacked MoE layer), or None when the library has no
        dequantization for this layer's scheme (verify then falls back to npuconv's and says so)."""
        members = self.reader.expert_members(spec)
        if members is None:
            return self.module_weight(spec)
        weights = [self.module_weight(member) for member in members]
        return None if any(w is None for w in weights) else torch.stack(weights)

    def module_weight(self, spec: LinearSpec) -> torch.Tensor | None:
        raise NotImplementedError

    def tensors(self, spec: LinearSpec) -> dict[str, torch.Tensor]:
        """The module's on-disk tensors by full name (``spec.source_tensors``)."""
        return {name: self.ckpt.get(name) for name in spec.source_tensors}


def unavailable(reader) -> str | None:
    """Why no tool reference can be used for this source (None when one can)."""
    module = REFERENCES.get(reader.format)
    if module is None:
        known = ", ".join(sorted(REFERENCES))
        return f"no tool reference for {reader.format or 'this'} sources (tool references exist for: {known})"
    library = importlib.import_module(module).Reference.library
    try:
        found = importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"the library that wrote this {reader.format} source ({library}) is not installed in this Python"
    return None


def select(mode: str, reader) -> ToolReference | None:
    """The tool reference ``mode`` asks for: None for ``npuconv`` (and for ``auto`` without the tool).

    ``tool`` without the library raises :class:`~npuconv.errors.InputError` (a one-line reason).
    """
    if mode not in MODES:
        raise InputError(f"--reference must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "npuconv":
        return None
    reason = unavailable(reader)
    if reason is not None:
        if mode == "tool":
            raise InputError(f"--reference tool: {reason}")
        return None
    return importlib.import_module(REFERENCES[reader.format]).Reference(reader)


def dump_main(dequantize: Callable[[str], dict[str, torch.Tensor]], argv: list[str]) -> None:
    """``python -m npuconv.references.<tool> SRC OUT.safetensors``: every module's tool dequantization
    (``<module>.weight`` → float32) into one file. The tests run this in the tool's own venv."""
    from npuconv.io.safetensors_io import save_file

    if len(argv) != 2:
        raise SystemExit("usage: python -m npuconv.references.<tool> SOURCE_DIR OUT.safetensors")
    weights = dequantize(argv[0])
    save_file({f"{k}.weight": v.contiguous() for k, v in weights.items()}, argv[1], {"format": "pt"})
