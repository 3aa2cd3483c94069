"""Checkpoint discovery: single file, sharded with index, and index/shard disagreements."""

from __future__ import annotations

import json
import os

import pytest
import torch

from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError
from npuconv.io.safetensors_io import save_file


def sharded(tmp_path, *, index_extra=None, drop_from_index=None):
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, root / "model-00001-of-00002.safetensors")
    save_file({"c": torch.arange(4)}, root / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors", **(index_extra or {})}
    for name in drop_from_index or ():
        weight_map.pop(name)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def test_sharded_reading(tmp_path):
    ckpt = Checkpoint(sharded(tmp_path))
    assert sorted(ckpt.names()) == ["a", "b", "c"]
    assert torch.equal(ckpt.get("c"), torch.arange(4))
    assert [p.name for p in ckpt.weight_files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ckpt.config["model_type"] == "llama"


def test_index_names_missing_file(tmp_path):
    with pytest.raises(InputError, match="'ghost.safetensors', which does not exist"):
        Checkpoint(sharded(tmp_path, index_extra={"z": "ghost.safetensors"}))


def test_index_names_missing_tensor(tmp_path):
    with pytest.raises(InputError, match="index names tensor 'z'"):
        Checkpoint(sharded(tmp_path, index_extra={"z": "model-00002-of-00002.safetensors"}))


def test_tensor_in_shard_but_not_in_index(tmp_path):
    with pytest.raises(InputError, match="tensor 'b' is in .* but not in the index"):
        Checkpoint(sharded(tmp_path, drop_from_index=["b"]))


def test_index_points_to_wrong_shard(tmp_path):
    with pytest.raises(InputError, match="index names tensor .c. in .model-00001-of-00002.safetensors., but no shard contains it"):
        Checkpoint(sharded(tmp_path, index_extra={"c": "model-00001-of-00002.safetensors"}))


def test_index_without_weight_map(tmp_path):
    root = sharded(tmp_path)
    (root / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(InputError, match="weight_map"):
        Checkpoint(root)


def test_empty_and_missing_directories(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no \\*.safetensors"):
        Checkpoint(tmp_path / "cfg")


def test_invalid_config_json(tmp_path):
    root = sharded(tmp_path)
    (root / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json: invalid JSON"):
        Checkpoint(root).config


def test_symlink_outside_model_dir_is_refused(tmp_path):
    root = sharded(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    os.symlink(outside, root / "tokenizer.json")
    with pytest.raises(InputError, match="outside the model directory"):
        Checkpoint(root).side_files()


def test_reference_files_are_not_weights(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    save_file({"w": torch.zeros(1)}, root / "model.safetensors")
    save_file({"w": torch.ones(1)}, root / "reference_dequant.safetensors")
    ckpt = Checkpoint(root)
    assert [p.name for p in ckpt.weight_files] == ["model.safetensors"]
