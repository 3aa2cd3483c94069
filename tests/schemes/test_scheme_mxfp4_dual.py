"""``--to npu-mxfp4-dual``: dual-level MXFP4 (fp32 per 512 + E8M0 per 32, NZ) for ``npu_dual_level_quant_matmul``.

The stored tensors are decoded by a spec-derived decoder and compared with an independent
implementation of the ``npu_dynamic_dual_level_mx_quant`` rule written here (ops §5.3); the emulated
kernel is checked against the golden formula (ops §5.4); planted bugs: level-0 blocks misaligned,
E8M0 off by one.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from scheme_helpers import LLAMA_CONFIG, manifest, nibbles_of_bytes, nz_to_nd, read_all

from npuconv.convert import ConvertOptions, convert
from npuconv.errors import UnsupportedError
from npuconv.kernels import emulated
from npuconv.io.safetensors_io import save_file
from npuconv.verify import VerifyOptions, verify
from test_verify import rewrite

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
LAYER = "model.layers.0.self_attn.q_proj"


def reference_dual_quant(w: torch.Tensor) -> torch.Tensor:
    """Independent ops §5.3 rule on a bf16 ``[N, K]`` weight (K % 512 == 0) → dequantized float64 ``[N, K]``.

    l0 = amax512/6 (fp32); t = bf16(w / l0); per 32: e = floor(log2 amax32(t)) − 2; q = nearest E2M1 value of
    t / 2**e (ties to the even code, saturating at ±6); value = q · 2**e · l0.
    """
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    grid = E2M1[:8]
    for r in range(n):
        for b0 in range(0, k, 512):
            block = w[r, b0:b0 + 512].float()
            l0 = block.abs().max() / torch.tensor(6.0)
            t = (block / l0).to(torch.bfloat16).double()
            for b1 in range(0, 512, 32):
                sub = t[b1:b1 + 32]
                amax = sub.abs().max().item()
                e = (torch.floor(torch.log2(torch.tensor(amax))).item() - 2) if amax > 0 else -127
                scaled = (sub / 2.0**e).abs().clamp(max=6.0)
                dist = (scaled[:, None] - grid[None, :]).abs()
                best = dist.min(1, keepdim=True).values
                candidates = (dist == best).double() * torch.tensor([2.0 if c % 2 == 0 else 1.0 for c in range(8)])
                q = grid[candidates.argmax(1)] * torch.sign(sub)
                out[r, b0 + b1:b0 + b1 + 32] = q * 2.0**e * l0.double()
    return out


def decode(layer: dict, tensors: dict) -> torch.Tensor:
    """NZ uint8 [N, K/2] (C0 = 32) → FP4 pairs (even k low) · level0[k//512, n] · 2**(level1[n, k//32 pairs] − 127)."""
    roles = layer["tensors"]
    n, k = roles["weight"]["shape"]
    assert roles["weight"]["layout"] == "nz" and roles["weight"]["c0"] == 32
    stored = nz_to_nd(tensors[roles["weight"]["name"]], n, k // 2)
    values = E2M1[nibbles_of_bytes(stored)]
    level0 = tensors[roles["weight_scale_level0"]["name"]].double()  # [K/512, N]
    level1 = tensors[roles["weight_scale_level1"]["name"]].long().reshape(n, -1)[:, : k // 32]
    factor = torch.pow(2.0, (level1 - 127).double()).repeat_interleave(32, 1) * level0.T.repeat_interleave(512, 1)[:, :k]
    return values * factor


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """bf16 q_proj [64, 1024] (two level-0 blocks of different magnitude, a bias) + an embedding."""
    directory = tmp_path_factory.mktemp("dual") / "src"
    directory.mkdir()
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 1024, generator=gen) * 0.02
    weight[:, 512:] *= 9.0
    weight[5, 700] = 1.0
    tensors = {
        LAYER + ".weight": weight.to(torch.bfloat16),
        LAYER + ".bias": (torch.randn(64, generator=gen) * 0.1).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(32, 1024, generator=gen).to(torch.bfloat16),
    }
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "hidden_size": 1024}))
    return directory, tensors


def convert_dual(source, out, monkeypatch):
    convert(source, out, ConvertOptions("npu-mxfp4-dual"))
    return out


def test_float_weight_is_quantized_by_the_dual_level_rule(float_model, tmp_path, monkeypatch):
    source, tensors = float_model
    out = convert_dual(source, tmp_path / "out", monkeypatch)
    layer = manifest(out)["layers"][LAYER]
    assert layer["kernel"] == "npu_dual_level_quant_matmul" and layer["tensors"]["weight_scale_level0"]["shape"] == [2, 64]
    written = read_all(out)
    decoded = decode(layer, written)
    expected = reference_dual_quant(tensors[LAYER + ".weight"])
    assert torch.equal(decoded, expected)
    level0 = written[layer["tensors"]["weight_scale_level0"]["name"]]
    assert torch.equal(level0, (tensors[LAYER + ".weight"].float().reshape(64, 2, 512).abs().amax(-1) / 6.0).T)
    w = tensors[LAYER + ".weight"].double()
    assert layer["offline_quantization"]["rel_l2"] == pytest.approx(((decoded - w).norm() / w.norm()).item(), rel=1e-9)
    report = verify(out, VerifyOptions())
    assert report["ok"] and report["layers"][0]["layout_exact"], report["layers"]


def test_float_llama_with_one_level0_block(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from npuconv.cli import cli

    base = tmp_path / "base"
    result = CliRunner().invoke(cli, ["convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(base), "--to", "float", "--dtype", "bfloat16", "-q"])
    assert result.exit_code == 0
    out = convert_dual(base, tmp_path / "out", monkeypatch)
    report = verify(out, VerifyOptions())
    assert report["ok"] and report["passed"] == 7


def test_mx_fp4_source_gets_level0_one(float_model, tmp_path, monkeypatch):
    source, _ = float_model
    mx = tmp_path / "mx"
    convert(source, mx, ConvertOptions("npu-mxfp4"))  # an MX fp4 checkpoint (E8M0 per 32)
    out = tmp_path / "dual"
    convert(mx, out, ConvertOptions("npu-mxfp4-dual"))
    layer = manifest(out)["layers"][LAYER]
    assert "offline_quantization" not in layer and layer["level0_from"].startswith("1.0")
    written, mx_written = read_all(out), read_all(mx)
    assert torch.equal(written[layer["tensors"]["weight_scale_level0"]["name"]], torch.ones(2, 64))
    mx_scale = mx_written[LAYER + ".weight_scale"]  # [Kb/2, N, 2]
    assert torch.equal(written[layer["tensors"]["weight_scale_level1"]["name"]], mx_scale.transpose(0, 1))
    report = verify(out, VerifyOptions())
    assert report["ok"] and report["layers"][0]["layout_exact"]


def test_integer_sources_are_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="FP4"):
        convert(FIXTURES / "gptq_v1_b4_g32_sym", tmp_path / "out", ConvertOptions("npu-mxfp4-dual"))


def test_dynamic_dual_level_quant_matches_the_op_example():
    y, level0, level1 = emulated.npu_dynamic_dual_level_mx_quant(torch.full((1, 64), 8.0, dtype=torch.bfloat16))
    assert torch.allclose(level0, torch.tensor([[8.0 / 6.0]])) and level1.tolist() == [[[127, 127]]]
    assert bool((y == 0x77).all()) and y.shape == (1, 32)


def test_dual_level_matmul_is_the_golden_formula():
    gen = torch.Generator().manual_seed(9)
    m, n, k = 3, 5, 1024
    x1 = torch.randint(0, 256, (m, k // 2), generator=gen, dtype=torch.uint8)
    x2 = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    l0a, l0b = torch.rand(m, 2, generator=gen), torch.rand(2, n, generator=gen)
    l1a = torch.randint(120, 134, (m, 16, 2), generator=gen, dtype=torch.uint8)
    l1b = torch.randint(120, 134, (n, 16, 2), generator=gen, dtype=torch.uint8)
    bias = torch.randn(n, generator=gen)
    y = emulated.npu_dual_level_quant_matmul(x1, x2, l0a, l0b, l1a, l1b, bias=bias, output_dtype=torch.float32)
    a = E2M1[nibbles_of_bytes(x1)] * torch.pow(2.0, l1a.reshape(m, 32).double() - 127).repeat_interleave(32, 1)
    b = E2M1[nibbles_of_bytes(x2)] * torch.pow(2.0, l1b.reshape(n, 32).double() - 127).repeat_interleave(32, 1)
    expected = sum(l0a[:, i, None].double() * l0b[i].double() * (a[:, i * 512:(i + 1) * 512] @ b[:, i * 512:(i + 1) * 512].T)
                   for i in range(2)) + bias.double()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("role,mutate", [
    ("weight_scale_level0", lambda t: torch.roll(t, 1, 0)),  # level-0 scales applied to the other 512-block
    ("weight_scale_level1", lambda t: t + 1),  # E8M0 off by one
], ids=["L0 blocks misaligned", "E8M0 off by one"])
def test_verify_catches_planted_bug(role, mutate, float_model, tmp_path, monkeypatch):
    source, _ = float_model
    out = convert_dual(source, tmp_path / "out", monkeypatch)
    rewrite(out, role, mutate, LAYER)
    report = verify(out, VerifyOptions(skip_checksum=True))
    bad = report["layers"][0]
    assert bad["status"] == "fail" and bad["layout_exact"] is False and bad["rel_l2"] > bad["threshold"], bad
