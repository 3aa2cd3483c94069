"""Shared test helpers: the real-tool fixtures shipped in tests/fixtures (see its README)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from npuconv.checkpoint import Checkpoint
from npuconv.readers import open_reader
from npuconv.safetensors_io import read_header, read_tensor

FIXTURES = Path(__file__).parent / "fixtures"
ALL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


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
