"""Synthesize large, realistic quantized checkpoints on the fly (never committed).

7B-shaped Llama (32 layers; q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008; embeddings,
lm_head and norms in bf16), in one of these formats, sharded like real checkpoints:

- ``gptq-sym`` / ``gptq-asym``: GPTQ v1, 4-bit, group 128 (``quantize_config.json``)
- ``awq``: AWQ GEMM, 4-bit, group 128
- ``ct-w4a16``: compressed-tensors pack-quantized int4 group 128 (symmetric)
- ``ct-w8a8``: compressed-tensors int-quantized W8A8 (channel weights, dynamic token activations)

Random packed words are valid packings of uniformly random codes, so the tensors are produced
directly in their packed form. ``--scale`` keeps the shapes and multiplies the layer count.

    python benchmarks/synth.py gptq-sym benchmarks/_work/gptq-sym --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from npuconv.io.output import Unit, index_json, plan_shards, write_shards
from npuconv.io.safetensors_io import TensorPlan

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 4096, 11008, 32000, 32
GROUP = 128
FORMATS = ("gptq-sym", "gptq-asym", "awq", "ct-w4a16", "ct-w8a8")
LINEARS = {  # name → (N, K)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def random_words(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator)


def scales(*shape: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 0.004 + 0.001).to(dtype)


def linear_tensors(fmt: str, prefix: str, n: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    g = k // GROUP
    if fmt.startswith("gptq"):
        # v1 stores z - 1: symmetric z = 8 → 0x7 fields; asymmetric z ∈ {7, 8} → fields 6 or 7, so that
        # the mean code (7.5 for uniform codes) minus the field is ≈ 1, as in real v1 checkpoints
        sym = torch.full((g, n // 8), 0x77777777, dtype=torch.int32)
        zeros = sym if fmt == "gptq-sym" else sym ^ (random_words(g, n // 8, generator=gen) & 0x11111111)
        return {
            f"{prefix}.qweight": random_words(k // 8, n, generator=gen),
            f"{prefix}.qzeros": zeros,
            f"{prefix}.scales": scales(g, n, dtype=torch.float16, generator=gen),
            f"{prefix}.g_idx": (torch.arange(k, dtype=torch.int32) // GROUP),
        }
    if fmt == "awq":
        return {
            f"{prefix}.qweight": random_words(k, n // 8, generator=gen),
            f"{prefix}.qzeros": random_words(g, n // 8, generator=gen),
            f"{prefix}.scales": scales(g, n, dtype=torch.float16, generator=gen),
        }
    if fmt == "ct-w4a16":
        return {
            f"{prefix}.weight_packed": random_words(n, k // 8, generator=gen),
            f"{prefix}.weight_scale": scales(n, g, dtype=torch.bfloat16, generator=gen),
            f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
    if fmt == "ct-w8a8":
        return {
            f"{prefix}.weight": torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen),
            f"{prefix}.weight_scale": scales(n, 1, dtype=torch.bfloat16, generator=gen),
        }
    raise ValueError(fmt)


def linear_plans(fmt: str, prefix: str, n: int, k: int) -> list[TensorPlan]:
    """Names, dtypes and shapes that :func:`linear_tensors` produces, without producing them."""
    g = k // GROUP
    if fmt.startswith("gptq"):
        table = {"qweight": (torch.int32, (k // 8, n)), "qzeros": (torch.int32, (g, n // 8)),
                 "scales": (torch.float16, (g, n)), "g_idx": (torch.int32, (k,))}
    elif fmt == "awq":
        table = {"qweight": (torch.int32, (k, n // 8)), "qzeros": (torch.int32, (g, n // 8)), "scales": (torch.float16, (g, n))}
    elif fmt == "ct-w4a16":
        table = {"weight_packed": (torch.int32, (n, k // 8)), "weight_scale": (torch.bfloat16, (n, g)),
                 "weight_shape": (torch.int64, (2,))}
    else:
        table = {"weight": (torch.int8, (n, k)), "weight_scale": (torch.bfloat16, (n, 1))}
    return [TensorPlan(f"{prefix}.{suffix}", dtype, shape) for suffix, (dtype, shape) in table.items()]


def quant_config(fmt: str) -> dict:
    if fmt.startswith("gptq"):
        return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
                "sym": fmt == "gptq-sym", "checkpoint_format": "gptq", "format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "format": "pack-quantized"}
    fmt_name = "pack-quantized"
    if fmt == "ct-w8a8":
        group["weights"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        group["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        group["format"] = fmt_name = "int-quantized"
    return {"quant_method": "compressed-tensors", "version": "0.20.0", "format": fmt_name,
            "quantization_status": "compressed", "config_groups": {"group_0": group}, "ignore": ["lm_head"]}


def make_units(fmt: str, layers: int, seed: int) -> list[Unit]:
    """One unit per tensor group, produced lazily so generation streams like conversion does."""
    units: list[Unit] = []

    def add(tensor_fn, plans):
        units.append(Unit(plans, tensor_fn))

    def float_unit(name: str, shape: tuple[int, ...], index: int):
        def produce():
            gen = torch.Generator().manual_seed(seed * 1000 + index)
            return {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)}

        add(produce, [TensorPlan(name, torch.bfloat16, shape)])

    float_unit("model.embed_tokens.weight", (VOCAB, HIDDEN), 1)
    for layer in range(layers):
        for j, (name, (n, k)) in enumerate(LINEARS.items()):
            prefix = f"model.layers.{layer}.{name}"
            index = 10 + layer * 10 + j

            def produce(prefix=prefix, n=n, k=k, index=index):
                return linear_tensors(fmt, prefix, n, k, torch.Generator().manual_seed(seed * 100000 + index))

            add(produce, linear_plans(fmt, prefix, n, k))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{layer}.{norm}.weight"
            add(lambda name=name: {name: torch.ones(HIDDEN, dtype=torch.bfloat16)}, [TensorPlan(name, torch.bfloat16, (HIDDEN,))])
    add(lambda: {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}, [TensorPlan("model.norm.weight", torch.bfloat16, (HIDDEN,))])
    float_unit("lm_head.weight", (VOCAB, HIDDEN), 2)
    return units


def synthesize(fmt: str, out: Path, scale: float = 1.0, shard_bytes: int = 4 * 1000**3, seed: int = 0) -> Path:
    layers = max(1, round(LAYERS * scale))
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(make_units(fmt, layers, seed), shard_bytes)
    write_shards(out, shards)
    index = index_json(shards)
    if index:
        (out / index[0]).write_text(json.dumps(index[1]))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": VOCAB, "torch_dtype": "bfloat16" if fmt.startswith("ct") else "float16",
        "quantization_config": quant_config(fmt),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if fmt.startswith("gptq"):
        (out / "quantize_config.json").write_text(json.dumps(quant_config(fmt), indent=2))
    (out / "tokenizer_config.json").write_text("{}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the 32 layers by this (shapes unchanged)")
    parser.add_argument("--shard-gb", type=float, default=4.0)
    args = parser.parse_args()
    path = synthesize(args.format, args.out, args.scale, int(args.shard_gb * 1000**3))
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"{path}: {size / 1e9:.2f} GB, {math.ceil(size / (args.shard_gb * 1e9))} shard(s)")


if __name__ == "__main__":
    main()
