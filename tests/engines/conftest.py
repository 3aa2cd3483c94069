"""Shared plumbing of the engine tests (tests/engines/<engine>/).

The engines' real packages live in venvs under ``${NPUCONV_ENGINE_ENVS:-~/.cache/npuconv/engines}/<name>``,
built by ``.ci/engine-env-<name>.sh`` (which ``.ci/run`` calls before pytest). The tests run the engine
code in that venv's interpreter as a subprocess, with ``tests/engines/support`` (the fake ``torch_npu``:
npuconv's kernel emulation) and this checkout's ``src`` first on ``PYTHONPATH``. Without the venv a
test skips locally, but FAILS when ``CI=true``: in CI the engine tests must run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent / "support"
FIXTURES = ROOT / "tests" / "fixtures"


def engine_env(name: str) -> Path:
    return Path(os.environ.get("NPUCONV_ENGINE_ENVS", Path.home() / ".cache" / "npuconv" / "engines")) / name


def engine_python(name: str) -> Path:
    """The venv interpreter of engine ``name``; skip (fail under CI=true) when it is not built."""
    python = engine_env(name) / "bin" / "python"
    ready = engine_env(name) / ".npuconv-ready"
    if not (python.is_file() and ready.is_file()):
        message = f"{name} engine venv not built ({engine_env(name)}); run .ci/engine-env-{name}.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_in_engine(name: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments) with engine ``name``'s interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([str(engine_python(name)), *args], env=env, capture_output=True, text=True, timeout=timeout)


def convert(fixture: str, target: str, out: Path) -> Path:
    """``npuconv convert tests/fixtures/FIXTURE OUT --to TARGET`` (the README's command)."""
    result = subprocess.run(
        [sys.executable, "-m", "npuconv", "convert", str(FIXTURES / fixture), str(out), "--to", target, "-q"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def engines():
    """The helpers above, for tests under tests/engines/<engine>/ (conftest modules are not importable)."""
    import types

    return types.SimpleNamespace(
        root=ROOT, fixtures=FIXTURES, support=SUPPORT, python=engine_python, run=run_in_engine, convert=convert
    )
