"""The target API: registry, per-layer targets, the kernel call through the target, TP split rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ALL_FIXTURES, fixture_dir
from npuconv.io.checkpoint import Checkpoint
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import InputError, UnsupportedError
from npuconv.kernels import get_backend
from npuconv.readers import open_reader
from npuconv.registry import get_target, layer_target, native_target, reader_names, target_names
from npuconv.verify import compare, reference_output
from npuconv.writers import WriterOptions

SRC = Path(__file__).resolve().parents[1] / "src"
KERNEL_TARGETS = ["npu-int4", "npu-int8", "npu-w8a8", "npu-mxfp8", "npu-mxfp4", "npu-w4a8", "npu-w4a4", "npu-mxfp4-dual"]


def test_names_are_listed_without_importing_torch():
    code = (
        "import sys; from npuconv.registry import target_names, reader_names; "
        "print(target_names(), reader_names(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""}).stdout
    assert out.strip().endswith("False"), out
    assert "npu-w4a8" in out and "compressed-tensors" in out


def test_every_registered_class_carries_its_name():
    for name in target_names():
        assert get_target(name).name == name
    from npuconv.registry import get_reader

    assert [get_reader(name).format for name in reader_names()] == reader_names()
    assert reader_names()[-1] == "float"  # the fallback is tried last


def test_unknown_names_are_input_errors():
    with pytest.raises(InputError, match="unknown target 'npu-int5'"):
        get_target("npu-int5")
    with pytest.raises(InputError, match="names no target"):
        layer_target({}, {})


def test_layer_target_prefers_the_entry_and_falls_back_to_the_manifest():
    assert layer_target({"target": "npu-int8"}, {"target": "npu-int4"}).name == "npu-int4"
    assert layer_target({"target": "npu-int8"}, {}).name == "npu-int8"  # manifests before per-layer targets
    sglang = layer_target({"target": "npu-mxfp8", "options": {"mx_layout": "sglang"}}, {})
    assert sglang.options.mx_layout == "sglang"


@pytest.mark.parametrize("fixture, expected", [
    ("gptq_v1_b4_g32_sym", "npu-int4"), ("gptq_v1_b8_g128_asym_descact", "npu-int8"), ("ct020_w8a8_int", "npu-w8a8"),
    ("ms_w4a8_dynamic", "npu-w4a8"), ("ct020_mxfp8a16", "npu-mxfp8"), ("ct020_nvfp4a16", None),
])
def test_native_target_of_each_scheme(fixture, expected):
    spec = open_reader(Checkpoint(fixture_dir(fixture))).linear_specs()[0]
    native = native_target(spec)
    assert (native.name if native else None) == expected


def _converted(tmp_path_factory, fixture: str, target: str, **options) -> Path:
    out = tmp_path_factory.mktemp("out") / f"{fixture}-{target}"
    try:
        convert(fixture_dir(fixture), out, ConvertOptions(target=target, writer=WriterOptions(**options)))
    except UnsupportedError:
        pytest.skip(f"{target} does not take {fixture}")
    return out


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_every_layer_records_its_target_and_every_tensor_its_split(tmp_path, fixture):
    written = 0
    for target in KERNEL_TARGETS:
        out = tmp_path / target
        try:
            convert(fixture_dir(fixture), out, ConvertOptions(target=target))
        except UnsupportedError:
            continue
        written += 1
        manifest = json.loads((out / "npuconv.json").read_text())
        for entry in manifest["layers"].values():
            assert entry["target"] == target
            for tensor in entry["tensors"].values():
                split = tensor["split"]
                assert set(split) == {"n", "k"}
                assert all(axis is None or 0 <= axis < len(tensor["shape"]) for axis in split.values())
            weight = entry["tensors"]["weight"]["split"]
            assert weight["n"] is not None and weight["k"] is not None
    # no NPU kernel for the first two; the mixed-precision one fits only `--to npu` (one target per layer)
    assert written or fixture in ("ct020_nvfp4a16", "ct020_fp8_static", "ms_mixed_w8a8dyn_attn_w4a8dyn_mlp", "ct020_mixed_attn_w8a8_mlp_w4a16_g32_asym")


def _layers(out: Path):
    reader = open_reader(Checkpoint(out))
    for spec in reader.linear_specs():
        entry = reader.manifest["layers"][spec.name]
        yield spec, entry, reader.tensors_of(spec), layer_target(reader.manifest, entry)


def _shares(target, spec, entry, tensors, rank, world, parallel):
    return {role: target.split(role, t, entry["tensors"][role], spec, rank, world, parallel) for role, t in tensors.items()}


# (fixture, target) pairs whose every layer splits exactly both ways at world 2
TP_CASES = [
    ("gptq_v1_b4_g32_sym", "npu-int4"), ("gptq_v2_b4_g32_asym", "npu-int4"), ("awq_gemm_g128", "npu-int4"),
    ("ms_w8a16_per_group32_asym", "npu-int8"), ("ct020_w8a8_int", "npu-w8a8"), ("ms_w8a8_mxfp8", "npu-mxfp8"),
    ("ct020_mxfp8a16", "npu-mxfp8"), ("ms_w4a8_dynamic", "npu-w4a4"),
]


@pytest.mark.parametrize("fixture, target_name", TP_CASES)
@pytest.mark.parametrize("parallel", ["column", "row"])
def test_split_shares_run_to_the_unsplit_output(tmp_path_factory, fixture, target_name, parallel):
    """Each rank's share through the target's own kernel call: column ranks concatenate, row ranks sum
    (all-reduce) to the unsplit layer's output — the split rule and the kernel call agree."""
    out = _converted(tmp_path_factory, fixture, target_name, nz=False)
    backend = get_backend("cpu")
    generator = torch.Generator().manual_seed(0)
    world = 2
    for spec, entry, tensors, target in _layers(out):
        x = torch.randn(4, spec.in_features, generator=generator).to(torch.bfloat16)
        y_full, _ = target.run(backend, entry, spec, tensors, x)
        rank_spec = target.split_spec(spec, world, parallel)
        ys, activations = [], []
        for rank in range(world):
            shares = _shares(target, spec, entry, tensors, rank, world, parallel)
            x_r = x if parallel == "column" else x.chunk(world, dim=-1)[rank]
            y_r, x_eff = target.run(backend, entry, rank_spec, shares, x_r)
            ys.append(y_r.double())
            activations.append(x_eff)
        if parallel == "column":  # same activations on every rank: the columns of the unsplit output
            _, rel_l2, _ = compare(torch.cat(ys, dim=-1), y_full.double())
            assert rel_l2 <= 1e-6, (spec.name, rel_l2)
        else:  # each rank quantizes its own K slice: compare the all-reduce with the reference of those activations
            layer = target.read_layer(spec, tensors)
            y_ref = reference_output(layer, torch.cat(activations, dim=-1))
            _, rel_l2, _ = compare(sum(ys), y_ref)
            assert rel_l2 <= target.thresholds(entry, x.dtype).max_rel_l2, (spec.name, rel_l2)


def test_w4a8_row_split_takes_scale_bias_from_the_partials(tmp_path_factory):
    out = _converted(tmp_path_factory, "ms_w4a8_dynamic", "npu-w4a8")
    for spec, entry, tensors, target in _layers(out):
        if "scale_bias_partials" not in tensors:
            continue
        role, meta = "scale_bias_partials", entry["tensors"]["scale_bias_partials"]
        shares = [target.split(role, tensors[role], meta, spec, r, 4, "row") for r in range(4)]
        assert all(s.shape[-1] == 4 for s in shares)
        total = torch.stack([s.sum(-1) for s in shares]).sum(0)
        assert torch.allclose(total, tensors["scale_bias"], rtol=1e-5, atol=1e-5)
        with pytest.raises(InputError, match="does not divide the 16"):
            target.split(role, tensors[role], meta, spec, 0, 3, "row")
        with pytest.raises(InputError, match="from scale_bias_partials"):
            target.split("scale_bias", tensors["scale_bias"], entry["tensors"]["scale_bias"], spec, 0, 2, "row")
        return
    pytest.fail("no row-parallel W4A8 layer in the fixture")


def test_act_order_row_split_is_refused_when_groups_cross_the_rank_boundary(tmp_path_factory):
    out = _converted(tmp_path_factory, "gptq_v1_b4_g64_asym_descact", "npu-int4")
    refused = 0
    for spec, entry, tensors, target in _layers(out):
        perm = tensors["perm"].long()
        half = spec.in_features // 2
        aligned = bool((perm[:half] < half).all())
        if aligned:
            local = target.split("perm", tensors["perm"], entry["tensors"]["perm"], spec, 1, 2, "row")
            assert torch.equal(local.long(), perm[half:] - half)
        else:
            with pytest.raises(InputError, match="not aligned to the rank boundary"):
                target.split("perm", tensors["perm"], entry["tensors"]["perm"], spec, 1, 2, "row")
            refused += 1
        # column parallelism never touches K: the permutation is replicated
        same = target.split("perm", tensors["perm"], entry["tensors"]["perm"], spec, 1, 2, "column")
        assert torch.equal(same, tensors["perm"])
    assert refused  # the fixture's act-order mixes both halves of K


def test_group_scales_refuse_a_rank_boundary_inside_a_group(tmp_path_factory):
    out = _converted(tmp_path_factory, "gptq_v1_b4_g32_sym", "npu-int4")
    spec, entry, tensors, target = next(layer for layer in _layers(out) if layer[0].in_features == 128)  # group 32
    meta = entry["tensors"]["antiquant_scale"]
    assert target.split("antiquant_scale", tensors["antiquant_scale"], meta, spec, 0, 4, "row").shape[0] == 1
    with pytest.raises(InputError, match="whole 32-feature units"):
        target.split("antiquant_scale", tensors["antiquant_scale"], meta, spec, 0, 8, "row")


def test_nz_storage_must_be_split_in_nd(tmp_path_factory):
    out = _converted(tmp_path_factory, "ct020_w8a8_int", "npu-w8a8")  # NZ weights by default
    reader = open_reader(Checkpoint(out))
    spec = reader.linear_specs()[0]
    entry = reader.manifest["layers"][spec.name]
    meta = entry["tensors"]["weight"]
    assert meta["layout"] == "nz"
    stored = reader.ckpt.get(meta["name"])
    target = layer_target(reader.manifest, entry)
    with pytest.raises(InputError, match="split it in ND"):
        target.split("weight", stored, meta, spec, 0, 2, "column")
    nd = reader.tensors_of(spec)["weight"]
    assert target.split("weight", nd, meta, spec, 1, 2, "column").shape[-1] == spec.out_features // 2


def test_static_w8a8_quant_bias_goes_to_row_rank_0(tmp_path_factory):
    """quant_bias = round(bias/deq − input_offset·Σ_k q) is linear in K: rank 0 carries all of it, the
    others zeros, and the all-reduce is exact (as the engines pass it; numerics checked per rank in
    tests/engines/test_engine_layers.py and through vLLM-Ascend in tests/engines/vllm/)."""
    out = _converted(tmp_path_factory, "ms_w8a8_static_fp16", "npu-w8a8")
    spec, entry, tensors, target = next(_layers(out))
    rank0 = target.split("quant_bias", tensors["quant_bias"], entry["tensors"]["quant_bias"], spec, 0, 2, "row")
    rank1 = target.split("quant_bias", tensors["quant_bias"], entry["tensors"]["quant_bias"], spec, 1, 2, "row")
    assert torch.equal(rank0, tensors["quant_bias"]) and not rank1.any()
    column = target.split("quant_bias", tensors["quant_bias"], entry["tensors"]["quant_bias"], spec, 1, 2, "column")
    assert torch.equal(column, tensors["quant_bias"][spec.out_features // 2:])


def test_runtime_and_verify_do_not_sniff_manifest_keys():
    for module in ("runtime.py", "verify.py"):
        text = (SRC / "npuconv" / module).read_text()
        for needle in ("kernel_mode", '"weight_dtype" in', '"deq_scale" in', "npu_weight_quant_batchmatmul\"", "default_target"):
            assert needle not in text, (module, needle)


class ToyTarget(get_target("npu-int8").__class__):
    """A target defined outside npuconv: one class + one registration line."""

    name = "toy-int8"
    native_rank = None


def test_a_new_target_is_one_class_and_one_registration(tmp_path, monkeypatch):
    from npuconv import registry
    from npuconv.verify import VerifyOptions, verify

    monkeypatch.setattr(registry, "TARGETS", registry.Registry("target"))
    for name in ("npu-int8",):
        registry.register_target(name, "npuconv.writers.npu_int8:NpuInt8Target")
    registry.register_target("toy-int8", f"{__name__}:ToyTarget")
    assert "toy-int8" in target_names()
    out = tmp_path / "out"
    convert(fixture_dir("gptq_v1_b8_g128_asym_descact"), out, ConvertOptions(target="toy-int8"))
    manifest = json.loads((out / "npuconv.json").read_text())
    assert manifest["target"] == "toy-int8" and {e["target"] for e in manifest["layers"].values()} == {"toy-int8"}
    report = verify(out, VerifyOptions(device="cpu", tokens=4))
    assert report["ok"] and report["passed"] == len(manifest["layers"])
