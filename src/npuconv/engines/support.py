"""Which serving engine (and version) serves which npuconv output: the one home of that knowledge.

Used by ``convert`` (``--to modelslim`` refuses a layer type no engine serves, naming a target that
works instead; ``--allow-unservable`` writes it anyway) and by ``inspect`` (where a checkpoint can
go). Imports neither torch nor an engine.

Each row names its evidence: a test of this repository that runs the engine's own code, or, for
msModelSlim-format types loaded by the engines' *native* ModelSlim methods, the engine study of
2026-11-28 (the engines' unmodified code on CPU with torch_npu emulated; README "Serve it").

Keys: npuconv targets (``quant_method: npuconv`` outputs) by target name; msModelSlim types (the
``--to modelslim`` output, read by the engines' own ModelSlim loaders) by ``(type, granularity)``,
granularity ``"per-channel"`` / ``"per-group"`` for linear layers and ``"moe"`` for expert stacks.
A key that is absent means *not judged* (no evidence either way): nothing is refused for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Serving:
    """One engine that loads and runs a kind of layer correctly."""

    engine: str  # "SGLang", "vLLM-Ascend"
    versions: str  # versions the evidence covers
    how: str  # how the engine picks it up
    evidence: str  # the test (path::name) or study that backs the row

    def label(self) -> str:
        return f"{self.engine} {self.versions}"


SGLANG_TEST = "tests/engines/sglang/test_sglang.py::test_layers_match_reference"
VLLM_TEST = "tests/engines/vllm/test_vllm_engine.py::test_layers_match_reference"
STUDY = "engine study 2026-11-28 (engines' own code, torch_npu emulated)"

_SGLANG_PLUGIN = Serving("SGLang", "0.5.23", "quant_method npuconv (entry point sglang.srt.plugins)", SGLANG_TEST)
_VA_PLUGIN = Serving("vLLM-Ascend", "0.23.0.post1 (vLLM 0.23.0)", "quant_method npuconv (entry point vllm.general_plugins)", VLLM_TEST)
_SGLANG_MS = Serving("SGLang", "0.5.23", "native modelslim", STUDY)
_VA_MS = Serving("vLLM-Ascend", "main@182b75ea, 0.23.0.post1", "native ascend (quant_model_description.json)", STUDY)

#: npuconv target → engines that serve it through the npuconv quantization method (linear and MoE
#: layers of the cases each engine's test runs)
TARGETS: dict[str, tuple[Serving, ...]] = {
    # SGLang: GPTQ asym act-order, AWQ, CT W4A16, CT W4A16 MoE; vLLM-Ascend: the same
    "npu-int4": (_VA_PLUGIN, _SGLANG_PLUGIN),
    "npu-int8": (_SGLANG_PLUGIN,),  # msModelSlim W8A16 per-group asymmetric
    # SGLang: msModelSlim W8A8 static, CT W8A8 MoE; vLLM-Ascend: msModelSlim W8A8 static, CT W8A8 Mixtral (TP 1 and 2)
    "npu-w8a8": (_VA_PLUGIN, _SGLANG_PLUGIN),
}

#: (msModelSlim type, granularity) → engines whose native loader serves it (engines.md table)
MODELSLIM: dict[tuple[str, str], tuple[Serving, ...]] = {
    ("W8A8", "per-channel"): (_VA_MS, _SGLANG_MS),
    ("W8A8_DYNAMIC", "per-channel"): (_VA_MS, _SGLANG_MS),
    ("W8A8_DYNAMIC", "per-group"): (),  # shape mismatch in both
    ("W8A16", "per-channel"): (_VA_MS,),  # SGLang: silently unquantized
    ("W8A16", "per-group"): (),  # shape mismatch / silently unquantized
    ("W4A16", "per-channel"): (),  # NotImplementedError / silently unquantized
    ("W4A16", "per-group"): (),
    ("W4A8_DYNAMIC", "per-channel"): (),  # linear: NotImplementedError (main), ZeroDivisionError (0.23)
    ("W4A8_DYNAMIC", "per-group"): (),
    ("WFP8AFP8_DYNAMIC", "per-channel"): (),
    ("W4A16_MXFP4", "per-group"): (),
    ("W8A8_MXFP8", "per-group"): (_VA_MS, _SGLANG_MS),
    ("W4A8_MXFP", "per-group"): (_VA_MS, _SGLANG_MS),
    ("W8A8_DYNAMIC", "moe"): (_VA_MS, _SGLANG_MS),
}


def target_servers(target: str) -> tuple[Serving, ...] | None:
    """Engines serving an npuconv target's output; None when not judged."""
    return TARGETS.get(target)


def modelslim_servers(qtype: str, granularity: str) -> tuple[Serving, ...] | None:
    """Engines whose native ModelSlim loader serves this type; () when none does, None when not judged."""
    return MODELSLIM.get((qtype, granularity))


def layer_servers(target, spec) -> tuple[Serving, ...] | None:
    """Engines that serve ONE layer (a canonical spec) written by ``target``; None when not judged."""
    if target.name != "modelslim":
        return target_servers(target.name)
    if target.accepts(spec) is not None:
        return None
    qtype = target.quant_type(spec)
    if spec.num_experts is not None:
        granularity = "moe"
    elif qtype.endswith(("MXFP", "MXFP8", "MXFP4")):
        granularity = "per-group"
    else:
        granularity = "per-group" if spec.num_groups > 1 else "per-channel"
    return modelslim_servers(qtype, granularity)


def served_instead(spec) -> str | None:
    """The first npuconv target with serving evidence that accepts this layer (None: none does)."""
    from npuconv.registry import get_target

    for name in TARGETS:
        if get_target(name).accepts(spec) is None:
            return name
    return None


def unservable_reason(target, spec) -> str | None:
    """None if some engine serves the layer as ``target`` writes it (or it is not judged), else a
    one-line reason naming the target that works instead."""
    servers = layer_servers(target, spec)
    if servers is None or servers:
        return None
    kind = target.quant_type(spec) if target.name == "modelslim" else target.name
    if spec.num_experts is None and target.name == "modelslim":
        kind += " per-group" if spec.num_groups > 1 else " per-channel"
    checked = ", ".join(sorted({s.label() for group in MODELSLIM.values() for s in group}))
    instead = served_instead(spec)
    hint = f"use --to {instead} (served by {', '.join(s.label() for s in TARGETS[instead])})" if instead else \
        "no npuconv target with a tested engine takes it"
    return f"{kind} loads in no engine ({checked}); {hint}, or pass --allow-unservable to write it anyway"


def engines_of(target, specs) -> list[str] | None:
    """Engine labels serving EVERY layer of a checkpoint converted to ``target`` (None: not judged)."""
    common: list[str] | None = None
    for spec in specs:
        servers = layer_servers(target, spec)
        if servers is None:
            return None
        labels = [s.label() for s in servers]
        common = labels if common is None else [label for label in common if label in labels]
    return common if common is not None else [s.label() for s in (target_servers(target.name) or ())]
