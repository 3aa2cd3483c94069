"""Shard planning, index, atomic publication of the output directory."""

from __future__ import annotations

import pytest
import torch

from npuconv.errors import InputError, OutputError
from npuconv.io.output import AtomicDirectory, Unit, index_json, parse_size, plan_shards, write_shards
from npuconv.io.safetensors_io import TensorPlan, read_header, read_tensor


def unit(name: str, n: int) -> Unit:
    return Unit([TensorPlan(name, torch.uint8, (n,))], lambda: {name: torch.full((n,), 7, dtype=torch.uint8)}, name)


def test_single_shard_name():
    shards = plan_shards([unit("a", 10), unit("b", 10)], 100)
    assert [s.filename for s in shards] == ["model.safetensors"]
    assert index_json(shards) is None


def test_greedy_split_and_index(tmp_path):
    shards = plan_shards([unit("a", 60), unit("b", 60), unit("c", 30), unit("d", 200)], 100)
    assert [[p.name for p in s.plans] for s in shards] == [["a"], ["b", "c"], ["d"]]
    assert shards[0].filename == "model-00001-of-00003.safetensors"
    name, index = index_json(shards)
    assert name == "model.safetensors.index.json"
    assert index["weight_map"]["c"] == "model-00002-of-00003.safetensors"
    assert index["metadata"]["total_size"] == 350
    digests = write_shards(tmp_path, shards)
    assert set(digests) == {s.filename for s in shards}
    infos, metadata = read_header(tmp_path / shards[2].filename)
    assert metadata == {"format": "pt"}
    assert read_tensor(infos["d"]).sum() == 7 * 200


def test_atomic_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicDirectory(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with AtomicDirectory(target) as tmp:
        (tmp / "done").write_text("x")
    assert (target / "done").read_text() == "x"


def test_atomic_directory_refuses_existing_without_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        with AtomicDirectory(target):
            pass
    with AtomicDirectory(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("123", 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "five", "-1GB", "0", "3XB"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        parse_size(text)
