"""``verify``: run the NPU kernels on converted tensors and compare with a dequantized reference of the source.

Per layer (streamed, one layer in memory at a time):

1. **layout check** — the converted tensors, decoded back to canonical form by the target's
   reader, dequantize *bit-exactly* to the source layer's dequantization (codes, scales, zero
   points and act-order all round-trip).
2. **kernel check** — seeded random activations ``x`` ``[tokens, K]`` in the model dtype go
   through the kernel the target is written for (``npu_weight_quant_batchmatmul``,
   ``npu_dynamic_quant`` + ``npu_quant_matmul``, ``npu_quantize`` + ``npu_quant_matmul``,
   ``npu_dynamic_mx_quant`` + ``npu_quant_matmul``) on the real ``torch_npu`` ops or their
   emulation, fed with the *stored* tensors. The reference is computed in float64 from the
   **source** checkpoint: ``y_ref = x' @ dequant(source)ᵀ + bias``, where ``x'`` is ``x`` itself
   for weight-only kernels, and the dequantized output of the backend's own activation-quant op
   for W8A8/MX kernels (so the comparison isolates the weights, not activation rounding).

Reference (``VerifyOptions.reference``, :mod:`npuconv.references`): ``npuconv`` dequantizes the
source with npuconv's own reader; ``tool`` with the library that wrote it (compressed-tensors,
msModelSlim), so that a reader bug cannot pass on both sides; ``auto`` uses the tool when it is
importable. The report's ``reference`` (and each layer's) names the one used.

Metrics: max abs error, relative L2 error, cosine similarity. A layer passes when the layout
check holds and ``rel_l2 <= max_rel_l2`` and ``cosine >= min_cosine`` (each target's
:meth:`~npuconv.writers.base.Target.thresholds`, per activation dtype, derived from the rounding
its kernel does: fp16 rounds the dequantized weight to 11 significant bits, bf16 to 8, outputs
are cast to the activation dtype).

The kernel call is the layer's target's :meth:`~npuconv.writers.base.Target.run` (the target
recorded in ``npuconv.json`` for that layer, or for an unconverted checkpoint the target whose
kernel serves the scheme natively, :func:`npuconv.registry.native_target`).

Verdict (``ok``, ``exit_code``): 0 when every checked layer passes and at least one was checked;
1 when a layer fails; 2 when *no* layer could be checked (every layer skipped, e.g. a scheme
without an Ascend kernel): checking nothing is not a pass, and ``error`` says why.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from npuconv.io.checkpoint import Checkpoint, config_dtype
from npuconv.entries import from_storage
from npuconv.errors import InputError, VerificationFailed
from npuconv.model import LinearSpec, QuantizedLinear, dequantize
from npuconv.io.digests import check_shards
from npuconv.io.output import MANIFEST
from npuconv.readers import open_reader
from npuconv.readers.base import Reader
from npuconv.readers.npuconv_output import NpuconvReader
from npuconv.references import ToolMismatch, ToolReference
from npuconv.references import select as select_reference
from npuconv.registry import layer_target, native_target, target_class
from npuconv.runtime import to_backend
from npuconv.io.source import looks_like_hub_id, open_source
from npuconv.writers import Target, WriterOptions
from npuconv.writers.base import MIN_COSINE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyOptions:
    source: str | None = None  # default: the source recorded in npuconv.json
    layers: str | None = None  # glob over layer names, e.g. "*.mlp.*"
    tokens: int = 16
    seed: int = 0
    device: str | None = None  # cpu | cuda | npu; None: best available
    skip_checksum: bool = False
    max_rel_l2: float | None = None  # override every target's threshold
    min_cosine: float | None = MIN_COSINE  # None: each target's (Target.thresholds)
    reference: str = "npuconv"  # npuconv | tool | auto (npuconv.references)

    def __post_init__(self) -> None:
        """Every numeric option in range and finite (InputError naming the option otherwise)."""
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or not 1 <= self.tokens <= MAX_TOKENS:
            raise InputError(f"tokens {self.tokens!r} must be an integer from 1 to {MAX_TOKENS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed {self.seed!r} must be an integer from 0 to 2**64-1")
        if self.max_rel_l2 is not None and not (_finite(self.max_rel_l2) and self.max_rel_l2 > 0):
            raise InputError(f"max_rel_l2 {self.max_rel_l2!r} must be a finite number > 0")
        if not (_finite(self.min_cosine) and -1 <= self.min_cosine <= 1):
            raise InputError(f"min_cosine {self.min_cosine!r} must be a finite number from -1 to 1")


MAX_TOKENS = 65536
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LayerResult:
    name: str
    scheme: str
    kernel: str
    layout_exact: bool | None
    max_abs: float
    rel_l2: float
    cosine: float
    threshold: float
    status: str  # "pass" | "fail" | "skip"
    note: str = ""
    reference: str = "npuconv"  # whose dequantization of the source y_ref was computed from

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def as_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float):
                return round(v, 9) if math.isfinite(v) else None
            return v

        return {**{k: clean(v) for k, v in self.__dict__.items()}, "passed": self.passed}


@dataclass
class _Pairing:
    """How to get each layer's stored kernel tensors (by role) and its manifest entry."""

    output: Reader
    source: Reader
    # (layer as stored in the output, its stored tensors by role if the output holds kernel tensors)
    decode: Callable[[LinearSpec], tuple[QuantizedLinear, dict | None]]
    # (kernel tensors by role, manifest entry, the target that runs them) from the decoded layer and its stored tensors
    kernel_tensors: Callable[[LinearSpec, QuantizedLinear, dict | None], tuple[dict, dict, Target]]
    mode: str


def verify(path: str | Path, options: VerifyOptions, on_layer: Callable[[int, int], None] | None = None) -> dict:
    """Verify OUT (an npuconv output, or any supported checkpoint checked against itself)."""
    from npuconv.kernels import get_backend

    started = time.perf_counter()
    backend = get_backend(options.device)
    output_ckpt = open_source(path)
    check_loadable(output_ckpt)
    output_reader = open_reader(output_ckpt)
    pairing = _pair(output_ckpt, output_reader, options)
    act_dtype = config_dtype(output_ckpt.config) or torch.bfloat16
    if act_dtype == torch.float32:
        act_dtype = torch.bfloat16
    source_specs = {s.name: s for s in pairing.source.linear_specs()}
    tool = select_reference(options.reference, pairing.source)
    specs = [s for s in output_reader.linear_specs() if not options.layers or fnmatch.fnmatchcase(s.name, options.layers)]
    if options.layers and not specs:
        raise InputError(f"--layers {options.layers!r} matches no quantized layer")
    if not specs:
        raise InputError(f"{path}: no quantized layer to verify (a float checkpoint has no NPU kernel to check)")
    generator = torch.Generator().manual_seed(options.seed)
    results = []
    for i, spec in enumerate(specs):
        if spec.name not in source_specs:
            raise InputError(f"layer '{spec.name}' is not a quantized layer of the source {pairing.source.ckpt.source_id}")
        x = torch.randn(options.tokens, spec.in_features, generator=generator).to(act_dtype)
        results.append(_verify_layer(spec, source_specs[spec.name], pairing, backend, x, options, tool))
        log.info("layer %d/%d %s: %s %s", i + 1, len(specs), spec.name, results[-1].status, results[-1].note)
        if on_layer:
            on_layer(i + 1, len(specs))
    order = {"fail": 0, "pass": 1, "skip": 2}
    results.sort(key=lambda r: (order[r.status], -r.rel_l2 if math.isfinite(r.rel_l2) else -math.inf))
    counts = {status: sum(r.status == status for r in results) for status in order}
    verdict = _verdict(counts, results)
    return {
        **verdict,
        "backend": backend.name,
        "mode": pairing.mode,
        "output": str(path),
        "source": pairing.source.ckpt.source_id,
        "reference": tool.name if tool is not None else "npuconv",
        "activation_dtype": str(act_dtype).removeprefix("torch."),
        "tokens": options.tokens,
        "seed": options.seed,
        "layers": [r.as_dict() for r in results],
        "passed": counts["pass"],
        "failed": counts["fail"],
        "skipped": counts["skip"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def check_loadable(checkpoint: Checkpoint) -> None:
    """Open every weight file with the safetensors library, as a serving engine's loader does, and
    check it sees the same tensors (names, shapes) as npuconv; raise VerificationFailed if not."""
    from safetensors import SafetensorError, safe_open

    for path in checkpoint.weight_files:
        try:
            with safe_open(str(path), framework="pt") as f:
                seen = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise VerificationFailed(f"{path.name}: the safetensors library cannot open it: {e}") from None
        ours = {info.name: info.shape for info in checkpoint.tensors.values() if info.path == path}
        if seen != ours:
            raise VerificationFailed(f"{path.name}: the safetensors library reads other tensors than npuconv does")


def _verdict(counts: dict[str, int], results: list[LayerResult]) -> dict:
    """``ok``, ``exit_code`` and (when not ok) ``error`` of a verification (see the module docstring)."""
    if counts["fail"]:
        return {"ok": False, "exit_code": 1, "error": f"{counts['fail']} of {counts['fail'] + counts['pass']} checked layers failed"}
    if not counts["pass"]:
        reasons = sorted({r.note.removeprefix("skipped: ") for r in results if r.status == "skip"})
        return {
            "ok": False,
            "exit_code": 2,
            "error": f"nothing could be checked: all {counts['skip']} layers were skipped ({'; '.join(reasons)})",
        }
    return {"ok": True, "exit_code": 0}


# ------------------------------------------------------------------------------------- pairing
def _pair(output_ckpt: Checkpoint, output_reader: Reader, options: VerifyOptions) -> _Pairing:
    if isinstance(output_reader, NpuconvReader):
        manifest = output_reader.manifest
        if not options.skip_checksum:
            check_shards(output_ckpt.root, manifest)
        source = source_reader(manifest, options.source)

        def decode(spec: LinearSpec) -> tuple[QuantizedLinear, dict]:
            stored = output_reader.tensors_of(spec)  # read once: decoded for the layout check, run as is
            return output_reader.target_of(spec).read_layer(spec, stored), stored

        def stored_tensors(spec: LinearSpec, _layer: QuantizedLinear, stored: dict | None) -> tuple[dict, dict, Target]:
            entry = manifest["layers"][spec.name]
            return stored, entry, layer_target(manifest, entry)

        return _Pairing(output_reader, source, decode, stored_tensors, "converted")

    # any other checkpoint: an npuconv output in a foreign format (e.g. --to modelslim, whose
    # npuconv.json records the source), a checkpoint given with --source, or one checked alone
    manifest = output_ckpt.read_json(MANIFEST) or {}
    if manifest.get("shards") and not options.skip_checksum:
        check_shards(output_ckpt.root, manifest)
    source_id = options.source or (manifest.get("source") or {}).get("id")
    source = open_reader(_open_recorded_source(source_id, explicit=bool(options.source))) if source_id else output_reader

    def decode(spec: LinearSpec) -> tuple[QuantizedLinear, None]:
        return output_reader.load(spec), None

    def in_memory(spec: LinearSpec, layer: QuantizedLinear, _stored: dict | None) -> tuple[dict, dict, Target]:
        native = native_target(spec)
        if native is None:
            raise _Skip(f"no Ascend kernel for {spec.scheme}")
        target = type(native)(WriterOptions(nz=False))
        reason = target.accepts(spec)
        if reason:
            raise _Skip(f"{target.name}: {reason}")
        entry = target.layer_manifest(spec)
        stored = target.write_layer(layer)
        tensors = {role: from_storage(stored[e["name"]], e) for role, e in entry["tensors"].items()}
        return tensors, entry, target

    return _Pairing(output_reader, source, decode, in_memory, "paired" if source_id else "source")


def source_reader(manifest: dict, source: str | None = None) -> Reader:
    """The reader of an npuconv output's source (``source``, else the one its manifest records); a
    float source has its linears quantized as the conversion did (npuconv.offline)."""
    source_id = source or (manifest.get("source") or {}).get("id")
    if not source_id:
        raise InputError(f"{MANIFEST} names no source; pass --source MODEL")
    reader = open_reader(_open_recorded_source(source_id, explicit=bool(source)))
    recipe = target_class(manifest["target"]).offline_recipe
    if recipe is not None:
        reader.quantize_float_linears(recipe)
    return reader


def _open_recorded_source(source_id: str, explicit: bool) -> Checkpoint:
    """The source to compare with; a recorded one (not ``explicit``ly given) that is gone asks for ``--source``."""
    if explicit:
        return open_source(source_id)
    if not looks_like_hub_id(source_id) and not Path(source_id).exists():
        raise InputError(f"source {source_id} (recorded in {MANIFEST}) not found; pass --source MODEL")
    try:
        return open_source(source_id)
    except InputError as e:
        raise InputError(f"{e}; or pass --source MODEL") from None



class _Skip(Exception):
    pass


# ------------------------------------------------------------------------------------- per layer
def _verify_layer(spec, source_spec, pairing: _Pairing, backend, x, options: VerifyOptions,
                  tool: ToolReference | None = None) -> LayerResult:
    device = backend.device if backend.name != "npu" else "cpu"  # where the reference is computed
    source_layer = pairing.source.load(source_spec)
    output_layer, stored = (source_layer, None) if pairing.mode == "source" else pairing.decode(spec)
    exact = None if pairing.mode == "source" else same_weights(output_layer.to(device), source_layer.to(device))
    try:
        tensors, entry, target = pairing.kernel_tensors(spec, output_layer, stored)
    except _Skip as skip:
        status = "fail" if exact is False else "skip"
        return LayerResult(spec.name, spec.scheme, "-", exact, math.nan, math.nan, math.nan, math.nan, status, f"skipped: {skip}")
    kernel = entry["kernel"]
    moved = {role: to_backend(t, entry["tensors"][role], backend) for role, t in tensors.items()}
    y, x_effective = target.run(backend, entry, spec, moved, x.to(backend.device))
    try:
        tool_weight = tool.weight(source_spec) if tool is not None else None
    except ToolMismatch as mismatch:
        return LayerResult(spec.name, spec.scheme, kernel, exact, math.nan, math.nan, math.nan, math.nan, "fail",
                           f"tool reference: {mismatch}", tool.name)
    y_ref = reference_output(source_layer.to(device), x_effective, tool_weight)
    max_abs, rel_l2, cosine = compare(y.double().cpu(), y_ref)
    limits = target.thresholds(entry, x.dtype)
    threshold = options.max_rel_l2 if options.max_rel_l2 is not None else limits.max_rel_l2
    min_cosine = options.min_cosine if options.min_cosine is not None else limits.min_cosine
    passed = bool(exact is not False and rel_l2 <= threshold and cosine >= min_cosine)
    note = "" if exact is not False else "decoded layout differs from the source"
    if tool is not None and tool_weight is None:
        note = "; ".join(filter(None, [note, f"{tool.name} has no dequantization for {spec.scheme}: npuconv reference"]))
    reference = tool.name if tool_weight is not None else "npuconv"
    return LayerResult(spec.name, spec.scheme, kernel, exact, max_abs, rel_l2, cosine, threshold,
                       "pass" if passed else "fail", note, reference)


def same_weights(a: QuantizedLinear, b: QuantizedLinear) -> bool:
    """The layout check: identical canonical tensors, or (for a foreign output format that stores
    scales in another dtype, e.g. ModelSlim's float32) bit-identical float32 dequantizations."""
    return same_canonical(a, b) or torch.equal(dequantize(a), dequantize(b))


def same_canonical(a: QuantizedLinear, b: QuantizedLinear) -> bool:
    """True when two layers have identical codes, scales, zero points, group assignment and global scale.

    Compared on the canonical tensors themselves (bytes, not dequantized floats): cheap, and it is
    the literal "decodes back to the source codes, scales and zeros" check. Representations that
    differ but mean the same (``zero=None`` vs explicit midpoints, ``g_idx=None`` vs ``k // g``)
    compare equal.
    """
    if a.qweight.shape != b.qweight.shape or a.scale.shape != b.scale.shape:
        return False
    if not torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8)):
        return False
    if not torch.equal(a.effective_scale(), b.effective_scale()):
        return False
    if not torch.equal(a.zero_points(), b.zero_points()):
        return False
    return torch.equal(a.group_index(), b.group_index())


def reference_output(layer: QuantizedLinear, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(layer)ᵀ + bias`` in float64 from the float32 dequantization (exact for every
    supported format) with a float32 matmul: its relative error (~1e-6) is far below every threshold.
    A stacked MoE layer (weight ``[E, N, K]``) gives ``[E, M, N]``: every token through every expert.
    ``weight`` (float32, the layer's shape): a tool's dequantization used instead of npuconv's."""
    weight = dequantize(layer, torch.float32) if weight is None else weight.to(x.device, torch.float32)
    y = (x.to(weight.device, torch.float32) @ weight.transpose(-1, -2)).double()
    if layer.bias is not None:
        bias = layer.bias.double()
        y = y + (bias.unsqueeze(-2) if layer.spec.num_experts is not None else bias)
    return y.cpu()


def compare(y: torch.Tensor, y_ref: torch.Tensor) -> tuple[float, float, float]:
    """(max |y - y_ref|, ||y - y_ref|| / ||y_ref||, cosine(y, y_ref)); NaN/inf give inf/-1."""
    if not torch.isfinite(y).all():
        return math.inf, math.inf, -1.0
    diff = y - y_ref
    ref_norm = y_ref.norm().item()
    rel = diff.norm().item() / ref_norm if ref_norm else diff.norm().item()
    cosine = torch.nn.functional.cosine_similarity(y.flatten(), y_ref.flatten(), dim=0).item()
    return diff.abs().max().item(), rel, cosine
