"""``--to npu`` (the default of ``convert``): every layer to its natural NPU target, in one output.

For mixed-precision checkpoints — msModelSlim's common recipe (W8A8_DYNAMIC attention +
W4A8_DYNAMIC MLP), llm-compressor recipes with a scheme per layer group — no single ``npu-*``
target takes every layer. This target picks one per layer (:meth:`NpuTarget.choose`):

1. the targets whose kernel serves the layer's scheme as it is (``Target.native_rank``, lower
   first: ``npu-w4a8`` 10, ``npu-w4a4`` 20, ``npu-w8a8`` 30, ``npu-int8`` 40, ``npu-int4`` 50,
   ``npu-mxfp8`` 60, ``npu-mxfp4`` 70): the first whose ``serves(spec)`` holds and that accepts
   the layer with this conversion's options. So 4-bit weight-only → ``npu-int4``, 8-bit weight-only
   → ``npu-int8``, W8A8 (static or dynamic, per-channel symmetric) → ``npu-w8a8``, W4A8 dynamic
   (per-channel or group 256) → ``npu-w4a8``, W4A4 dynamic per-channel → ``npu-w4a4``, MX → MX;
   a layer whose activation-quantized kernel refuses it (W4A4 or W4A8 per group 32, W8A8
   asymmetric or per group) falls through to the weight-only kernel of its weight bits, with a
   warning that its activations are no longer quantized;
2. else any other NPU kernel target that accepts it, in registration order (``npu-mxfp4-dual``
   for the dual-level FP4 layers of an earlier offline quantization).

A layer no NPU target takes (NVFP4, FP8 per-tensor static, …) is refused, like any target refuses
a layer: the conversion lists every such layer and the targets that would take the whole model.

The output is one checkpoint. Each layer's ``npuconv.json`` entry is written by its own target
and records it (``"target": "npu-w8a8"``); the top-level ``target`` is ``"npu"``. Reading a layer
back, its kernel call and its tensor-parallel split go through the layer's own target
(:func:`npuconv.registry.layer_target`), so ``verify``, :mod:`npuconv.runtime` and the engine
integrations handle a mixed output without knowing it is one.

Float tensors pass through unchanged. A model without any quantized layer is written as
``npu-float`` writes it (MoE expert weights as FRACTAL_NZ tiles; every linear with ``--nz``).
"""

from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.io.safetensors_io import TensorInfo, TensorPlan
from npuconv.writers.base import Target, Thresholds

#: registered targets never chosen per layer (a float layout, a foreign format, this one)
NOT_PER_LAYER = ("npu", "npu-float", "float", "modelslim")
WEIGHT_ONLY_KERNEL = "npu_weight_quant_batchmatmul"


class NpuTarget(Target):
    name = "npu"
    summary = "each layer to its natural NPU target (mixed precision in one output)"

    def __init__(self, options=None):
        super().__init__(options)
        self._targets: dict[str, Target] = {}  # target name → the instance used for every layer
        self._choice: dict[LinearSpec, Target | None] = {}
        self._float: Target | None = None  # npu-float, when the model has no quantized layer
        # (scheme, chosen target) → [layer count, reasons of the activation-quantized targets that refused]
        self._dropped: dict[tuple[str, str], list] = {}

    # ------------------------------------------------------------------ the choice
    def _target(self, name: str) -> Target:
        if name not in self._targets:
            from npuconv.registry import get_target

            self._targets[name] = get_target(name, self.options)
        return self._targets[name]

    def candidates(self) -> list[str]:
        """Target names in the order :meth:`choose` tries them (see the module docstring)."""
        from npuconv.registry import target_class, target_names

        names = [n for n in target_names() if n not in NOT_PER_LAYER]
        native = sorted((n for n in names if target_class(n).native_rank is not None), key=lambda n: target_class(n).native_rank)
        return native + [n for n in names if n not in native]

    def choose(self, spec: LinearSpec) -> Target | None:
        """The target that writes this layer, or None when no NPU target takes it."""
        if spec not in self._choice:
            chosen = None
            for name in self.candidates():
                target = self._target(name)
                native = type(target).native_rank is not None
                if (not native or target.serves(spec)) and target.accepts(spec) is None:
                    chosen = target
                    break
            self._choice[spec] = chosen
        return self._choice[spec]

    def prepare(self, specs: list[LinearSpec]) -> None:
        """Choose every layer's target before planning; a model without quantized layers is npu-float's."""
        if not specs:
            self._float = self._target("npu-float")
        for spec in specs:
            target = self.choose(spec)
            if target is not None and spec.activation is not None and target.describe_layer(spec).get("kernel") == WEIGHT_ONLY_KERNEL:
                entry = self._dropped.setdefault((spec.scheme, target.name), [0, self._refusals(spec, target)])
                entry[0] += 1
        for (scheme, name), (count, reasons) in self._dropped.items():
            self.warn(
                f"{count} {scheme} layer(s) written for {name}, a weight-only kernel: their activations are not "
                f"quantized, as no activation-quantized NPU kernel takes them ({reasons})"
            )

    def _refusals(self, spec: LinearSpec, chosen: Target) -> str:
        """Why each target tried before ``chosen`` refused the layer (``name: reason; …``)."""
        reasons = []
        for name in self.candidates():
            if name == chosen.name:
                break
            reason = self._target(name).accepts(spec)
            reasons.append(f"{name}: {reason}" if reason else f"{name}: its kernel does not serve {spec.scheme}")
        return "; ".join(reasons)

    def choices(self, specs: list[LinearSpec]) -> dict[str, int]:
        """Layers per chosen target, in candidate order (what the summary prints)."""
        counts: dict[str, int] = {}
        for spec in specs:
            target = self.choose(spec)
            if target is not None:
                counts[target.name] = counts.get(target.name, 0) + 1
        order = self.candidates()
        return dict(sorted(counts.items(), key=lambda item: order.index(item[0])))

    # ------------------------------------------------------------------ what it takes
    def accepts(self, spec: LinearSpec) -> str | None:
        if self.choose(spec) is not None:
            return None
        served = [n for n in self.candidates() if type(self._target(n)).native_rank is not None and self._target(n).serves(spec)]
        if served:
            return f"{served[0]}: {self._target(served[0]).accepts(spec)}"
        return "no Ascend NPU kernel takes this scheme"

    # ------------------------------------------------------------------ plan and write: the layer's own target
    def _of(self, spec: LinearSpec) -> Target:
        target = self.choose(spec)
        if target is None:
            raise ValueError(f"{spec.name}: {self.accepts(spec)}")
        return target

    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        return self._of(spec).tensor_entries(spec)

    def plan_layer(self, spec: LinearSpec) -> list[TensorPlan]:
        return self._of(spec).plan_layer(spec)

    def production_cost(self, spec: LinearSpec, output_bytes: int) -> int:
        return self._of(spec).production_cost(spec, output_bytes)

    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        return self._of(layer.spec).write_layer(layer)

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        return self._of(spec).read_layer(spec, tensors)

    def describe_layer(self, spec: LinearSpec) -> dict:
        return self._of(spec).describe_layer(spec)

    def layer_manifest(self, spec: LinearSpec) -> dict:
        return self._of(spec).layer_manifest(spec)  # records the layer's own target

    def plan_passthrough(self, info: TensorInfo) -> TensorPlan:
        return self._float.plan_passthrough(info) if self._float else super().plan_passthrough(info)

    def write_passthrough(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self._float.write_passthrough(name, tensor) if self._float else tensor

    def extra_files(self, manifest: dict) -> dict[str, object]:
        files: dict[str, object] = {}
        for target in self._used():
            files.update(target.extra_files(manifest))
        return files

    def _used(self) -> list[Target]:
        used = {id(t): t for t in self._choice.values() if t is not None}
        if self._float is not None:
            used[id(self._float)] = self._float
        return list(used.values())

    @property
    def warnings(self) -> list[str]:
        """This target's warnings, then those of the targets it delegated to."""
        out = list(self._own_warnings)
        for target in self._used():
            out += [w for w in target.warnings if w not in out]
        return out

    @warnings.setter
    def warnings(self, value: list[str]) -> None:
        self._own_warnings = list(value)

    def warn(self, message: str) -> None:
        if message not in self._own_warnings:
            self._own_warnings.append(message)

    # ------------------------------------------------------------------ per layer: the entry's own target
    def _entry_target(self, entry: dict) -> Target:
        from npuconv.registry import layer_target

        return layer_target({"options": {"mx_layout": self.options.mx_layout}}, entry)

    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        return self._entry_target(entry).run(backend, entry, spec, tensors, x, tp=tp, group_list=group_list)

    def thresholds(self, entry: dict, activation_dtype: torch.dtype) -> Thresholds:
        return self._entry_target(entry).thresholds(entry, activation_dtype)

    def split(self, role: str, tensor: torch.Tensor, entry: dict, spec: LinearSpec, rank: int, world: int, parallel: str):
        return self._entry_target(entry).split(role, tensor, entry, spec, rank, world, parallel)
