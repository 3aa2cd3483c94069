"""Shared test helpers: the real-tool fixtures shipped in tests/fixtures (see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from npuconv.io.checkpoint import Checkpoint
from npuconv.readers import open_reader
from npuconv.io.safetensors_io import read_header, read_tensor

FIXTURES = Path(__file__).parent / "fixtures"
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _is_moe(directory: Path) -> bool:
    return any(key in json.loads((directory / "config.json").read_text()) for key in MOE_CONFIG_KEYS)


_CHECKPOINTS = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())
# the dense fixtures (every per-format suite covers each of them); the MoE fixtures are tested in tests/moe
ALL_FIXTURES = [p.name for p in _CHECKPOINTS if not _is_moe(p)]
MOE_FIXTURES = [p.name for p in _CHECKPOINTS if _is_moe(p)]


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


def load_reference(name: str) -> dict[str, torch.Tensor]:
    """The writing tool's own dequantization: ``<module>.weight`` → float32 [N, K]."""
    infos, _ = read_header(FIXTURES / name / "reference_dequant.safetensors")
    return {key: read_tensor(info) for key, info in infos.items()}


def open_fixture(name: str):
    return open_reader(Checkpoint(FIXTURES / name))


@pytest.fixture(params=ALL_FIXTURES)
def any_fixture(request) -> str:
    return request.param
