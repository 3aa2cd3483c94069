"""Write small compressed-tensors checkpoints with compressed-tensors itself (run in its venv).

usage: python make_ct.py OUT_ROOT  →  OUT_ROOT/<scheme>/ for each scheme below: config.json with
the library's own ``QuantizationConfig`` dump and model.safetensors from the registered
compressor's ``compress`` (qparams from CT's ``calculate_qparams`` on per-group min/max, the way
llm-compressor's min-max observer feeds it), random weights, two linears of odd-ish shapes.
Standalone: imports compressed-tensors, torch and safetensors only (never npuconv).
"""

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from safetensors.torch import save_file

SCHEMES = {  # name → (preset, overrides of the weight args)
    "w4a16_g32_asym": ("W4A16_ASYM", {"group_size": 32}),
    "w4a16_g64_sym": ("W4A16", {"group_size": 64}),
    "w8a16_channel": ("W8A16", {}),
    "w8a8_int": ("W8A8", {}),
    "fp8_dynamic": ("FP8_DYNAMIC", {}),
    "nvfp4a16": ("NVFP4A16", {}),
    "mxfp4a16": ("MXFP4A16", {}),
    "mxfp8a16": ("MXFP8A16", {}),
    "w3a16_g32": ("W3A16", {"group_size": 32}),
}
SHAPES = {"model.layers.0.self_attn.q_proj": (48, 128), "model.layers.0.mlp.down_proj": (64, 256)}


def qparams(weight: torch.Tensor, scheme: QuantizationScheme):
    args = scheme.weights
    n, k = weight.shape
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        blocks = weight.reshape(n, k // args.group_size, args.group_size)
    else:
        blocks = weight.reshape(n, 1, k)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    global_scale = None
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        global_scale = generate_gparam(weight.min().reshape(1), weight.max().reshape(1))
    scale, zero = calculate_qparams(lo, hi, args, global_scale=global_scale)
    return scale, zero, global_scale


def main(root: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, (preset, overrides) in SCHEMES.items():
        scheme = preset_name_to_scheme(preset, ["Linear"])
        scheme.weights = scheme.weights.model_copy(update=overrides)
        scheme.format = CompressionFormat(infer_module_format(torch.nn.Linear, scheme)).value
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        tensors = {"model.embed_tokens.weight": torch.randn(32, 128, generator=gen).to(torch.bfloat16)}
        for prefix, (n, k) in SHAPES.items():
            weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
            scale, zero, global_scale = qparams(weight.float(), scheme)
            state = {"weight": weight, "weight_scale": scale.to(torch.bfloat16) if scale.is_floating_point() else scale,
                     "weight_zero_point": zero}
            if global_scale is not None:
                state["weight_global_scale"] = global_scale
            for key, t in compressor.compress(state, scheme).items():
                tensors[f"{prefix}.{key}"] = t.contiguous()
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / "model.safetensors"), {"format": "pt"})
        qc = QuantizationConfig(config_groups={"group_0": scheme}, format=scheme.format, ignore=["lm_head"],
                                quantization_status="compressed")
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
                  "num_hidden_layers": 1, "torch_dtype": "bfloat16",
                  "quantization_config": qc.model_dump(mode="json", exclude_none=True)}
        config["quantization_config"]["quant_method"] = "compressed-tensors"
        (directory / "config.json").write_text(json.dumps(config, indent=1))
        print(name, scheme.format)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
