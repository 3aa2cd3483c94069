"""MoE expert stacks: per-expert linears → one canonical ``[E, N, K]`` layer (format-free).

Every quantized format stores a MoE block's experts as separate linears,
``<prefix>.experts.<e>.<proj>`` (``model.layers.3.mlp.experts.7.down_proj``, Mixtral's
``block_sparse_moe.experts.7.w2``), while both Ascend engines keep one stacked tensor per
projection and run ``npu_grouped_matmul`` on it (npu_loaders.md §3.3, §3.6, §4 MoE, §6.3).
:func:`stack_expert_specs` is the transform :meth:`npuconv.readers.base.Reader.linear_specs`
applies for readers that opt in (``Reader.stack_experts``):

- Members: the specs whose names are ``<prefix>.experts.<e>.<proj>`` for one ``(prefix, proj)``
  (``proj`` is everything after the index, one or more name components).
- They become one :class:`~npuconv.model.LinearSpec` named ``<prefix>.experts.<proj>`` with
  ``num_experts = E`` and the members' ``source_tensors`` (so none of them passes through), at the
  position of the first member, when: the indices are exactly ``0..E-1`` (each once), every member
  spec equals expert 0's except for its name (same shape, bits, groups, symmetry, act-order,
  scale dtype, activation quantization, bias, source scheme), none is already stacked and the
  stacked name is not taken. Otherwise the members stay per-expert layers, with a warning (an
  expert-parallel shard holding experts 8..15 is such a case).
- Loading the stacked layer loads each member with the reader's own ``load`` and stacks the
  canonical tensors along a new dim 0 (:func:`stack_layers`): ``qweight [E, N, K]``, ``scale`` /
  ``zero`` ``[E, N, G]``, ``g_idx [E, K]`` (``k // g`` filled in for members without one),
  ``bias [E, N]``, ``global_scale`` / ``input_scale`` / ``input_zero`` ``[E, 1]``.

Writers that store experts one by one (``--to float``, ``--to modelslim``) split a stacked layer
back with :func:`unstack_spec` / :func:`unstack_layer`, which restore the member names.
"""

from __future__ import annotations

import re
from dataclasses import replace

from npuconv.lazy_torch import torch

from npuconv.model import LinearSpec, QuantizedLinear

EXPERT_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<index>\d+)\.(?P<proj>.+)$")
STACKED_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<proj>\D.*)$")


def stacked_name(prefix: str, proj: str) -> str:
    return f"{prefix}.{proj}"


def stack_expert_specs(specs: list[LinearSpec]) -> tuple[list[LinearSpec], dict[str, list[LinearSpec]], list[str]]:
    """(specs with expert groups stacked, stacked name → member specs in expert order, warnings)."""
    groups: dict[tuple[str, str], dict[int, LinearSpec]] = {}
    duplicate: set[tuple[str, str]] = set()
    for spec in specs:
        found = EXPERT_NAME.match(spec.name)
        if found is None:
            continue
        key = (found["prefix"], found["proj"])
        members = groups.setdefault(key, {})
        index = int(found["index"])
        if index in members:  # "experts.1" and "experts.01": not a clean numbering
            duplicate.add(key)
        members[index] = spec
    names = {spec.name for spec in specs}
    members_of: dict[str, list[LinearSpec]] = {}
    first_member: dict[str, str] = {}  # name of expert 0 → stacked name
    warnings: list[str] = []
    for (prefix, proj), members in groups.items():
        name = stacked_name(prefix, proj)
        reason = _refusal(name, members, names, (prefix, proj) in duplicate)
        if reason:
            if reason != "single":
                warnings.append(f"experts '{prefix}.*.{proj}' kept as separate layers: {reason}")
            continue
        ordered = [members[e] for e in range(len(members))]
        members_of[name] = ordered
        first_member[ordered[0].name] = name
    if not members_of:
        return specs, {}, warnings
    member_names = {m.name for group in members_of.values() for m in group}
    out = []
    for spec in specs:
        if spec.name in first_member:
            name = first_member[spec.name]
            group = members_of[name]
            tensors = tuple(t for member in group for t in member.source_tensors)
            out.append(replace(spec, name=name, num_experts=len(group), source_tensors=tensors))
        elif spec.name not in member_names:
            out.append(spec)
    return out, members_of, warnings


def _refusal(name: str, members: dict[int, LinearSpec], names: set[str], duplicate: bool) -> str | None:
    count = len(members)
    if count < 2:
        return "single"  # one expert (or a one-expert shard): nothing to stack, not worth a warning
    if duplicate or sorted(members) != list(range(count)):
        return f"expert indices {sorted(members)} are not 0..{count - 1}"
    if name in names:
        return f"a layer named '{name}' exists already"
    first = members[0]
    if first.num_experts is not None:
        return "the experts are stacked already"
    for index in range(1, count):
        if replace(members[index], name=first.name) != first:
            return f"expert {index} is not quantized like expert 0 ({members[index].scheme} vs {first.scheme})"
    return None


def stack_layers(spec: LinearSpec, layers: list[QuantizedLinear]) -> QuantizedLinear:
    """The members' canonical tensors stacked along a new dim 0, under the stacked ``spec``."""

    def stacked(field: str) -> torch.Tensor | None:
        values = [getattr(layer, field) for layer in layers]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise ValueError(f"{spec.name}: '{field}' is set on some experts only")
        return torch.stack([v.reshape(-1) if v.numel() == 1 else v for v in values])

    zero = None
    if any(layer.zero is not None for layer in layers):  # a member with zero None is symmetric: its midpoints
        zero = torch.stack([l.zero if l.zero is not None else l.zero_points().to(torch.int16) for l in layers])
    g_idx = None
    if any(layer.g_idx is not None for layer in layers):
        g_idx = torch.stack([l.group_index().to(torch.int32) for l in layers])
    stages = None  # two-stage scales only when every expert has them (else the product scale alone)
    if all(layer.scale_stages is not None for layer in layers):
        stages = tuple(torch.stack([l.scale_stages[i] for l in layers]) for i in range(2))
    weight = {"qweight": torch.stack([layer.qweight for layer in layers])}
    if all(layer.signed is not None for layer in layers):  # stored int8 bytes stay as they are (model.py)
        weight = {"qweight": None, "signed": torch.stack([layer.signed for layer in layers])}
    return QuantizedLinear(
        spec=spec,
        **weight,
        scale=torch.stack([layer.scale for layer in layers]),
        zero=zero,
        g_idx=g_idx,
        bias=stacked("bias"),
        global_scale=stacked("global_scale"),
        input_scale=stacked("input_scale"),
        input_zero=stacked("input_zero"),
        scale_stages=stages,
    )


def member_names(spec: LinearSpec) -> list[str] | None:
    """Per-expert names ``<prefix>.experts.<e>.<proj>`` of a stacked layer named ``<prefix>.experts.<proj>``
    (None: not stacked, or its name has no ``experts.<proj>`` form to split)."""
    if spec.num_experts is None:
        return None
    found = STACKED_NAME.match(spec.name)
    if found is None:
        return None
    return [f"{found['prefix']}.{e}.{found['proj']}" for e in range(spec.num_experts)]


def unstack_spec(spec: LinearSpec) -> list[LinearSpec] | None:
    """The per-expert specs of a stacked layer (None if :func:`member_names` cannot name them)."""
    names = member_names(spec)
    if names is None:
        return None
    return [replace(spec, name=name, num_experts=None, source_tensors=()) for name in names]


def unstack_layer(layer: QuantizedLinear) -> list[QuantizedLinear]:
    """Inverse of :func:`stack_layers`: one canonical layer per expert (views of the stacked tensors)."""
    specs = unstack_spec(layer.spec)
    if specs is None:
        raise ValueError(f"'{layer.spec.name}' is not a stacked expert layer")

    out = []
    for e, spec in enumerate(specs):
        weight = {"qweight": layer.qweight[e]} if layer.signed is None else {"qweight": None, "signed": layer.signed[e]}
        out.append(QuantizedLinear(
            spec=spec,
            **weight,
            scale=layer.scale[e],
            zero=None if layer.zero is None else layer.zero[e],
            g_idx=None if layer.g_idx is None else (layer.g_idx if layer.g_idx.dim() == 1 else layer.g_idx[e]),
            bias=None if layer.bias is None else layer.bias[e],
            global_scale=_per_expert_scalar(layer.global_scale, e),
            input_scale=_per_expert_scalar(layer.input_scale, e),
            input_zero=_per_expert_scalar(layer.input_zero, e),
            scale_stages=None if layer.scale_stages is None else tuple(t[e] for t in layer.scale_stages),
        ))
    return out


def _per_expert_scalar(value: torch.Tensor | None, e: int) -> torch.Tensor | None:
    """``[E, 1]`` → expert e's ``[1]``; a shared ``[1]`` value stays shared."""
    if value is None:
        return None
    if value.numel() == 1:
        return value.reshape(1)
    return value.reshape(value.shape[0], -1)[e].reshape(1)
