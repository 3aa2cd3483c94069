"""The Reader protocol: one source format → canonical :class:`~npuconv.model.QuantizedLinear` layers."""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

from npuconv.lazy_torch import torch

from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv import experts


class Reader:
    """Base class of the per-format readers.

    A reader knows one on-disk format and nothing else. It lists the quantized linears
    (:meth:`linear_specs`, cheap, no large tensor reads), loads one at a time in canonical form
    (:meth:`load`), and names every other tensor, which passes through unchanged.
    """

    format: ClassVar[str] = ""
    #: MoE experts ``<p>.experts.<e>.<proj>`` become one stacked layer ``<p>.experts.<proj>`` with
    #: ``num_experts = E`` (:mod:`npuconv.experts`). Off here; on in the GPTQ, AWQ,
    #: compressed-tensors and msModelSlim readers (not in the float and npuconv-output readers). An
    #: instance may change it before its first :meth:`linear_specs` call.
    stack_experts: bool = False

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
        specs = self.scan()
        for spec in specs:  # every format: an empty linear has no group layout and no kernel
            if spec.out_features <= 0 or spec.in_features <= 0:
                raise InputError(
                    f"layer '{spec.name}': weight shape [{spec.out_features}, {spec.in_features}] (out, in) is empty"
                )
        self._expert_members: dict[str, list[LinearSpec]] = {}
        if self.stack_experts:
            specs, self._expert_members, notes = experts.stack_expert_specs(specs)
            for note in notes:
                self.warn(note)
        return specs

    def expert_members(self, spec: LinearSpec) -> list[LinearSpec] | None:
        """The per-expert specs a stacked layer of :meth:`linear_specs` was made from (None otherwise)."""
        if spec.num_experts is None:
            return None
        self.linear_specs()
        members = self.__dict__.get("_expert_members", {}).get(spec.name)
        return members if members is not None and len(members) == spec.num_experts else None

    def scan(self) -> list[LinearSpec]:
        """Find every quantized linear (override)."""
        return []

    def load(self, spec: LinearSpec) -> QuantizedLinear:
        """One layer of :meth:`linear_specs` in canonical form; an expert stack is its members'
        layers (:meth:`load_layer`), loaded one by one and stacked."""
        members = self.expert_members(spec)
        if members is None:
            return self.load_layer(spec)
        return experts.stack_layers(spec, [self.load_layer(member) for member in members])

    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        """Read and decode one layer of :meth:`scan` into canonical form (override)."""
        raise NotImplementedError

    def quantize_float_linears(self, recipe) -> None:
        """Opt in to offline quantization with ``recipe`` (a :class:`npuconv.offline.Recipe`, declared by
        the target as ``Target.offline_recipe``). Only a float checkpoint has float linears to quantize:
        every other reader ignores it."""

    def layer_report(self, spec: LinearSpec) -> dict:
        """Reader-side facts about one layer for its ``npuconv.json`` entry (the float reader: the
        ``offline_quantization`` block of a layer it quantized). Empty by default."""
        return {}

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

    def check_scale(
        self, name: str, scale: torch.Tensor, e8m0: bool = False, divisor: bool = False, negative_ok: bool = False
    ) -> None:
        """The scale policy of every reader, applied when a layer is loaded (``scale`` as stored).

        NaN or infinite values (E8M0: byte 255, its NaN) are an :class:`InputError`: nothing
        computed from them is meaningful, and ``verify`` could not judge the output. Zero or
        negative float scales are valid arithmetic (an all-zero group, a sign flip) and are
        converted as stored, with a warning. A ``divisor`` (a global or input scale) must be
        positive: zero would turn every dequantized value into inf. ``negative_ok``: the format
        stores negative scales by design (msModelSlim AutoRound), so only zeros are warned about.
        """
        if e8m0:
            bad = scale == 255
            if bool(bad.any()):
                raise InputError(
                    f"tensor '{name}': {int(bad.sum())} E8M0 scale byte(s) are 255 (NaN), first at index {_first(bad)}"
                )
            return
        values = scale.float()
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise InputError(
                f"tensor '{name}': {int(bad.sum())} scale value(s) are NaN or infinite, "
                f"first {values[bad][0].item()} at index {_first(bad)}"
            )
        nonpositive = values == 0 if negative_ok and not divisor else values <= 0
        if bool(nonpositive.any()):
            if divisor:
                raise InputError(f"tensor '{name}': scale {values[nonpositive][0].item()} is not positive (it is a divisor)")
            self.warn(
                f"tensor '{name}': {int(nonpositive.sum())} scale value(s) are zero or negative "
                f"(first at index {_first(nonpositive)}); converted as stored"
            )


def _first(mask: torch.Tensor) -> list[int]:
    """Index of the first True element of a boolean tensor."""
    return torch.nonzero(mask)[0].tolist()


def module_prefixes(names: list[str], suffix: str) -> list[str]:
    """Module prefixes ``p`` of every tensor named ``p + suffix``, in checkpoint order."""
    return [name[: -len(suffix)] for name in names if name.endswith(suffix)]
