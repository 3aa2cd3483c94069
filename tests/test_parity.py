"""Whole-model parity (``npuconv verify OUT --model``) on the real tiny Llama / Qwen2-MoE / Mixtral fixtures.

Every fixture × target it converts to passes; each planted whole-model fault (copied tensors under
swapped names, a bias the config drops, embeddings tied or untied, config.json edits) passes the
per-layer ``verify`` and fails ``--model``. The reference model is checked against transformers'
own ``from_pretrained`` of the tool's dequantization (``reference_dequant.safetensors``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from npuconv.cli import cli  # noqa: E402
from npuconv.convert import ConvertOptions, convert  # noqa: E402
from npuconv.io.output import MANIFEST, sha256_file  # noqa: E402
from npuconv.parity import THRESHOLDS, ParityOptions, _first_divergence, _Model, check_model, kernel_family  # noqa: E402
from npuconv.readers import open_reader  # noqa: E402
from npuconv.io.safetensors_io import read_header, read_tensor, save_file  # noqa: E402
from npuconv.io.source import open_source  # noqa: E402
from npuconv.verify import VerifyOptions, verify  # noqa: E402

from conftest import fixture_dir  # noqa: E402

# every (fixture, target) the converter accepts among the tiny causal-LM fixtures, with the family of limits
PAIRS = [
    ("awq_gemm_g128", "npu-int4", "weight_only"),
    ("ct020_moe_mixtral_w8a8_int", "npu-int8", "weight_only"),
    ("ct020_moe_mixtral_w8a8_int", "npu-w8a8", "act8"),
    ("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4", "weight_only"),
    ("ct020_mxfp8a16", "npu-mxfp8", "act8"),
    ("ct020_w4a16_g32_asym", "npu-int4", "weight_only"),
    ("ct020_w8a8_int", "npu-int8", "weight_only"),
    ("ct020_w8a8_int", "npu-w8a8", "act8"),
    ("gptq_v1_b4_g32_sym", "npu-int4", "weight_only"),
    ("gptq_v1_b4_g64_asym_descact", "npu-int4", "weight_only"),
    ("gptq_v1_b8_g128_asym_descact", "npu-int8", "weight_only"),
    ("gptq_v2_b3_g32_asym", "npu-int4", "weight_only"),
    ("gptq_v2_b4_g32_asym", "npu-int4", "weight_only"),
    ("ms_w4a8_dynamic", "npu-int4", "weight_only"),
    ("ms_w4a8_dynamic", "npu-w4a8", "act8"),
    ("ms_w4a8_dynamic", "npu-w4a4", "act4"),
    ("ms_w8a16_per_group32_asym", "npu-int8", "weight_only"),
    ("ms_w8a8_mxfp8", "npu-mxfp8", "act8"),
    ("ms_w8a8_static_fp16", "npu-int8", "weight_only"),
    ("ms_w8a8_static_fp16", "npu-w8a8", "act8"),
]
FAST = ParityOptions(new_tokens=4)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Converted outputs, made once per (fixture, target)."""
    root = tmp_path_factory.mktemp("parity")
    made: dict[tuple[str, str], Path] = {}

    def get(fixture: str, target: str, source: Path | None = None) -> Path:
        key = (str(source or fixture), target)
        if key not in made:
            out = root / f"{len(made)}-{fixture}-{target}"
            convert(source or fixture_dir(fixture), out, ConvertOptions(target=target))
            made[key] = out
        return made[key]

    return get


@pytest.mark.parametrize("fixture,target,family", PAIRS, ids=[f"{f}-{t}" for f, t, _ in PAIRS])
def test_converted_model_matches_source(outputs, fixture, target, family):
    report = check_model(outputs(fixture, target), FAST)
    assert report["family"] == family
    assert report["problems"] == []
    assert report["ok"], report["metrics"]
    assert report["metrics"]["positions"] == 64  # 4 prompts × 16 seeded ids (the fixtures' tokenizer maps text to unk)
    assert "seeded token ids" in report["prompts"]["from"]


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory) -> Path:
    """A seeded bf16 Llama (the fixtures' sizes) saved by transformers: the source of the offline targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("float") / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


OFFLINE = [("npu-float", "weight_only"), ("npu-mxfp8", "act8"), ("npu-mxfp4", "act8"), ("npu-mxfp4-dual", "act4")]


@pytest.mark.parametrize("target,family", OFFLINE, ids=[t for t, _ in OFFLINE])
def test_offline_quantized_model_matches_source(outputs, float_llama, target, family):
    """Targets that quantize a float model: the reference is the source quantized as the conversion did."""
    report = check_model(outputs("float-llama", target, source=float_llama), FAST)
    assert report["family"] == family and report["problems"] == []
    assert report["ok"], report["metrics"]


def test_thresholds_are_tight_for_weight_only(outputs):
    """The limits are not vacuous: the real weight-only error is far inside them, and a limit of zero fails."""
    out = outputs("gptq_v1_b4_g32_sym", "npu-int4")
    metrics = check_model(out, FAST)["metrics"]
    limits = THRESHOLDS["weight_only"]
    assert metrics["mean_kl"] < limits.max_kl / 10 and metrics["max_logit_diff_rel"] < limits.max_logit_diff
    assert not check_model(out, ParityOptions(new_tokens=0, max_kl=0.0))["ok"]


# ------------------------------------------------------------------------------------- reference
def _float_checkpoint(fixture: str, directory: Path) -> Path:
    """The source as a plain float32 checkpoint: the tool's own dequantization (reference_dequant)
    for each quantized linear, every other tensor as stored; config without quantization_config."""
    source = fixture_dir(fixture)
    reader = open_reader(open_source(source))
    tensors = {name: reader.ckpt.get(name).float() for name in reader.passthrough_names()}
    infos, _ = read_header(source / "reference_dequant.safetensors")
    tensors.update({name: read_tensor(info) for name, info in infos.items()})
    for spec in reader.linear_specs():  # biases of quantized linears are in the checkpoint, not the oracle
        layer = reader.load(spec)
        if layer.bias is not None:
            if spec.num_experts is None:
                tensors[f"{spec.name}.bias"] = layer.bias.float()
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("fixture", ["awq_gemm_g128", "ct020_moe_qwen2_w4a16_g32_asym", "ct020_moe_mixtral_w8a8_int"])
def test_reference_model_equals_transformers_loading_the_tools_dequantization(tmp_path, fixture):
    """Our reference (meta skeleton, our loading, expert fusion by the model's conversion rule) gives
    the logits of transformers' own from_pretrained on the writing tool's dequantized weights."""
    from transformers import AutoModelForCausalLM

    plain = _float_checkpoint(fixture, tmp_path / "float")
    expected_model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="sdpa").eval()
    reader = open_reader(open_source(fixture_dir(fixture)))
    reference = _Model.build(reader.ckpt, reader, torch.float32, "cpu")
    assert reference.problems == [] and not reference.fatal
    reference.attach(keep=False, tick=lambda: None)
    ids = torch.randint(0, reference.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = expected_model(input_ids=ids, use_cache=False).logits.double()
        got = reference.logits(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- planted faults
def _planted(out: Path, directory: Path, tensors=None, config=None) -> Path:
    """A copy of OUT with a fault a buggy converter could write: ``tensors`` rewrites the weights
    (shard checksums in npuconv.json recomputed, as the converter would have recorded them),
    ``config`` edits config.json."""
    shutil.copytree(out, directory)
    if tensors is not None:
        for shard in sorted(directory.glob("*.safetensors")):
            infos, _ = read_header(shard)
            save_file(tensors({name: read_tensor(info) for name, info in infos.items()}), shard)
        manifest = json.loads((directory / MANIFEST).read_text())
        manifest["shards"] = {name: sha256_file(directory / name) for name in manifest["shards"]}
        (directory / MANIFEST).write_text(json.dumps(manifest))
    if config is not None:
        data = json.loads((directory / "config.json").read_text())
        config(data)
        (directory / "config.json").write_text(json.dumps(data))
    return directory


def _swap(a: str, b: str):
    def edit(tensors: dict) -> dict:
        tensors[a], tensors[b] = tensors[b], tensors[a]
        return tensors

    return edit


FAULTS = {
    "swapped-names": dict(tensors=_swap("model.embed_tokens.weight", "lm_head.weight")),
    "config-rms-norm-eps": dict(config=lambda c: c.update(rms_norm_eps=1e-2)),
    "config-kv-heads": dict(config=lambda c: c.update(num_key_value_heads=c["num_attention_heads"])),
    "tied-embeddings": dict(config=lambda c: c.update(tie_word_embeddings=True)),
}
FAULT_CASES = [
    (fixture, target, fault)
    for fixture, target in [("awq_gemm_g128", "npu-int4"), ("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4"),
                            ("ct020_moe_mixtral_w8a8_int", "npu-w8a8")]
    for fault in FAULTS
]


def _per_layer_passes(path: Path) -> None:
    report = verify(path, VerifyOptions())
    assert report["ok"] and report["failed"] == 0


@pytest.mark.parametrize("fixture,target,fault", FAULT_CASES, ids=[f"{f}-{t}-{x}" for f, t, x in FAULT_CASES])
def test_planted_fault_fails_model_but_not_per_layer(outputs, tmp_path, fixture, target, fault):
    planted = _planted(outputs(fixture, target), tmp_path / "planted", **FAULTS[fault])
    _per_layer_passes(planted)
    report = check_model(planted, FAST)
    assert not report["ok"]
    limits = THRESHOLDS[report["family"]]
    if fault == "config-kv-heads":  # the converted k/v layers do not fit the edited architecture
        assert any("self_attn.k_proj' is [64, 128]" in p for p in report["problems"])
        return
    assert report["metrics"]["mean_kl"] > 10 * limits.max_kl
    assert report["metrics"]["top1_agreement"] < limits.min_top1
    if fault == "tied-embeddings":
        assert "OUT tensor 'lm_head.weight' is not used by the model its config.json builds" in report["problems"]


def test_bias_dropped_by_the_config_fails(outputs, tmp_path):
    """Qwen2-MoE's q/k/v biases: a config.json with qkv_bias false makes every loader drop them."""
    planted = _planted(outputs("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4"), tmp_path / "planted",
                       config=lambda c: c.update(qkv_bias=False))
    _per_layer_passes(planted)
    report = check_model(planted, FAST)
    assert not report["ok"]
    assert "OUT: 'model.layers.0.self_attn.q_proj' has no bias but the layer has one (dropped, as a loader building this config would)" in report["problems"]
    assert report["metrics"]["mean_kl"] > 3 * THRESHOLDS["weight_only"].max_kl  # and the numbers show it


def _tied_source(directory: Path) -> Path:
    """The AWQ Llama fixture with tied embeddings (no lm_head.weight, tie_word_embeddings true)."""
    shutil.copytree(fixture_dir("awq_gemm_g128"), directory)
    infos, _ = read_header(directory / "model.safetensors")
    tensors = {name: read_tensor(info) for name, info in infos.items() if name != "lm_head.weight"}
    save_file(tensors, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_untied_embeddings_fail(outputs, tmp_path):
    """A tied source converts and passes; an output whose config unties the embeddings has no lm_head."""
    out = outputs("awq_gemm_g128", "npu-int4", source=_tied_source(tmp_path / "tied"))
    assert check_model(out, FAST)["ok"]
    planted = _planted(out, tmp_path / "untied", config=lambda c: c.update(tie_word_embeddings=False))
    _per_layer_passes(planted)
    report = check_model(planted, FAST)
    assert not report["ok"]
    assert "OUT: no tensor for the model's 'lm_head.weight' (run as zeros)" in report["problems"]


def test_config_with_fewer_layers_fails(outputs, tmp_path):
    planted = _planted(outputs("gptq_v1_b4_g32_sym", "npu-int4"), tmp_path / "planted",
                       config=lambda c: c.update(num_hidden_layers=0))
    _per_layer_passes(planted)
    report = check_model(planted, FAST)
    assert not report["ok"] and "metrics" not in report
    assert "OUT: layer 'model.layers.0.mlp.down_proj' has no module in the model its config.json builds" in report["problems"]


def test_missing_copied_tensor_fails(outputs, tmp_path):
    def drop(tensors: dict) -> dict:
        del tensors["model.norm.weight"]
        return tensors

    planted = _planted(outputs("ct020_moe_qwen2_w4a16_g32_asym", "npu-int4"), tmp_path / "planted", tensors=drop)
    _per_layer_passes(planted)
    report = check_model(planted, FAST)
    assert not report["ok"]
    assert "OUT: no tensor for the model's 'model.norm.weight' (run as zeros)" in report["problems"]


# ------------------------------------------------------------------------------------- pieces
def test_first_divergence_is_where_greedy_choices_first_differ():
    vocab = 5
    lengths = torch.tensor([2])
    sequences = torch.tensor([[1, 2, 3, 4, 0]])  # prompt [1, 2], reference decoded 3, 4, 0
    logits = torch.zeros(1, 5, vocab, dtype=torch.float64)
    logits[0, 1, 3] = 1  # step 0: the converted model also picks 3
    logits[0, 2, 1] = 1  # step 1: it picks 1, the reference 4
    margins = torch.tensor([[0.5, 0.25, 0.1]], dtype=torch.float64)
    decode = _first_divergence(sequences, logits, lengths, margins, 3)
    assert decode["first_divergence"] == {"prompt": 0, "step": 1, "ref_token": 4, "out_token": 1, "ref_margin": 0.25}
    logits[0, 2, 4] = 2
    logits[0, 3, 0] = 1
    assert _first_divergence(sequences, logits, lengths, margins, 3)["first_divergence"] is None


def test_kernel_family_follows_the_kernel_not_the_source_scheme():
    weight_only = {"kernel": "npu_weight_quant_batchmatmul", "spec": {"activation": {"kind": "int", "bits": 8}}}
    mx = {"kernel": "npu_quant_matmul", "weight_dtype": "float8_e4m3fn", "spec": {"activation": None}}
    a4 = {"kernel": "npu_quant_matmul", "kernel_mode": "a4w4", "spec": {"activation": {"kind": "int", "bits": 8}}}
    assert kernel_family({"layers": {"a": weight_only}}) == "weight_only"
    assert kernel_family({"layers": {"a": weight_only, "b": mx}}) == "act8"
    assert kernel_family({"layers": {"a": mx, "b": a4}}) == "act4"


# ------------------------------------------------------------------------------------- CLI and zoo
def test_cli_model_pass_fail_and_usage(outputs, tmp_path):
    out = outputs("awq_gemm_g128", "npu-int4")
    runner = CliRunner()
    result = runner.invoke(cli, ["verify", str(out), "--model", "--new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["decode"]["new_tokens"] == 2
    result = runner.invoke(cli, ["verify", str(out), "--model", "--new-tokens", "0", "--max-kl", "0"])
    assert result.exit_code == 1 and "FAIL whole model" in result.output
    planted = _planted(out, tmp_path / "eps", config=lambda c: c.update(rms_norm_eps=1e-2))
    assert runner.invoke(cli, ["verify", str(planted)]).exit_code == 0  # per layer: fine
    assert runner.invoke(cli, ["verify", str(planted), "--model", "-q"]).exit_code == 1
    assert runner.invoke(cli, ["verify", str(out), "--model", "--tokens", "4"]).exit_code == 2
    assert runner.invoke(cli, ["verify", str(out), "--max-kl", "1"]).exit_code == 2
    missing = runner.invoke(cli, ["verify", str(out), "--model", "--prompts", str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "--prompts" in missing.output


def test_a_closed_pipe_keeps_the_exit_code_of_a_failed_model_check(outputs):
    """As per-layer verify: a report that cannot be printed (``npuconv verify … | true``) keeps exit 1."""
    from test_reliability_signals import run_into_closed_pipe

    out = outputs("awq_gemm_g128", "npu-int4")
    proc = run_into_closed_pipe("verify", out, "--model", "--new-tokens", "0", "--max-kl", "0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_cli_prompts_file(outputs, tmp_path):
    """Prompts go through OUT's tokenizer; this fixture's maps text to unk, so the report says it fell back."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    out = outputs("gptq_v2_b4_g32_asym", "npu-int4")
    result = CliRunner().invoke(cli, ["verify", str(out), "--model", "--prompts", str(prompts), "--new-tokens", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert "unknown token" in json.loads(result.output)["prompts"]["from"]


def test_zoo_model_entry(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(
        f'[[model]]\nsource = "{fixture_dir("gptq_v1_b4_g32_sym")}"\noutput = "out"\ntarget = "npu-int4"\nmodel = true\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["zoo", str(zoo), "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)["entries"][0]
    assert entry["status"] == "converted" and entry["model"]["ok"]
