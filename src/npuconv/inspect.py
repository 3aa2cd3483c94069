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
        "warnings": list(reader.warnings),
    }


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
