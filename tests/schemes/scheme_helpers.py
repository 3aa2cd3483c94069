"""Helpers for the scheme tests: tiny hand-made checkpoints and spec-derived decoders.

The decoders here are written from the layout text (docs/layouts.md, torch_npu_ops.md §0.1, §1,
§4.3, §6.2) with plain integer arithmetic, independent of npuconv's writers and readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from npuconv.io.safetensors_io import read_header, read_tensor, save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 32,
    "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        infos, _ = read_header(path)
        out.update({name: read_tensor(info) for name, info in infos.items()})
    return out


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / "npuconv.json").read_text())


# ------------------------------------------------------------------------------ decoders
def nibbles_of_words(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` → signed int64 ``[..., 8W]``: nibble t of word j (bits 4t..4t+3) is element 8j+t."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(u >> (4 * t)) & 0xF for t in range(8)], dim=-1).flatten(-2)
    return torch.where(fields >= 8, fields - 16, fields)


def nibbles_of_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., B]`` → unsigned nibbles int64 ``[..., 2B]``: low nibble first (even element)."""
    b = data.view(torch.uint8).to(torch.int64)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def fp32_of_int64_bits(t: torch.Tensor) -> torch.Tensor:
    """int64 whose low 32 bits are an fp32 bit pattern (high word 0) → that fp32."""
    low = t.to(torch.int64) & 0xFFFFFFFF
    assert bool((t.to(torch.int64) >> 32 == 0).all()), "high word must be 0"
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32).view(torch.float32)


def nz_to_nd(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[*B, C1, R1, 16, C0]`` → ``[*B, rows, cols]``: nz[c1, r1, r0, c0] = nd[r1*16 + r0, c1*C0 + c0]."""
    *batch, c1, r1, r0, c0 = storage.shape
    nb = len(batch)
    nd = storage.permute(*range(nb), nb + 1, nb + 2, nb, nb + 3).reshape(*batch, r1 * r0, c1 * c0)
    return nd[..., :rows, :cols]


# ------------------------------------------------------------------------------ tiny checkpoints
def _pack_words_along_dim0(codes_kn: torch.Tensor) -> torch.Tensor:
    """uint 4-bit codes ``[K, N]`` → GPTQ qweight int32 ``[K/8, N]``: code k in bits 4·(k%8) of word k//8."""
    k, n = codes_kn.shape
    c = codes_kn.to(torch.int64).reshape(k // 8, 8, n)
    words = sum(c[:, t, :] << (4 * t) for t in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def make_gptq_sym(directory: Path, shapes: dict[str, tuple[int, int]], group_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny symmetric 4-bit GPTQ v2 checkpoint (desc_act off) with random codes and fp16 scales.

    ``shapes``: module prefix → (N, K). Returns the float64 dequantized weight ``[N, K]`` per module
    (``(q − 8) · s``), the reference.
    """
    gen = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, 16, generator=gen).to(torch.bfloat16)}
    reference = {}
    for prefix, (n, k) in shapes.items():
        g = k if group_size == -1 else group_size
        groups = k // g
        codes = torch.randint(0, 16, (k, n), generator=gen)
        scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).to(torch.float16)
        tensors[f"{prefix}.qweight"] = _pack_words_along_dim0(codes)
        tensors[f"{prefix}.scales"] = scales
        zero_words = torch.full((groups, n // 8), 0x88888888 - 2**32, dtype=torch.int64).to(torch.int32)  # v2: z = 8
        tensors[f"{prefix}.qzeros"] = zero_words
        tensors[f"{prefix}.g_idx"] = (torch.arange(k) // g).to(torch.int32)
        reference[prefix] = ((codes.double() - 8) * scales.double().repeat_interleave(g, 0)).T
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    config = dict(LLAMA_CONFIG)
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return reference


# ------------------------------------------------------------------------------ float sources
def make_float_model(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny hand-made bf16 checkpoint: linears (with a bias, a partial MX block, an odd N), and
    tensors that are not linears (embedding, norms, lm_head, a router gate). Returns every tensor."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": t(32, 96),
        "model.layers.0.input_layernorm.weight": torch.ones(96, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": t(64, 96),
        "model.layers.0.self_attn.q_proj.bias": t(64),
        "model.layers.0.mlp.dense.weight": t(48, 80),  # K = 80: a partial last 32-block
        "model.layers.0.mlp.odd_proj.weight": t(7, 64),  # N = 7: FP4 cannot pack it
        "model.layers.0.mlp.gate.weight": t(4, 96),  # a MoE router: not a linear by the name rule
        "model.norm.weight": torch.ones(96, dtype=torch.bfloat16),
        "lm_head.weight": t(32, 96),
    }
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] = 1.5  # an outlier
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "hidden_size": 96}))
    return tensors
