"""The Reader protocol: one source format → canonical :class:`~npuconv.model.QuantizedLinear` layers."""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

from npuconv.checkpoint import Checkpoint
from npuconv.errors import InputError
from npuconv.model import LinearSpec, QuantizedLinear


class Reader:
    """Base class of the per-format readers.

    A reader knows one on-disk format and nothing else. It lists the quantized linears
    (:meth:`linear_specs`, cheap, no large tensor reads), loads one at a time in canonical form
    (:meth:`load`), and names every other tensor, which passes through unchanged.
    """

    format: ClassVar[str] = ""

    def __init__(self, checkpoint: Checkpoint):
        self.ckpt = checkpoint
        self.warnings: list[str] = []

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        """True if this checkpoint is in this reader's format."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Format-level facts for ``inspect`` (e.g. GPTQ ``checkpoint_format``)."""
        return {}

    def linear_specs(self) -> list[LinearSpec]:
        return self._specs

    @cached_property
    def _specs(self) -> list[LinearSpec]:
        return self.scan()

    def scan(self) -> list[LinearSpec]:
        """Find every quantized linear (override)."""
        return []

    def load(self, spec: LinearSpec) -> QuantizedLinear:
        """Read and decode one layer into canonical form (override)."""
        raise NotImplementedError

    def consumed_files(self) -> list[str]:
        """Format-specific side files (relative paths) that describe the source format and must not
        be copied into a converted output (e.g. GPTQ ``quantize_config.json``)."""
        return []

    def passthrough_names(self) -> list[str]:
        """Tensors that are not part of any quantized linear, in checkpoint order."""
        used = {name for spec in self.linear_specs() for name in spec.source_tensors}
        return [name for name in self.ckpt.names() if name not in used]

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # ---------------------------------------------------------------- helpers for subclasses
    def tensor(self, name: str):
        return self.ckpt.get(name)

    def require(self, name: str, where: str) -> None:
        if not self.ckpt.has(name):
            raise InputError(f"{where}: tensor '{name}' is missing")


def module_prefixes(names: list[str], suffix: str) -> list[str]:
    """Module prefixes ``p`` of every tensor named ``p + suffix``, in checkpoint order."""
    return [name[: -len(suffix)] for name in names if name.endswith(suffix)]
