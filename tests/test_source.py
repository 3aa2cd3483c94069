"""MODEL as a Hugging Face repo id, resolved through huggingface_hub's real offline cache (no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES
from npuconv.io.source import split_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path, fixture: str = "gptq_v1_b4_g32_sym"):
    """A cache laid out as huggingface_hub writes it: blobs, snapshots/<commit> symlinks, refs/main."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-gptq"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted((FIXTURES / fixture).iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def run_cli(args, cache, **env):
    full_env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "npuconv", *args], capture_output=True, text=True, env=full_env, timeout=120)


def test_split_repo_id():
    assert split_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert split_repo_id("org/name") == ("org/name", None)


def test_inspect_hub_id_from_offline_cache(tmp_path):
    cache = hub_cache(tmp_path)
    result = run_cli(["inspect", "acme/tiny-gptq", "--json"], cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "acme/tiny-gptq"
    assert report["revision"] == COMMIT
    assert report["num_tensors"] > 0


def test_hub_revision_is_honoured(tmp_path):
    cache = hub_cache(tmp_path)
    result = run_cli(["inspect", f"acme/tiny-gptq@{COMMIT}", "--json"], cache)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["revision"] == COMMIT


def test_uncached_repo_offline_is_a_clean_error(tmp_path):
    cache = hub_cache(tmp_path)
    result = run_cli(["inspect", "acme/not-there"], cache)
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["./missing-dir", "not a repo", "/abs/missing"])
def test_missing_local_path_is_a_clean_error(tmp_path, bad):
    result = run_cli(["inspect", bad], hub_cache(tmp_path))
    assert result.returncode == 2
    assert "no such directory" in result.stderr


def test_revision_flag_is_the_same_as_at_revision(tmp_path):
    cache = hub_cache(tmp_path)
    result = run_cli(["inspect", "acme/tiny-gptq", "--revision", COMMIT, "--json"], cache)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["revision"] == COMMIT
    out = tmp_path / "out"
    result = run_cli(["convert", "acme/tiny-gptq", str(out), "--to", "float", "--revision", "main", "-q"], cache)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "npuconv.json").read_text())["source"]["revision"] == COMMIT


def test_revision_conflicts_are_clean_errors(tmp_path):
    cache = hub_cache(tmp_path)
    result = run_cli(["inspect", "acme/tiny-gptq@main", "--revision", "v2"], cache)
    assert result.returncode == 2 and "names revision 'main' but --revision says 'v2'" in result.stderr
    result = run_cli(["inspect", str(FIXTURES / "gptq_v1_b4_g32_sym"), "--revision", "main"], cache)
    assert result.returncode == 2 and "is a local directory" in result.stderr


def test_missing_revision_of_a_cached_repo_is_named(tmp_path):
    cache = hub_cache(tmp_path)
    result = run_cli(["inspect", "acme/tiny-gptq@v2.0"], cache)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "revision 'v2.0' is not in the local Hugging Face cache (cached: main)" in message
    assert "Traceback" not in result.stderr
