"""Whole-model parity (``npuconv verify OUT --model``): the converted model end to end against its source.

Per-layer ``verify`` proves each converted linear; it cannot see a mistake outside them (a copied
tensor under the wrong name, a dropped bias, embeddings tied or untied, a ``config.json`` edit
that changes the architecture, a tokenizer left behind). This module builds two models with
``transformers`` (the optional extra ``npuconv[model]``) and compares their logits:

- **converted** — the architecture of OUT's ``config.json`` (its ``quantization_config`` dropped),
  in OUT's activation dtype (``config_dtype``; float32 → bfloat16, as ``verify``). Every converted
  linear runs its NPU kernel through :meth:`npuconv.runtime.NpuLinear.forward` (real ``torch_npu``
  or the emulation), every expert stack through the same call (:class:`KernelExperts`), and every
  other tensor is OUT's, by the name transformers maps it to (its own checkpoint renamings, e.g.
  Mixtral ``block_sparse_moe`` → ``mlp``).
- **reference** — the architecture of the *source's* ``config.json`` in float32, its quantized
  linears dequantized exactly to float32 (:func:`npuconv.model.dequantize`, the reference ``verify``
  uses; expert stacks fused into transformers' ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``
  by the model's own conversion rule), every other tensor the source's, upcast to float32.

Structural checks run before any compute and each one found is a failure: a parameter of the
converted model with no tensor in OUT (run as zeros), a tensor of OUT the model does not use
(unless the source's model leaves the same name unused), a shape that differs, a converted layer
with a bias its module does not have (dropped at run time) or the reverse (zeros), and prompts
that OUT's tokenizer encodes differently from the source's.

Inputs: a few fixed prompts (or ``--prompts FILE``, one per line) through OUT's tokenizer; without
a usable tokenizer (none, or one that maps most of the text to its unknown token) seeded token ids,
and the report says so. Prompts are right-padded into one batch with no attention mask: attention
is causal, so no real position sees a pad and pad positions are ignored.

Metrics over every prompt position: top-1 agreement, max |Δlogit| (absolute, and relative to the
RMS of the reference logits, both centred per position since softmax ignores a shift), mean
KL(ref ‖ out). Then the reference greedy-decodes ``new_tokens`` tokens and the converted model is
run once on the reference's sequences: its greedy choice at each step is the argmax given the
same prefix, so the first step where it differs is exactly the first divergence of two
independent greedy decodes. A divergence fails only when the reference's top-1 margin there
exceeds twice the allowed max |Δlogit| (a near-tie may flip under any rounding).

Memory: both models are built on the meta device; everything outside the decoder layers
(embeddings, final norm, lm_head, rotary tables) is loaded once, and each decoder layer is
materialized by a forward pre-hook and (streamed) dropped again after its forward, so one layer of
each model is in memory at a time. The converted model runs one forward pass, so it always
streams; the reference runs ``new_tokens`` passes and stays resident when its float32 weights fit
in 60% of the free memory of its device (``stream=True`` forces streaming).

MoE: like ``verify``, an expert stack's kernel runs every token through every expert of gate/up
(``[E, T, N]``) and the routed rows through every expert of down, then keeps each token's routed
experts — the same kernel call as the runtime loader, at E× the routed cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from npuconv.io.checkpoint import Checkpoint, config_dtype
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import FP4_E2M1, LinearSpec, dequantize
from npuconv.readers import open_reader
from npuconv.readers.base import Reader
from npuconv.experts import STACKED_NAME
from npuconv.readers.npuconv_output import NpuconvReader
from npuconv.runtime import NpuLinear, load_layer
from npuconv.io.source import open_source

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Quantization maps floating-point weights to a small set of integer codes, so that",
    "In 1969, the first humans to walk on the Moon were",
)
SEEDED_PROMPTS, SEEDED_LENGTH = 4, 16
UNKNOWN_FRACTION = 0.5  # a tokenizer that maps more of the prompt text than this to its unk token is unusable
RESIDENT_FRACTION = 0.6  # of the free memory of the reference's device


@dataclass(frozen=True)
class Thresholds:
    """Pass limits: every one must hold."""

    min_top1: float  # top-1 agreement over all prompt positions
    max_kl: float  # mean KL(ref ‖ out) per position, nats
    max_logit_diff: float  # max |Δlogit| (centred) / RMS of the centred reference logits


# By kernel family: every converted layer weight-only ("weight_only"), or the coarsest activation
# quantization of any layer — 8-bit (int8 dynamic/static, MXFP8, W4A8: "act8") or 4-bit (W4A4,
# MXFP4 activations: "act4"). The reference is float32 end to end with unquantized activations, so
# the limits cover the activation dtype's rounding through the network plus the activation
# quantization the kernels do. Measured on the tiny fixtures (benchmarks/RESULTS.md §5, worst case
# per family: weight_only top-1 0.98 / KL 9e-7 / Δ 0.034; act8 0.91 / 3.7e-5 / 0.44; act4 0.80 /
# 1.0e-3 / 1.09), with margin; every planted fault in tests/test_parity.py exceeds them by ≥ 10× in KL.
THRESHOLDS = {
    "weight_only": Thresholds(min_top1=0.9, max_kl=1e-4, max_logit_diff=0.15),
    "act8": Thresholds(min_top1=0.85, max_kl=5e-4, max_logit_diff=1.0),
    "act4": Thresholds(min_top1=0.6, max_kl=1e-2, max_logit_diff=3.0),
}


def kernel_family(manifest: dict) -> str:
    """The THRESHOLDS family of an npuconv output: the coarsest activation quantization its kernels do
    (read from each layer's kernel call, as :func:`npuconv.runtime.run_kernel` dispatches on it)."""
    families = {_layer_family(entry) for entry in manifest["layers"].values()}
    return next((f for f in ("act4", "act8") if f in families), "weight_only")


def _layer_family(entry: dict) -> str:
    if entry.get("kernel") == "npu_weight_quant_batchmatmul":
        return "weight_only"
    if entry.get("kernel_mode") in ("a4w4", "dual_level_mx"):
        return "act4"
    activation = (entry.get("spec") or {}).get("activation") or {}
    if "weight_dtype" in entry and activation.get("kind") == FP4_E2M1:  # MX with fp4 activations
        return "act4"
    return "act8"


@dataclass(frozen=True)
class ParityOptions:
    source: str | None = None  # default: the source recorded in npuconv.json
    prompts: tuple[str, ...] | None = None  # None: DEFAULT_PROMPTS
    new_tokens: int = 8
    seed: int = 0
    device: str | None = None  # cpu | cuda | npu; None: best available
    skip_checksum: bool = False
    stream: bool = False  # stream the reference's layers even when they would fit
    min_top1: float | None = None  # overrides of THRESHOLDS
    max_kl: float | None = None
    max_logit_diff: float | None = None


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts from a UTF-8 text file, one per non-blank line (``\\n`` inside a line stays literal)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    prompts = tuple(line for line in lines if line.strip())
    if not prompts:
        raise InputError(f"--prompts {path}: no prompt (the file has no non-blank line)")
    return prompts


def check_model(path: str | Path, options: ParityOptions, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Compare OUT (an npuconv output) as a whole model with its source; returns the report (``ok``)."""
    from npuconv.kernels import get_backend

    started = time.perf_counter()
    _require_transformers()
    backend = get_backend(options.device)
    out_reader, src_reader = _readers(path, options)
    act_dtype = config_dtype(out_reader.ckpt.config) or torch.bfloat16
    if act_dtype == torch.float32:
        act_dtype = torch.bfloat16
    family = kernel_family(out_reader.manifest)
    limits = _thresholds(family, options)
    converted = _Model.build(out_reader.ckpt, out_reader, act_dtype, backend.device, backend=backend)
    reference = _Model.build(src_reader.ckpt, src_reader, torch.float32, "cpu" if backend.name == "npu" else backend.device)
    problems = converted.problems + reference.problems + [
        f"OUT tensor '{name}' is not used by the model its config.json builds"
        for name in sorted(converted.unused - reference.unused)
    ]
    ids, lengths, prompt_note, prompt_problems = _prompts(out_reader.ckpt, src_reader.ckpt, converted.vocab_size, options)
    report = {
        "ok": False, "mode": "model", "backend": backend.name, "output": str(path), "source": src_reader.ckpt.source_id,
        "architecture": type(converted.model).__name__, "family": family,
        "activation_dtype": str(act_dtype).removeprefix("torch."), "thresholds": limits.__dict__,
        "prompts": {"count": len(lengths), "tokens": int(sum(lengths)), "from": prompt_note},
        "problems": problems + prompt_problems,
    }
    if not (converted.fatal or reference.fatal):
        report.update(_run(converted, reference, ids, lengths, options, on_progress))
        report["ok"] = _passed(report, limits)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _readers(path: str | Path, options: ParityOptions) -> tuple[NpuconvReader, Reader]:
    """(OUT's reader, shard checksums checked unless skipped; the source's reader)."""
    from npuconv.io.digests import check_shards
    from npuconv.verify import source_reader

    out_reader = open_reader(open_source(path))
    if not isinstance(out_reader, NpuconvReader):
        raise UnsupportedError(f"{path}: --model needs an npuconv output with NPU kernel tensors (--to npu-*)")
    if not options.skip_checksum:
        check_shards(out_reader.ckpt.root, out_reader.manifest)
    return out_reader, source_reader(out_reader.manifest, options.source)


def _run(converted: "_Model", reference: "_Model", ids, lengths, options: ParityOptions, on_progress) -> dict:
    """Greedy-decode with the reference, one pass of the converted model; metrics and the first divergence."""
    resident = not options.stream and _fits(reference.param_bytes, reference.device)
    progress = _Progress(on_progress, converted.num_layers * (max(1, options.new_tokens) + 1))
    reference.attach(keep=resident, tick=progress.tick)
    converted.attach(keep=False, tick=progress.tick)
    with torch.no_grad():
        sequences, ref_logits, margins = _greedy(reference, ids, lengths, options.new_tokens)
        out_logits = converted.logits(sequences[:, : int(lengths.max()) + options.new_tokens])
    return {
        "metrics": _compare(ref_logits, out_logits, lengths),
        "decode": _first_divergence(sequences, out_logits, lengths, margins, options.new_tokens),
        "reference_layers": "resident" if resident else "streamed",
    }


def _passed(report: dict, limits: Thresholds) -> bool:
    """No problem, every limit held, and no greedy divergence where the reference's top-1 margin exceeds
    twice the allowed |Δlogit| (a flip there cannot come from rounding within the limits)."""
    m, first = report["metrics"], report["decode"]["first_divergence"]
    return bool(
        not report["problems"]
        and m["top1_agreement"] >= limits.min_top1
        and m["mean_kl"] <= limits.max_kl
        and m["max_logit_diff_rel"] <= limits.max_logit_diff
        and (first is None or first["ref_margin"] <= 2 * limits.max_logit_diff * m["ref_logit_rms"])
    )


def parity_summary(report: dict) -> str:
    """One line: the headline numbers of a parity report, then what failed."""
    if "metrics" not in report:
        return "; ".join(report["problems"]) or "not run"
    m, limits = report["metrics"], report["thresholds"]
    text = (
        f"top-1 {m['top1_agreement']:.4f} (min {limits['min_top1']}), KL {m['mean_kl']:.3g} (max {limits['max_kl']}), "
        f"max |Δlogit| {m['max_logit_diff']:.3g} = {m['max_logit_diff_rel']:.3g} × RMS (max {limits['max_logit_diff']})"
    )
    first = report["decode"]["first_divergence"]
    if first is not None:
        text += f"; greedy diverges at prompt {first['prompt']} step {first['step']} (ref margin {first['ref_margin']:.3g})"
    if report["problems"]:
        text += "; " + "; ".join(report["problems"])
    return text


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UnsupportedError("--model needs transformers: pip install 'npuconv[model]'") from None


def _thresholds(family: str, options: ParityOptions) -> Thresholds:
    base = THRESHOLDS[family]
    return Thresholds(
        min_top1=base.min_top1 if options.min_top1 is None else options.min_top1,
        max_kl=base.max_kl if options.max_kl is None else options.max_kl,
        max_logit_diff=base.max_logit_diff if options.max_logit_diff is None else options.max_logit_diff,
    )


class _Progress:
    def __init__(self, callback, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.callback:
            self.callback(min(self.done, self.total), self.total)


def _fits(nbytes: int, device: str) -> bool:
    """True when ``nbytes`` fit in :data:`RESIDENT_FRACTION` of the device's free memory."""
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = _mem_available()
    return nbytes <= RESIDENT_FRACTION * free


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------- modules
class KernelLinear(nn.Module):
    """A converted linear inside the transformers model: ``y = NpuLinear.forward(x)`` on ``[..., K]``
    (flattened to ``[M, K]`` for the kernel, output ``[..., N]`` in the activation dtype; an expert stack
    gives ``[E, ..., N]``, every row through every expert). Its tensors
    are loaded by :meth:`materialize` and dropped by :meth:`release`."""

    def __init__(self, load: Callable[[], NpuLinear]) -> None:
        super().__init__()
        self._load = load
        self.linear: NpuLinear | None = None

    def materialize(self) -> None:
        if self.linear is None:
            self.linear = self._load()

    def release(self) -> None:
        self.linear = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.linear.forward(x.reshape(-1, x.shape[-1]))
        experts = () if self.linear.spec.num_experts is None else (y.shape[0],)  # a stack gives [E, M, N]
        return y.reshape(*experts, *lead, y.shape[-1])


class KernelExperts(nn.Module):
    """A transformers fused-experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
    ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``) run on converted expert
    stacks. ``gate_up`` is the list of stacks whose outputs, concatenated along N, form
    ``gate_up_proj`` (transformers' Concatenate order, e.g. [gate, up]); ``down`` is one stack.

    Each stack runs through :meth:`NpuLinear.forward` (every row through every expert, ``[E, R, N]``);
    each routed (token, slot) pair keeps its expert's row, as transformers' ``forward`` computes:
    ``sum_slots w · down_e(act(gate_e(x)) · up_e(x))``."""

    def __init__(self, gate_up: list[KernelLinear], down: KernelLinear, act_fn, num_experts: int) -> None:
        super().__init__()
        self.gate_up = nn.ModuleList(gate_up)
        self.down = down
        self.act_fn = act_fn
        self.num_experts = num_experts

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, slots = top_k_index.shape
        keep = top_k_index.reshape(-1) < self.num_experts  # index E marks a slot with no local expert
        expert = top_k_index.reshape(-1)[keep]
        token = torch.arange(tokens, device=hidden.device).repeat_interleave(slots)[keep]
        weight = top_k_weights.reshape(-1)[keep]
        gate_up = torch.cat([piece(hidden) for piece in self.gate_up], dim=-1)  # [E, T, 2I]
        gate, up = gate_up[expert, token].chunk(2, dim=-1)  # [R, I] each
        rows = self.act_fn(gate) * up
        y = self.down(rows)[expert, torch.arange(rows.shape[0], device=hidden.device)]  # [R, H]
        out = torch.zeros_like(hidden)
        out.index_add_(0, token, (y * weight[:, None].to(y.dtype)).to(out.dtype))
        return out


# ------------------------------------------------------------------------------------- one model
@dataclass
class _Model:
    """A transformers model on the meta device plus what loads each of its tensors."""

    model: nn.Module
    device: str
    layers_path: str
    num_layers: int
    vocab_size: int
    param_bytes: int
    loaders: dict[str, Callable[[], torch.Tensor]]  # parameter/buffer name → its tensor (device, dtype)
    kernels: dict[str, KernelLinear]  # module path → kernel module
    unused: set[str]
    problems: list[str] = field(default_factory=list)
    fatal: bool = False

    @classmethod
    def build(cls, ckpt: Checkpoint, reader: Reader, dtype: torch.dtype, device: str, backend=None) -> "_Model":
        """``backend`` given: converted layers become kernel modules; else dequantized float weights."""
        model = _skeleton(ckpt, dtype)
        names = _Names(model)
        plan = _Plan(model, ckpt, reader, names, dtype, device, backend)
        plan.run()
        layers_path = _layers_path(model)
        built = cls(
            model=model, device=device, layers_path=layers_path, num_layers=len(model.get_submodule(layers_path)),
            vocab_size=int(model.get_input_embeddings().weight.shape[0]),
            param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            loaders=plan.loaders, kernels=plan.kernels, unused=plan.unused, problems=plan.problems, fatal=plan.fatal,
        )
        if not built.fatal:
            built._materialize_outside_layers()
        return built

    # ---------------------------------------------------------------- materialization
    def _in_layer(self, name: str) -> bool:
        return name.startswith(self.layers_path + ".")

    def _materialize_outside_layers(self) -> None:
        for name, load in self.loaders.items():
            if not self._in_layer(name):
                _set_tensor(self.model, name, load())
        for path, kernel in self.kernels.items():
            if not self._in_layer(path):
                kernel.materialize()
        for module in self.model.modules():  # non-persistent buffers (rotary tables): recomputed by transformers
            if any(b.is_meta for b in module.buffers(recurse=False)):
                if any(True for _ in module.parameters(recurse=False)):
                    raise UnsupportedError(f"{type(module).__name__}: computed buffers beside parameters are not supported")
                module.to_empty(device=self.device, recurse=False)
                self.model._init_weights(module)

    def materialize(self, prefix: str) -> None:
        for name, load in self.loaders.items():
            if name.startswith(prefix) and _get_tensor(self.model, name).is_meta:
                _set_tensor(self.model, name, load())
        for path, kernel in self.kernels.items():
            if path.startswith(prefix):
                kernel.materialize()

    def release(self, prefix: str) -> None:
        for name in self.loaders:
            if name.startswith(prefix):
                _set_tensor(self.model, name, _get_tensor(self.model, name).to("meta"))
        for path, kernel in self.kernels.items():
            if path.startswith(prefix):
                kernel.release()

    def attach(self, keep: bool, tick: Callable[[], None]) -> None:
        """Hooks on every decoder layer: materialize before its forward; drop after unless ``keep``."""
        for i, layer in enumerate(self.model.get_submodule(self.layers_path)):
            prefix = f"{self.layers_path}.{i}."

            def before(_module, _args, prefix=prefix):
                self.materialize(prefix)
                tick()

            layer.register_forward_pre_hook(before)
            if not keep:
                layer.register_forward_hook(lambda _m, _a, _o, prefix=prefix: self.release(prefix))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float64 logits ``[B, L, V]`` on the CPU (no cache, no mask: causal attention only)."""
        out = self.model(input_ids=ids.to(self.device), use_cache=False)
        return out.logits.double().cpu()


def _skeleton(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The model ``config.json`` describes, on the meta device, without its quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    model_type = config.pop("model_type", None)
    if not model_type:
        raise InputError(f"{ckpt.root}/config.json has no model_type: cannot build the model")
    try:
        cfg = AutoConfig.for_model(model_type, **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedError(f"{ckpt.root}/config.json: transformers cannot build this model: {' '.join(str(e).split())[:300]}") from None
    return model.eval()


def _layers_path(model: nn.Module) -> str:
    """Path of the decoder layers (the first ModuleList with num_hidden_layers entries)."""
    count = model.config.get_text_config().num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return path
    raise UnsupportedError(f"{type(model).__name__}: no list of {count} decoder layers found")


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path), attr)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


class _Names:
    """Checkpoint name → model name, by the model's own transformers conversion rules."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.prefix = model.base_model_prefix
        self.meta = model.state_dict()

    def rename(self, key: str):
        """(model name, the converter that claims the key or None, the key's position in its sources)."""
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta)
        if pattern is None:
            return name, None, None
        for converter in self.converters:
            if pattern in converter.source_patterns:
                return name, converter, converter.source_patterns.index(pattern)
        return name, None, None


class _Plan:
    """Decides, on the meta model, where each tensor of the checkpoint goes (and what is wrong)."""

    def __init__(self, model, ckpt, reader, names, dtype, device, backend) -> None:
        self.model, self.ckpt, self.reader, self.names = model, ckpt, reader, names
        self.dtype, self.device, self.backend = dtype, device, backend
        self.loaders: dict[str, Callable[[], torch.Tensor]] = {}
        self.kernels: dict[str, KernelLinear] = {}
        self.problems: list[str] = []
        self.fatal = False
        self.unused: set[str] = set()
        self.mismatched: list[str] = []  # module prefixes already reported
        self.where = "OUT" if backend is not None else "source"

    def problem(self, message: str, fatal: bool = False) -> None:
        self.problems.append(f"{self.where}: {message}")
        self.fatal = self.fatal or fatal

    def run(self) -> None:
        fused: dict[str, dict[int, LinearSpec]] = {}  # model param of a converter → {source position: stack}
        converters = {}
        for spec in self.reader.linear_specs():
            stacked = spec.num_experts is not None
            key = _member_key(spec.name) if stacked else f"{spec.name}.weight"
            name, converter, position = self.names.rename(key)
            if stacked != (converter is not None):
                raise UnsupportedError(f"{type(self.model).__name__}: no transformers module takes layer '{spec.name}'")
            if converter is None:
                self._linear(spec, name.removesuffix(".weight"))
            else:
                fused.setdefault(name, {})[position] = spec
                converters[name] = converter
        for name, pieces in fused.items():
            self._experts(name, converters[name], pieces)
        self._plain_tensors()
        self._tied()
        for name, tensor in self.model.named_parameters():
            reported = any(name.startswith(prefix) for prefix in self.mismatched)
            if name not in self.loaders and tensor.is_meta and not self._in_kernel(name) and not reported:
                self.problem(f"no tensor for the model's '{name}' (run as zeros)")
                self.loaders[name] = self._zeros(tensor)

    def _in_kernel(self, name: str) -> bool:
        return any(name.startswith(path + ".") for path in self.kernels)

    # ---------------------------------------------------------------- converted linears
    def _linear(self, spec: LinearSpec, path: str) -> None:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:  # e.g. a config.json with fewer layers than were converted
            self.problem(f"layer '{spec.name}' has no module in the model its config.json builds", fatal=True)
            return
        if not isinstance(module, nn.Linear):
            raise UnsupportedError(f"'{path}' is a {type(module).__name__}, not a Linear")
        if tuple(module.weight.shape) != (spec.out_features, spec.in_features):
            self.problem(f"'{spec.name}' is [{spec.out_features}, {spec.in_features}] but the model's '{path}' is {list(module.weight.shape)}", fatal=True)
            self.mismatched.append(path + ".")
            return
        has_bias = module.bias is not None
        if has_bias != spec.has_bias:
            self.problem(
                f"'{path}' has a bias but the layer has none (run as zeros)" if has_bias
                else f"'{path}' has no bias but the layer has one (dropped, as a loader building this config would)"
            )
        if self.backend is None:
            self.loaders[f"{path}.weight"] = lambda spec=spec: self._dequantized(spec)
            if has_bias:
                self.loaders[f"{path}.bias"] = lambda spec=spec, like=module.bias: self._bias(spec, like)
            return
        kernel = KernelLinear(lambda spec=spec, has_bias=has_bias: self._npu_linear(spec, has_bias))
        parent, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent), attr, kernel)
        self.kernels[path] = kernel

    def _npu_linear(self, spec: LinearSpec, module_bias: bool) -> NpuLinear:
        """The layer's kernel, with the bias its module has: dropped if the module has none, zeros if
        the layer has none."""
        linear = load_layer(self.reader, spec, self.backend)
        if spec.has_bias and not module_bias:
            linear.tensors.pop("bias", None)
        elif module_bias and not spec.has_bias:
            linear.tensors["bias"] = torch.zeros(spec.out_features, dtype=torch.float32, device=self.backend.device)
        return linear

    def _dequantized(self, spec: LinearSpec) -> torch.Tensor:
        return dequantize(self.reader.load(spec).to(self.device), torch.float32).to(self.dtype)

    def _bias(self, spec: LinearSpec, like: torch.Tensor) -> torch.Tensor:
        bias = self.reader.load(spec).bias
        return torch.zeros(like.shape, dtype=self.dtype, device=self.device) if bias is None else bias.to(self.device, self.dtype)

    # ---------------------------------------------------------------- expert stacks
    def _experts(self, name: str, converter, pieces: dict[int, LinearSpec]) -> None:
        from transformers.core_model_loading import Concatenate, MergeModulelist

        path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(path)
        ops = converter.operations
        concat_dim = next((op.dim for op in ops if isinstance(op, Concatenate)), None)
        simple = all(isinstance(op, (MergeModulelist, Concatenate)) for op in ops) and concat_dim in (None, 1)
        if not simple or sorted(pieces) != list(range(len(converter.source_patterns))):
            raise UnsupportedError(f"'{name}': transformers fuses its experts in a way npuconv cannot run ({ops})")
        ordered = [pieces[i] for i in range(len(pieces))]
        expected = tuple(self.names.meta[name].shape)  # the original module's (it may be replaced already)
        stacked = (ordered[0].num_experts, sum(s.out_features for s in ordered), ordered[0].in_features)
        if expected != stacked or any(s.has_bias for s in ordered):
            self.problem(f"experts '{name}' is {list(expected)} but the converted stacks make {list(stacked)}", fatal=True)
            return
        if self.backend is None:
            self.loaders[name] = lambda: torch.cat([self._dequantized(s) for s in ordered], dim=1)
            return
        kernels = [KernelLinear(lambda s=s: self._npu_linear(s, False)) for s in ordered]
        for spec, kernel in zip(ordered, kernels):
            self.kernels[f"{path}.{attr}:{spec.name}"] = kernel
        if not isinstance(module, KernelExperts):
            if not (hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "act_fn")):
                raise UnsupportedError(f"'{path}' ({type(module).__name__}) is not a gate_up/down experts module")
            if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
                raise UnsupportedError(f"'{path}' ({type(module).__name__}): transposed or biased experts are not supported")
            replacement = KernelExperts([], None, module.act_fn, ordered[0].num_experts)
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, replacement)
            module = replacement
        if attr == "gate_up_proj":
            module.gate_up = nn.ModuleList(kernels)
        elif attr == "down_proj" and len(kernels) == 1:
            module.down = kernels[0]
        else:
            raise UnsupportedError(f"'{name}': unknown fused expert parameter")

    # ---------------------------------------------------------------- everything else
    def _plain_tensors(self) -> None:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for key in self.reader.passthrough_names():
            name, converter, _ = self.names.rename(key)
            target = params.get(name)
            if target is None:
                target = buffers.get(name)
            if converter is not None or target is None or self._in_kernel(name):
                self.unused.add(key)
                continue
            if name in self.loaders:
                self.problem(f"tensors '{key}' and another both map to the model's '{name}'")
                continue
            shape = tuple(self.ckpt.info(key).shape)
            if shape != tuple(target.shape):
                self.problem(f"tensor '{key}' is {list(shape)} but the model's '{name}' is {list(target.shape)}", fatal=True)
                continue
            dtype = self.dtype if target.dtype.is_floating_point else target.dtype
            self.loaders[name] = lambda key=key, dtype=dtype: self.ckpt.get(key).to(self.device, dtype)

    def _tied(self) -> None:
        """Tied parameters (e.g. lm_head ← embed_tokens when tie_word_embeddings) take their source's tensor."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        for target, source in tied.items():
            if source in self.loaders:
                self.loaders[target] = self.loaders[source]

    def _zeros(self, like: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: torch.zeros(like.shape, dtype=self.dtype if like.dtype.is_floating_point else like.dtype, device=self.device)


def _member_key(stacked: str) -> str:
    """A member checkpoint key of an npuconv expert stack: ``P.experts.proj`` → ``P.experts.0.proj.weight``."""
    found = STACKED_NAME.match(stacked)
    if found is None:
        raise UnsupportedError(f"expert stack '{stacked}' is not named <prefix>.experts.<proj>")
    return f"{found['prefix']}.0.{found['proj']}.weight"


# ------------------------------------------------------------------------------------- prompts
def _prompts(out_ckpt: Checkpoint, src_ckpt: Checkpoint, vocab: int, options: ParityOptions):
    """(ids [B, Lmax] right-padded with 0, lengths [B], where the ids came from, problems)."""
    texts = options.prompts or DEFAULT_PROMPTS
    tokenizer, why = _tokenizer(out_ckpt.root)
    problems: list[str] = []
    encoded = None
    if tokenizer is not None:
        encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
        unk = tokenizer.unk_token_id
        total = sum(len(e) for e in encoded)
        if unk is not None and total and sum(i == unk for e in encoded for i in e) > UNKNOWN_FRACTION * total:
            encoded, why = None, "OUT's tokenizer maps most of the prompt text to its unknown token"
    if encoded is not None:
        source_tokenizer, _ = _tokenizer(src_ckpt.root)
        if source_tokenizer is not None:
            if [source_tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts] != encoded:
                problems.append("OUT's tokenizer encodes the prompts differently from the source's")
        encoded = [e for e in encoded if e]
        if any(i >= vocab or i < 0 for e in encoded for i in e):
            problems.append(f"OUT's tokenizer gives token ids beyond the model's vocabulary ({vocab})")
            encoded = [[i % vocab for i in e] for e in encoded]
        note = f"{len(encoded)} prompts through OUT's tokenizer"
    if not encoded:
        generator = torch.Generator().manual_seed(options.seed)
        encoded = torch.randint(0, vocab, (SEEDED_PROMPTS, SEEDED_LENGTH), generator=generator).tolist()
        note = f"{SEEDED_PROMPTS} × {SEEDED_LENGTH} seeded token ids (seed {options.seed}): {why or 'no prompt tokens'}"
    lengths = torch.tensor([len(e) for e in encoded])
    ids = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
    return ids, lengths, note, problems


def _tokenizer(root: Path):
    """(the tokenizer in root, None) or (None, why it is not usable, worded for OUT)."""
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return None, "OUT has no tokenizer files"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(root), local_files_only=True), None
    except Exception as e:  # any loading failure means: no usable tokenizer (said in the report)
        return None, f"OUT's tokenizer does not load ({type(e).__name__})"


# ------------------------------------------------------------------------------------- running
def _greedy(reference: _Model, ids: torch.Tensor, lengths: torch.Tensor, new_tokens: int):
    """The reference's greedy decode: (sequences [B, Lmax + N], prompt logits [B, Lmax, V], top-1
    margins [B, N] at each generated step)."""
    batch = ids.shape[0]
    sequences = torch.zeros(batch, ids.shape[1] + new_tokens, dtype=torch.long)
    sequences[:, : ids.shape[1]] = ids
    current = lengths.clone()
    rows = torch.arange(batch)
    margins = torch.zeros(batch, new_tokens, dtype=torch.float64)
    prompt_logits = None
    for step in range(max(1, new_tokens)):
        logits = reference.logits(sequences[:, : int(current.max())])
        if prompt_logits is None:
            prompt_logits = logits[:, : ids.shape[1]]
        if step >= new_tokens:
            break
        last = logits[rows, current - 1]
        top2 = last.topk(2, dim=-1).values
        margins[:, step] = top2[:, 0] - top2[:, 1]
        sequences[rows, current] = last.argmax(-1)
        current += 1
    return sequences, prompt_logits, margins


def _compare(ref: torch.Tensor, out: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Metrics over every prompt position (ref and out float64 ``[B, L, V]``)."""
    mask = torch.arange(ref.shape[1])[None, :] < lengths[:, None]
    r = ref[:, : ref.shape[1]][mask]
    o = out[:, : ref.shape[1]][mask]
    rc = r - r.mean(-1, keepdim=True)
    diff = (o - o.mean(-1, keepdim=True)) - rc
    rms = float(rc.pow(2).mean().sqrt())
    log_p, log_q = torch.log_softmax(r, -1), torch.log_softmax(o, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    per_prompt = []
    start = 0
    for length in lengths.tolist():
        part = slice(start, start + length)
        per_prompt.append({
            "tokens": length,
            "top1_agreement": round(float((r[part].argmax(-1) == o[part].argmax(-1)).double().mean()), 6),
            "max_logit_diff": _round(float((o[part] - r[part]).abs().max())),
            "mean_kl": _round(float(kl[part].mean())),
        })
        start += length
    finite = bool(torch.isfinite(o).all())
    return {
        "positions": int(mask.sum()),
        "top1_agreement": round(float((r.argmax(-1) == o.argmax(-1)).double().mean()), 6),
        "max_logit_diff": _round(float((o - r).abs().max())) if finite else math.inf,
        "max_logit_diff_rel": _round(float(diff.abs().max()) / rms) if finite and rms > 0 else math.inf,
        "ref_logit_rms": _round(rms),
        "mean_kl": _round(float(kl.mean())) if finite else math.inf,
        "per_prompt": per_prompt,
    }


def _first_divergence(sequences, out_logits, lengths, margins, new_tokens: int) -> dict:
    """Where the converted model's greedy choice first differs from the reference's decode."""
    first = None
    diverged = 0
    for b, length in enumerate(lengths.tolist()):
        for step in range(new_tokens):
            choice = int(out_logits[b, length + step - 1].argmax())
            expected = int(sequences[b, length + step])
            if choice != expected:
                diverged += 1
                if first is None or step < first["step"]:
                    first = {"prompt": b, "step": step, "ref_token": expected, "out_token": choice,
                             "ref_margin": _round(float(margins[b, step]))}
                break
    return {"new_tokens": new_tokens, "prompts_diverged": diverged, "first_divergence": first}


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value
