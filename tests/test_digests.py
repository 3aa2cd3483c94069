"""Shard checksums (``npuconv.io.digests``, scheme ``sha256-parts-1``): the recorded digests
re-derived with hashlib from byte ranges read back from the files (not with npuconv's code), a
changed tensor detected and named, old whole-file manifests still accepted, ``--skip-checksum``."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from npuconv.cli import cli
from npuconv.convert import ConvertOptions, convert
from npuconv.errors import InputError
from npuconv.io.digests import ChecksumMismatch, check_shards
from npuconv.runtime import load_output
from npuconv.verify import VerifyOptions, verify

FIXTURE = "gptq_v1_b4_g32_sym"
LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One GPTQ → npu-int4 output in several shards (small --max-shard-size), converted once."""
    out = tmp_path_factory.mktemp("digests") / "out"
    convert(FIXTURES / FIXTURE, out, ConvertOptions("npu-int4", max_shard_bytes=40_000, workers=3))
    return out


def copy_of(converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for path in converted.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def manifest_of(out) -> dict:
    return json.loads((out / "npuconv.json").read_text())


def spans(path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(header part length 8 + H, {tensor: absolute (start, end)}), parsed here with struct/json."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    return 8 + length, {name: (8 + length + e["data_offsets"][0], 8 + length + e["data_offsets"][1]) for name, e in header.items()}


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_recorded_digests_are_sha256_of_the_documented_byte_ranges(converted):
    shards = manifest_of(converted)["shards"]
    assert len(shards) > 1 and sorted(shards) == sorted(p.name for p in converted.glob("*.safetensors"))
    for filename, record in shards.items():
        data = (converted / filename).read_bytes()
        head, tensors = spans(converted / filename)
        assert record["scheme"] == "sha256-parts-1" and record["size"] == len(data)
        assert record["header"] == hashlib.sha256(data[:head]).hexdigest()
        assert set(record["tensors"]) == set(tensors)
        for name, (start, end) in tensors.items():
            assert record["tensors"][name] == hashlib.sha256(data[start:end]).hexdigest(), name
        # every byte in exactly one part: header, then the tensors tiling the rest
        ordered = sorted(tensors.values())
        assert [head, *(e for _, e in ordered)][:-1] == [s for s, _ in ordered] and ordered[-1][1] == len(data)
        parts = [data[:head]] + [data[s:e] for s, e in ordered]
        assert record["digest"] == hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()


def test_workers_do_not_change_the_records(converted, tmp_path):
    out = tmp_path / "serial"
    convert(FIXTURES / FIXTURE, out, ConvertOptions("npu-int4", max_shard_bytes=40_000, workers=0))
    assert manifest_of(out)["shards"] == manifest_of(converted)["shards"]


def test_untouched_output_passes(converted):
    check_shards(converted, manifest_of(converted), workers=4)
    check_shards(converted, manifest_of(converted), workers=1)


def test_a_changed_tensor_is_named(converted, tmp_path):
    out = copy_of(converted, tmp_path)
    manifest = manifest_of(out)
    name = f"{LAYER}.weight"
    filename = next(f for f, r in manifest["shards"].items() if name in r["tensors"])
    start, end = spans(out / filename)[1][name]
    flip_byte(out / filename, (start + end) // 2)
    with pytest.raises(ChecksumMismatch) as caught:
        check_shards(out, manifest)
    message = str(caught.value)
    assert message == f"{filename}: sha256 differs from npuconv.json for tensor '{name}' (modified after conversion)"
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1 and f"tensor '{name}'" in result.output and "--skip-checksum" in result.output
    with pytest.raises(ChecksumMismatch, match=f"tensor '{name}'"):
        load_output(out)


def test_changes_in_two_shards_are_all_reported(converted, tmp_path):
    out = copy_of(converted, tmp_path)
    manifest = manifest_of(out)
    changed = {}
    for filename in sorted(manifest["shards"])[:2]:
        name, (start, _) = sorted(spans(out / filename)[1].items(), key=lambda kv: kv[1])[-1]  # its last tensor
        flip_byte(out / filename, start)
        changed[filename] = name
    with pytest.raises(ChecksumMismatch) as caught:
        check_shards(out, manifest)
    assert str(caught.value) == "; ".join(
        f"{f}: sha256 differs from npuconv.json for tensor '{n}' (modified after conversion)" for f, n in changed.items()
    )


def test_a_changed_header_or_size_is_detected(converted, tmp_path):
    out = copy_of(converted, tmp_path)
    manifest = manifest_of(out)
    filename = sorted(manifest["shards"])[0]
    head, _ = spans(out / filename)
    flip_byte(out / filename, head - 1)  # the header's last padding byte: ' ' → '!'
    with pytest.raises(ChecksumMismatch, match="for the safetensors header"):
        check_shards(out, manifest)
    flip_byte(out / filename, head - 1)
    check_shards(out, manifest)
    with open(out / filename, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumMismatch, match=f"{filename}: .* bytes where npuconv.json records"):
        check_shards(out, manifest)


def test_an_edited_manifest_is_refused(converted):
    manifest = manifest_of(converted)
    filename = sorted(manifest["shards"])[0]
    manifest["shards"][filename]["digest"] = "0" * 64
    with pytest.raises(ChecksumMismatch, match="does not match its parts"):
        check_shards(converted, manifest)
    manifest["shards"][filename] = {"scheme": "sha256-parts-9"}
    with pytest.raises(InputError, match="not a sha256-parts-1 record"):
        check_shards(converted, manifest)


def test_old_whole_file_manifests_still_verify(converted, tmp_path):
    out = copy_of(converted, tmp_path)
    manifest = manifest_of(out)
    manifest["shards"] = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in manifest["shards"]}
    (out / "npuconv.json").write_text(json.dumps(manifest))
    assert verify(out, VerifyOptions())["ok"]
    assert load_output(out)
    filename = sorted(manifest["shards"])[1]
    flip_byte(out / filename, (out / filename).stat().st_size - 1)
    with pytest.raises(ChecksumMismatch) as caught:
        verify(out, VerifyOptions())
    assert str(caught.value) == f"{filename}: sha256 differs from npuconv.json (modified after conversion)"


def test_skip_checksum_runs_the_numeric_checks(converted, tmp_path):
    out = copy_of(converted, tmp_path)
    manifest = manifest_of(out)
    name = "lm_head.weight"  # a copied tensor: the layers still pass once the checksum is skipped
    filename = next(f for f, r in manifest["shards"].items() if name in r["tensors"])
    flip_byte(out / filename, spans(out / filename)[1][name][0])
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1 and f"tensor '{name}'" in result.output
    result = CliRunner().invoke(cli, ["verify", str(out), "--skip-checksum", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"]
    assert load_output(out, check_checksums=False)
