"""``inspect``: what a checkpoint is — format, schemes, per-layer quantization, sizes."""

from __future__ import annotations

from collections import Counter

from npuconv.io.checkpoint import Checkpoint
from npuconv.model import LinearSpec
from npuconv.readers import open_reader

MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def inspect_checkpoint(checkpoint: Checkpoint) -> dict:
    """One JSON-able report: ``format``, format facts, model facts, ``schemes`` counts and ``layers``."""
    reader = open_reader(checkpoint)
    specs = reader.linear_specs()
    config = checkpoint.config
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    experts = next((v for k in MOE_KEYS for v in (config.get(k), text_config.get(k)) if isinstance(v, int)), None)
    layers = [_layer_row(checkpoint, spec) for spec in specs]
    return {
        "model": checkpoint.source_id,
        "revision": checkpoint.revision,
        "path": str(checkpoint.root),
        "format": reader.format,
        **reader.summary(),
        "model_type": config.get("model_type") or text_config.get("model_type"),
        "architectures": config.get("architectures"),
        "num_hidden_layers": config.get("num_hidden_layers") or text_config.get("num_hidden_layers"),
        "moe_experts": experts,
        "files": [p.name for p in checkpoint.weight_files],
        "num_tensors": len(checkpoint.tensors),
        "size_bytes": checkpoint.total_bytes,
        "quantized_bytes": sum(row["bytes"] for row in layers),
        "schemes": dict(sorted(Counter(s.scheme for s in specs).items())),
        "layers": layers,
        "destinations": destinations(specs),
        "warnings": list(reader.warnings),
    }


def destinations(specs: list[LinearSpec]) -> list[dict]:
    """Where the checkpoint can go: for each target, ``convertible`` (every layer passes the target's
    own :meth:`Target.accepts`), ``reason`` (the first refusal), and ``engines`` — the engines (with
    versions) that serve every layer of the result (:mod:`npuconv.engines.support`), ``[]`` when none
    does, ``None`` when not judged."""
    from npuconv.engines.support import engines_of
    from npuconv.registry import get_target, target_names

    rows = []
    for name in target_names():
        target = get_target(name)
        reason = next((f"{spec.name}: {r}" for spec in specs if (r := target.accepts(spec))), None)
        rows.append({
            "target": name,
            "convertible": reason is None,
            "reason": reason,
            "engines": engines_of(target, specs) if reason is None else None,
        })
    return rows


def _layer_row(checkpoint: Checkpoint, spec: LinearSpec) -> dict:
    act = spec.activation
    return {
        "name": spec.name,
        "scheme": spec.scheme,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "act_order": spec.act_order,
        "weight_format": spec.weight_format,
        "activation": None if act is None else {
            "kind": act.kind, "bits": act.bits, "dynamic": act.dynamic, "strategy": act.strategy,
        },
        "shape": [*spec.batch_shape, spec.out_features, spec.in_features],
        "experts": spec.num_experts,
        "source_scheme": spec.source_scheme,
        "bytes": sum(checkpoint.info(n).nbytes for n in spec.source_tensors if checkpoint.has(n)),
    }
