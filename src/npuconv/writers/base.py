"""The Target: everything npuconv knows about one output layout, in one class.

A target owns, for the canonical layers (:class:`~npuconv.model.QuantizedLinear`) it accepts:

- **what it takes** — :meth:`Target.accepts` (None, or a one-line reason it cannot take a layer);
  :meth:`Target.serves` / ``native_rank`` (the kernel engines run for a scheme as it is: what
  ``verify`` uses on unconverted checkpoints);
- **planning and writing** — :meth:`tensor_entries` (the layer's tensors by role as ``npuconv.json``
  entries), :meth:`plan_layer`, :meth:`write_layer`, :meth:`layer_manifest`;
- **reading back** — :meth:`read_layer`, the inverse of :meth:`write_layer` (the layout check);
- **the kernel call** — :meth:`run`, called by ``verify``, :mod:`npuconv.runtime` and the engine
  integrations, exactly as the engines call the torch_npu ops;
- **verify thresholds** — :meth:`thresholds`;
- **tensor parallelism** — the ``"split"`` field of each tensor entry and :meth:`split`.

Targets are registered by name in :mod:`npuconv.registry`; adding one = one module + one line there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

from npuconv.lazy_torch import torch

from npuconv.entries import entry_plan, nd_shape_of_storage
from npuconv.errors import InputError
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.io.publish import MANIFEST
from npuconv.parallel import COLUMN, ROW
from npuconv.io.safetensors_io import TensorInfo, TensorPlan, name_of

#: verify's default minimum cosine similarity, every kernel
MIN_COSINE = 0.9999
#: verify's rel-L2 limits of kernels that quantize activations (int8/int4/MX), per activation dtype
QUANT_REL_L2 = {"float16": 5e-3, "bfloat16": 1e-2}



@dataclass(frozen=True)
class WriterOptions:
    """Target options shared by all targets (each uses what applies to it)."""

    dtype: torch.dtype | None = None  # float target: output dtype of dequantized weights
    nz: bool | None = None  # FRACTAL_NZ storage; None: the target's default
    mx_layout: str = "vllm-ascend"  # MX targets: "vllm-ascend" (contiguous [K,N]) or "sglang" ([N,K] storage)
    model_dtype: torch.dtype | None = None  # activation dtype of the model (config.json torch_dtype)


class Thresholds(NamedTuple):
    """A layer passes ``verify`` when ``rel_l2 <= max_rel_l2`` and ``cosine >= min_cosine``."""

    max_rel_l2: float
    min_cosine: float = MIN_COSINE


class Target:
    """Base class of the per-target classes (see the module docstring for what a target owns).

    A target first *plans* each layer (names, dtypes, shapes of the tensors it will write, from the
    :class:`LinearSpec` alone), then *writes* it from the loaded canonical layer. Planning is also
    where kernel limits are checked, so a conversion fails before it writes anything.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    weight_prefix: ClassVar[str] = "model"
    #: preference among the targets whose kernel serves a scheme natively (lower first; None: never)
    native_rank: ClassVar[int | None] = None
    #: how this target quantizes the linears of a float checkpoint (:class:`npuconv.offline.Recipe`), or None
    offline_recipe: ClassVar[object] = None
    #: working bytes of one layer's production per weight (E·N·K) on top of twice its output bytes:
    #: the reader's unpacked codes and the target's temporaries, at their peak (the producer queue's
    #: cost, :meth:`production_cost`). Measured per target, worst reader, by benchmarks/unit_peak.py;
    #: targets not measured there keep this default (a float32 copy of the weight)
    working_bytes_per_weight: ClassVar[float] = 4.0
    #: working bytes of one layer's production independent of its size (e.g. dequantization chunks)
    working_bytes_fixed: ClassVar[int] = 0

    def __init__(self, options: WriterOptions | None = None):
        self.options = options or WriterOptions()
        self.warnings: list[str] = []

    @classmethod
    def for_layer(cls, manifest: dict, entry: dict) -> Target:
        """The instance that reads back and runs one layer of an npuconv output: the output's recorded
        ``options.mx_layout`` (a layer entry's own ``mx_layout`` wins), everything else default."""
        options = manifest.get("options") or {}
        mx_layout = entry.get("mx_layout") or options.get("mx_layout") or "vllm-ascend"
        return cls(WriterOptions(mx_layout=mx_layout))

    # ------------------------------------------------------------------ what it takes
    def accepts(self, spec: LinearSpec) -> str | None:
        """None if this target can take the layer, else a one-line reason."""
        return None

    def prepare(self, specs: list[LinearSpec]) -> None:
        """Called once with every quantized layer of the model before any is checked or planned
        (default: nothing). A target that decides per layer (``npu``) makes its choices here."""

    def serves(self, spec: LinearSpec) -> bool:
        """True when this target's kernel is the one the engines run for a layer of this scheme as it
        is (no activation quantization added or changed): ``verify`` of an unconverted checkpoint runs
        it (:func:`npuconv.registry.native_target`). Only targets with a ``native_rank`` are asked."""
        return False

    # ------------------------------------------------------------------ plan and write
    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        """The layer's tensors by role, as ``npuconv.json`` entries (:func:`npuconv.entries.tensor_entry`)."""
        raise NotImplementedError

    def plan_layer(self, spec: LinearSpec) -> list[TensorPlan]:
        """What :meth:`write_layer` will write, in order (default: from :meth:`tensor_entries`)."""
        return [entry_plan(entry) for entry in self.tensor_entries(spec).values()]

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        """The layer's output tensors by output tensor name (as planned)."""
        raise NotImplementedError

    def production_cost(self, spec: LinearSpec, output_bytes: int) -> int:
        """Bytes one layer holds at its peak while read and written (:meth:`write_layer`), source,
        temporaries and output together: ``2 * output_bytes`` + the working bytes
        (:attr:`working_bytes_per_weight`, :attr:`working_bytes_fixed`). The producer queue
        (:func:`npuconv.io.output.write_shards`) admits layers within a byte budget by this cost."""
        weights = math.prod(spec.batch_shape) * spec.out_features * spec.in_features
        return 2 * output_bytes + math.ceil(weights * self.working_bytes_per_weight) + self.working_bytes_fixed

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        """Inverse of :meth:`write_layer`: ND tensors by manifest role → canonical layer."""
        raise NotImplementedError(f"{self.name} outputs cannot be read back")

    def describe_layer(self, spec: LinearSpec) -> dict:
        """Target-specific fields of the layer's ``npuconv.json`` entry (scheme, kernel, tensors by role)."""
        return {}

    def layer_manifest(self, spec: LinearSpec) -> dict:
        """Per-layer entry of ``npuconv.json``: ``{"target": name, **describe_layer(spec)}``."""
        return {"target": self.name, **self.describe_layer(spec)}

    def plan_passthrough(self, info: TensorInfo) -> TensorPlan:
        return TensorPlan(info.name, info.dtype, info.shape)

    def write_passthrough(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def update_config(self, config: dict, manifest: dict) -> dict:
        """config.json of the output: ``quantization_config = {"quant_method": "npuconv", …}``.

        Targets that produce a format of their own (float, modelslim) override this.
        """
        config = dict(config)
        config["quantization_config"] = {
            "quant_method": "npuconv",
            "target": manifest.get("target", self.name),
            "manifest": MANIFEST,
            "npuconv_version": manifest["npuconv_version"],
        }
        return config

    def extra_files(self, manifest: dict) -> dict[str, object]:
        """Additional JSON side files, filename → JSON value."""
        return {}

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # ------------------------------------------------------------------ the kernel call
    def run(
        self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
        group_list: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Call the layer's kernel as the engines do: returns ``(y, x_effective)``.

        ``backend``: :mod:`npuconv.kernels` (real torch_npu or the emulation); ``entry``: the layer's
        ``npuconv.json`` entry; ``tensors``: its stored tensors by role, ND (NZ undone, still packed),
        on the backend's device (:func:`npuconv.runtime.to_backend`); ``x`` ``[..., K]`` in the model
        dtype. ``x_effective`` is what the reference must multiply: ``x`` itself for weight-only
        kernels, the dequantized output of the kernel's own activation quantization otherwise.
        A stacked MoE layer (``spec.num_experts = E``) gives ``y`` ``[E, *x.shape[:-1], N]`` (every token
        through every expert: what ``verify`` checks) — or, **routed**, with ``group_list`` int64 ``[E]``
        (tokens per expert, ``group_list_type=1``; ``x`` ``[M, K]`` with its rows sorted by expert, the
        first ``group_list[0]`` rows for expert 0 and so on, ``M = sum(group_list)``): ``y`` ``[M, N]``,
        row ``i`` through its own expert only, and ``x_effective`` ``[M, K]`` (activation scales stay per
        routed row). The routed form is what a serving engine runs after its expert selection: one
        ``npu_grouped_matmul`` where the target's engine kernel is grouped, else the dense kernel on
        each expert's rows (:meth:`run_experts`).
        ``tp``: see the targets whose kernel tensors depend on tensor parallelism (W4A8).
        """
        raise NotImplementedError(f"{self.name} has no NPU kernel")

    def run_experts(self, backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor,
                    group_list: torch.Tensor | None = None):
        """A stacked expert layer (tensors ``[E, ...]``) through the dense kernel one expert at a time.
        A tensor is per-expert when it has ≥ 2 dims and E leading. Without ``group_list``: every token
        through every expert, ``y`` ``[E, *x.shape[:-1], N]``; the second value is the activations the
        reference must use: ``[*x.shape[:-1], K]``, or ``[E, ..., K]`` when they differ per expert
        (static input scales). Routed (``group_list``: tokens per expert, ``x`` ``[M, K]`` sorted by
        expert): each expert's rows through its tensors, ``y`` ``[M, N]`` and ``x_effective`` ``[M, K]``."""
        experts = spec.num_experts
        dense = replace(spec, num_experts=None)
        outputs, activations = [], []
        counts = None if group_list is None else [int(c) for c in group_list.tolist()]
        start = 0
        for e in range(experts):
            rows = x if counts is None else x[start:start + counts[e]]
            if counts is not None:
                start += counts[e]
                if not counts[e]:
                    continue
            t_e = {role: v[e] if v.dim() >= 2 and v.shape[0] == experts else v for role, v in t.items()}
            y_e, x_e = self.run(backend, entry, dense, t_e, rows)
            outputs.append(y_e)
            activations.append(x_e)
        if counts is not None:
            return _routed_cat(outputs, x, spec.out_features), _routed_cat(activations, x, x.shape[-1])
        same = all(torch.equal(activations[0], a) for a in activations[1:])
        return torch.stack(outputs), activations[0] if same else torch.stack(activations)

    def thresholds(self, entry: dict, activation_dtype: torch.dtype) -> Thresholds:
        """verify's pass limits for a layer of this target at this activation dtype (derived from the
        rounding each kernel does: fp16 keeps 11 significant bits, bf16 8; outputs are cast to the
        activation dtype). Default: a kernel that quantizes its activations."""
        return Thresholds(QUANT_REL_L2[name_of(activation_dtype)])

    # ------------------------------------------------------------------ tensor parallelism
    def split(
        self, role: str, tensor: torch.Tensor, entry: dict, spec: LinearSpec, rank: int, world: int, parallel: str
    ) -> torch.Tensor:
        """Rank ``rank``'s share of one stored tensor under ``world``-way tensor parallelism.

        ``tensor``: the tensor of ``role`` in its ND form (NZ tiles undone: :func:`npuconv.entries.from_storage`;
        packing kept); ``entry``: its ``npuconv.json`` tensor entry, whose ``"split"`` names the axis
        holding output features (``"n"``) and input features (``"k"``), or null; ``parallel``:
        ``"column"`` splits N, ``"row"`` splits K. A tensor without the axis is replicated (a
        ``bias`` added by the kernel goes to rank 0 only under row parallelism, zeros elsewhere, as
        the engines' RowParallelLinear adds it once). Along the axis the rank gets the contiguous
        ``1/world`` slice; the split is exact only when the axis covers the feature exactly
        (``length · unit == features``, ``unit`` = features per stored element along it:
        :meth:`split_unit`) and each rank's features are whole units; anything else is an
        :class:`InputError` with the reason (never a wrong shard).
        """
        if parallel not in (COLUMN, ROW):
            raise ValueError(f"parallel must be 'column' or 'row', not {parallel!r}")
        if not 0 <= rank < world:
            raise InputError(f"rank {rank} is outside a world of {world}")
        where = f"{spec.name}: {role}"
        if entry.get("layout") == "nz" and list(tensor.shape) == list(entry["storage_shape"]) != list(_nd_shape(entry)):
            raise InputError(f"{where} is FRACTAL_NZ storage; split it in ND (undo the tiles first)")
        if world == 1:
            return tensor
        axis = (entry.get("split") or {}).get("n" if parallel == COLUMN else "k")
        if axis is None:
            if role == "bias" and parallel == ROW:
                return tensor if rank == 0 else torch.zeros_like(tensor)
            return tensor
        features = spec.out_features if parallel == COLUMN else spec.in_features
        return split_axis(tensor, axis, features, self.split_unit(role, entry, spec, axis, parallel), rank, world, where)

    def split_spec(self, spec: LinearSpec, world: int, parallel: str) -> LinearSpec:
        """The spec of one rank's share of the layer (N or K divided by ``world``), what :meth:`run` takes
        with the tensors of :meth:`split`."""
        if parallel == COLUMN:
            return replace(spec, out_features=spec.out_features // world)
        return replace(spec, in_features=spec.in_features // world)

    def split_unit(self, role: str, entry: dict, spec: LinearSpec, axis: int, parallel: str) -> int:
        """Features (of N or K) per stored element along ``axis``: the packing factor
        ``shape[axis] / storage ND shape[axis]`` (8 for int4pack, 2 for FP4 pairs, else 1).
        Targets override it for scale tensors (a group scale: the group size)."""
        return int(entry["shape"][axis]) // int(_nd_shape(entry)[axis])


def _routed_cat(pieces: list[torch.Tensor], x: torch.Tensor, width: int) -> torch.Tensor:
    """Routed rows of the experts, in order (``[0, width]`` when no row was routed)."""
    return torch.cat(pieces) if pieces else x.new_zeros(0, width)


def _nd_shape(entry: dict) -> list[int]:
    """The stored dtype's ND shape of a tensor entry (= ``storage_shape`` unless NZ)."""
    if entry.get("layout") != "nz":
        return list(entry["storage_shape"])
    return nd_shape_of_storage(entry)


def split_axis(tensor: torch.Tensor, axis: int, features: int, unit: int, rank: int, world: int, where: str) -> torch.Tensor:
    """The ``rank``-th of ``world`` contiguous slices of ``tensor`` along ``axis``, where each element
    along the axis stands for ``unit`` consecutive features of ``features``; refuses inexact splits."""
    length = tensor.shape[axis]
    if length * unit != features:
        raise InputError(f"{where}: axis {axis} ({length} × {unit}) does not cover the {features} features exactly")
    if features % world or (features // world) % unit:
        raise InputError(f"{where}: {features} features do not split into {world} ranks of whole {unit}-feature units")
    size = length // world
    return tensor.narrow(axis, rank * size, size).contiguous()

