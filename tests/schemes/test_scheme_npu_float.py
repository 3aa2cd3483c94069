"""``--to npu-float``: float MoE expert weights (and, with ``--nz``, every linear) pre-cast to FRACTAL_NZ."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from scheme_helpers import LLAMA_CONFIG, nz_to_nd, read_all

from npuconv.convert import ConvertOptions, convert
from npuconv.errors import UnsupportedError
from npuconv.io.safetensors_io import save_file
from npuconv.writers import WriterOptions
from npuconv.writers.npu_float import load_nd

MLP = "model.layers.0.mlp"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe") / "src"
    directory.mkdir()
    gen = torch.Generator().manual_seed(11)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 64, generator=gen).to(torch.bfloat16),
               f"{MLP}.gate.weight": torch.randn(2, 64, generator=gen).to(torch.bfloat16),  # router: stays ND
               "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen).to(torch.bfloat16),
               "model.layers.0.self_attn.k_proj.weight": torch.randn(24, 64, generator=gen).to(torch.bfloat16)}
    for e in range(2):
        for proj, shape in (("gate_proj", (48, 64)), ("up_proj", (48, 64)), ("down_proj", (64, 48))):
            tensors[f"{MLP}.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    tensors[f"{MLP}.shared.experts.w13"] = torch.randn(2, 32, 64, generator=gen).to(torch.bfloat16)  # a stacked tensor
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "hidden_size": 64}))
    return directory, tensors


def test_expert_weights_are_nz_tiles_of_the_checkpoint_shape(moe_model, tmp_path):
    source, tensors = moe_model
    out = tmp_path / "out"
    convert(source, out, ConvertOptions("npu-float"))
    written = read_all(out)
    listing = json.loads((out / "npuconv_nz.json").read_text())
    assert listing["layout"] == "sglang"
    nz = set(listing["tensors"])
    assert nz == {name for name in tensors if ".experts." in name}
    for name, original in tensors.items():
        if name in nz:
            entry = listing["tensors"][name]
            assert entry["c0"] == 16 and entry["shape"] == list(original.shape)
            rows, cols = original.shape[-2:]
            assert tuple(written[name].shape) == (*original.shape[:-2], -(-cols // 16), -(-rows // 16), 16, 16)
            assert torch.equal(nz_to_nd(written[name], rows, cols), original)  # spec-derived decode
            assert torch.equal(load_nd(out, name, written[name]), original)
        else:
            assert torch.equal(written[name], original)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["target"] == "npu-float"
    # gate and up fuse into w13 by concatenating their NZ storages along the row-tile axis
    gate, up = (written[f"{MLP}.experts.0.{p}.weight"] for p in ("gate_proj", "up_proj"))
    fused = torch.cat([tensors[f"{MLP}.experts.0.gate_proj.weight"], tensors[f"{MLP}.experts.0.up_proj.weight"]])
    assert torch.equal(torch.cat([gate, up], dim=-3), nz_to_nd_inverse(fused))


def nz_to_nd_inverse(nd: torch.Tensor) -> torch.Tensor:
    rows, cols = nd.shape
    return nd.reshape(rows // 16, 16, cols // 16, 16).permute(2, 0, 1, 3).contiguous()


def test_nz_option_casts_every_aligned_linear(moe_model, tmp_path):
    source, tensors = moe_model
    out = tmp_path / "out"
    report = convert(source, out, ConvertOptions("npu-float", WriterOptions(nz=True)))
    nz = set(json.loads((out / "npuconv_nz.json").read_text())["tensors"])
    assert "model.layers.0.self_attn.q_proj.weight" in nz
    assert "model.layers.0.self_attn.k_proj.weight" not in nz  # 24 x 64 is not 16-aligned: kept ND, as SGLang does
    assert any("k_proj.weight: kept ND" in w for w in report["warnings"])
    assert torch.equal(read_all(out)["model.layers.0.self_attn.k_proj.weight"], tensors["model.layers.0.self_attn.k_proj.weight"])
    assert f"{MLP}.gate.weight" not in nz and "model.embed_tokens.weight" not in nz


def test_quantized_sources_are_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="float checkpoints"):
        convert(FIXTURES / "gptq_v1_b4_g32_sym", tmp_path / "out", ConvertOptions("npu-float"))
