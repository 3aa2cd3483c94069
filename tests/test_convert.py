"""End-to-end conversion of every real fixture, checked against the writing tool's own dequantization.

The NPU outputs are decoded here by a small decoder written from the layout spec
(docs/layouts.md, torch_npu_ops.md §0.1/§2.1/§3.1/§4.5), independent of npuconv's writers and readers.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import ALL_FIXTURES, FIXTURES, load_reference
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import UnsupportedError
from npuconv.io.safetensors_io import read_header, read_tensor
from npuconv.writers import WriterOptions

NPU_TARGETS = {
    "gptq_v1_b4_g32_sym": ["npu-int4"],
    "gptq_v1_b4_g64_asym_descact": ["npu-int4"],
    "gptq_v2_b3_g32_asym": ["npu-int4"],
    "gptq_v2_b4_g32_asym": ["npu-int4"],
    "awq_gemm_g128": ["npu-int4"],
    "ct020_w4a16_g32_asym": ["npu-int4"],
    "ms_w4a8_dynamic": ["npu-int4"],
    "ms_w4a4_dynamic_g32_asym_autoround": ["npu-int4"],
    "ms_v0_w4a8_dynamic_g32": ["npu-int4"],
    "ms_mixed_w8a8dyn_attn_w4a8dyn_mlp": [],  # mixed precision: no single npu-* target (see --to npu)
    "ct020_mixed_attn_w8a8_mlp_w4a16_g32_asym": [],
    "gptq_v1_b8_g128_asym_descact": ["npu-int8"],
    "ms_w8a16_per_group32_asym": ["npu-int8"],
    "ct020_w8a8_int": ["npu-w8a8", "npu-int8"],
    "ms_w8a8_static_fp16": ["npu-w8a8", "npu-int8"],
    "ct020_mxfp8a16": ["npu-mxfp8"],
    "ms_w8a8_mxfp8": ["npu-mxfp8"],
    "ct020_fp8_static": [],
    "ct020_nvfp4a16": [],
}
CASES = [(f, t) for f, targets in NPU_TARGETS.items() for t in targets]
# two-stage scales: the kernel takes one antiquant scale, the float32 product fl(s1 * s2) (vllm-ascend's
# process_scale_second), so q * fl(s1 * s2) may sit 1 ulp from msModelSlim's (q * s2) * s1
PRODUCT_SCALE = {"ms_v0_w4a8_dynamic_g32"}


def read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        infos, _ = read_header(path)
        out.update({name: read_tensor(info) for name, info in infos.items()})
    return out


def tree_digest(directory) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_every_fixture_has_a_mapping():
    assert sorted(NPU_TARGETS) == ALL_FIXTURES


# ---------------------------------------------------------------------------------- float target
@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_float_target_reproduces_tool_dequant(fixture, tmp_path):
    out = tmp_path / "out"
    convert(FIXTURES / fixture, out, ConvertOptions("float", WriterOptions(dtype=torch.float32)))
    written = read_all(out)
    reference = load_reference(fixture)
    assert reference, fixture
    for name, expected in reference.items():
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], expected), f"{fixture}: {name} max diff {(written[name] - expected).abs().max()}"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (out / "quantize_config.json").exists()
    assert not (out / "quant_model_description.json").exists()
    # every non-quantized tensor of the source is carried unchanged
    assert all(not name.endswith(("qweight", "qzeros", "weight_packed", "deq_scale")) for name in written)


# ---------------------------------------------------------------------------------- NPU targets
def sign_extend_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] → int64 [R, C]: nibble t of word j is element 8j+t, two's complement (ops §0.1)."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(u >> (4 * t)) & 0xF for t in range(8)], dim=-1).flatten(-2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def nz_to_nd(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[C1, R1, 16, C0] → [R, C]: nz[c1, r1, r0, c0] = nd[r1*16 + r0, c1*C0 + c0] (ops §3.1)."""
    c1, r1, _, c0 = storage.shape
    return storage.permute(1, 2, 0, 3).reshape(r1 * 16, c1 * c0)[:rows, :cols]


def stored(tensors: dict, entry: dict) -> torch.Tensor:
    t = tensors[entry["name"]]
    if entry["layout"] == "nz":
        rows, cols = entry["shape"][-2], entry["shape"][-1] // (8 if entry["packing"] == "int4pack" else 1)
        t = nz_to_nd(t, rows, cols)
    return t


def decode_weight_only(layer: dict, tensors: dict) -> torch.Tensor:
    """W[k, n] = (w[k, n] + offset[g(k), n]) * scale[g(k), n] (ops §2.1); returns [N, K] in source K order."""
    roles = layer["tensors"]
    w = stored(tensors, roles["weight"])
    w = sign_extend_nibbles(w) if roles["weight"]["packing"] == "int4pack" else w.to(torch.int64)
    k, n = w.shape
    # float32 like the tools' references: (code - zero) is exact, one rounding in the product
    scale = tensors[roles["antiquant_scale"]["name"]].float()
    offset = tensors[roles["antiquant_offset"]["name"]].float() if "antiquant_offset" in roles else torch.zeros_like(scale)
    if scale.dim() == 1:
        scale, offset = scale[None], offset[None]
    group = layer["antiquant_group_size"] or k
    rows = torch.arange(k) // group
    weight_kn = ((w.float() + offset[rows]) * scale[rows]).double()
    if "perm" in roles:
        perm = tensors[roles["perm"]["name"]].long()
        original = torch.empty_like(weight_kn)
        original[perm] = weight_kn
        weight_kn = original
    return weight_kn.T


def decode_w8a8(layer: dict, tensors: dict) -> torch.Tensor:
    roles = layer["tensors"]
    w = stored(tensors, roles["weight"]).float()
    return (w * tensors[roles["weight_scale"]["name"]].float()).double().T


def decode_mx(layer: dict, tensors: dict) -> torch.Tensor:
    """fp8 [K, N] with E8M0 scale [Kb/2, N, 2]: block j of channel n at [j//2, n, j%2] (ops §4.5)."""
    roles = layer["tensors"]
    w = tensors[roles["weight"]["name"]].double()
    scale = tensors[roles["weight_scale"]["name"]].long()
    k, n = w.shape
    blocks = scale.permute(1, 0, 2).reshape(n, -1)[:, : (k + 31) // 32]  # [N, Kb]
    factor = torch.pow(2.0, (blocks - 127).double()).repeat_interleave(32, dim=1)[:, :k]
    return w.T * factor


DECODERS = {"npu-int4": decode_weight_only, "npu-int8": decode_weight_only, "npu-w8a8": decode_w8a8, "npu-mxfp8": decode_mx}


@pytest.mark.parametrize("fixture,target", CASES)
def test_npu_target_decodes_back_to_tool_dequant(fixture, target, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(FIXTURES / fixture)
    convert(FIXTURES / fixture, out, ConvertOptions(target))
    assert tree_digest(FIXTURES / fixture) == before, "the input was modified"
    manifest = json.loads((out / "npuconv.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "npuconv"
    assert manifest["target"] == target
    tensors = read_all(out)
    reference = load_reference(fixture)
    assert sorted(manifest["layers"]) == sorted(name.removesuffix(".weight") for name in reference)
    for name, layer in manifest["layers"].items():
        decoded = DECODERS[target](layer, tensors)
        expected = reference[f"{name}.weight"].double()
        message = f"{fixture} → {target}: {name} max diff {(decoded - expected).abs().max()}"
        if fixture in PRODUCT_SCALE:
            assert torch.allclose(decoded, expected, rtol=2**-23, atol=0), message
            continue
        assert torch.equal(decoded, expected), message


def test_asymmetric_offset_sign_is_eight_minus_zero(tmp_path):
    """ops §2.1: the kernel ADDS the offset, so offset = 8 - z (sglang's z - 8 is wrong for asym)."""
    out = tmp_path / "out"
    convert(FIXTURES / "gptq_v2_b4_g32_asym", out, ConvertOptions("npu-int4"))
    layer = json.loads((out / "npuconv.json").read_text())["layers"]["model.layers.0.mlp.down_proj"]
    offset = read_all(out)[layer["tensors"]["antiquant_offset"]["name"]]
    from npuconv.io.checkpoint import Checkpoint
    from npuconv.readers import open_reader

    reader = open_reader(Checkpoint(FIXTURES / "gptq_v2_b4_g32_asym"))
    spec = next(s for s in reader.linear_specs() if s.name == "model.layers.0.mlp.down_proj")
    zero = reader.load(spec).zero_points()  # [N, G]
    assert torch.equal(offset.float(), (8 - zero).T)


@pytest.mark.parametrize("fixture,target", [("ct020_nvfp4a16", "npu-int4"), ("gptq_v1_b4_g32_sym", "npu-w8a8"), ("ct020_fp8_static", "npu-mxfp8")])
def test_unsuitable_target_fails_before_writing(fixture, target, tmp_path):
    with pytest.raises(UnsupportedError, match="cannot be written as"):
        convert(FIXTURES / fixture, tmp_path / "out", ConvertOptions(target))
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_conversion_is_deterministic(tmp_path):
    for name in ("a", "b"):
        convert(FIXTURES / "awq_gemm_g128", tmp_path / name, ConvertOptions("npu-int4", WriterOptions(nz=True)))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_sharded_output_round_trips(tmp_path):
    out = tmp_path / "out"
    convert(FIXTURES / "gptq_v1_b4_g32_sym", out, ConvertOptions("npu-int4", max_shard_bytes=40_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    manifest = json.loads((out / "npuconv.json").read_text())
    assert sorted(manifest["shards"]) == shards
    # converting the output to float reproduces the source's dequantization
    convert(out, tmp_path / "float", ConvertOptions("float", WriterOptions(dtype=torch.float32)))
    written = read_all(tmp_path / "float")
    for name, expected in load_reference("gptq_v1_b4_g32_sym").items():
        assert torch.equal(written[name], expected)


# ---------------------------------------------------------------------------------- CLI
def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_convert_json_and_dry_run(tmp_path):
    result = run("convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(tmp_path / "plan"), "--to", "npu-int4", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    assert plan["target"] == "npu-int4" and len(plan["layers"]) == 7
    assert plan["layers"][0]["kernel"] == "npu_weight_quant_batchmatmul"
    assert not (tmp_path / "plan").exists()
    result = run("convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(tmp_path / "out"), "--to", "npu-int4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True


def test_cli_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    result = run("convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(tmp_path / "out"), "--to", "float")
    assert result.exit_code == 2 and "already exists" in result.output
    result = run("convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(tmp_path / "out"), "--to", "float", "--force", "-q")
    assert result.exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["--to", "npu-int7"], "unknown target"),
    (["--to", "float", "--max-shard-size", "lots"], "invalid size"),
])
def test_cli_bad_options(tmp_path, args, message):
    result = run("convert", str(FIXTURES / "gptq_v1_b4_g32_sym"), str(tmp_path / "out"), *args)
    assert result.exit_code == 2 and message in result.output


def test_cli_output_inside_input_is_refused(tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gptq_v1_b4_g32_sym", src)
    result = run("convert", str(src), str(src / "out"), "--to", "float")
    assert result.exit_code == 2 and "must not be the model directory or inside it" in result.output
    result = run("convert", str(src), str(src), "--to", "float", "--force")
    assert result.exit_code == 2
    assert (src / "model.safetensors").exists()
