"""Fixtures of the SGLang engine tests: the venv, the converted cases, one harness run per TP degree.

Not a conftest.py: this folder is put on sys.path while its tests are collected, and a second
module named ``conftest`` there would shadow tests/conftest.py for every ``from conftest import``.

The venv is ``${NPUCONV_ENGINE_ENVS:-~/.cache/npuconv/engines}/sglang`` (made by
``.ci/engine-env-sglang.sh``, which ``.ci/run`` calls first). Without it the tests skip locally and
FAIL under ``CI=true``: CI must never pass by skipping the engine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_cases import CASES, FIXTURES, HERE, REPO


def sglang_python() -> Path:
    root = Path(os.environ.get("NPUCONV_ENGINE_ENVS") or Path.home() / ".cache" / "npuconv" / "engines")
    return root / "sglang" / "bin" / "python"


@pytest.fixture(scope="session")
def sglang_env() -> Path:
    python = sglang_python()
    if not python.exists():
        message = f"SGLang venv missing ({python}); run .ci/engine-env-sglang.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every case converted with the npuconv CLI: case → (OUT, source fixture)."""
    root = tmp_path_factory.mktemp("sglang-outputs")
    out = {}
    for case, (fixture, target) in CASES.items():
        path = root / case
        subprocess.run([sys.executable, "-m", "npuconv", "convert", "-q", str(FIXTURES / fixture), str(path),
                        "--to", target], check=True, env=_env())
        out[case] = (path, FIXTURES / fixture)
    return out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(HERE), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_harness(python: Path, cases: dict, tp: int, *extra: str) -> list[dict]:
    """One harness process (TP ranks forked inside it) over all cases; its per-rank results."""
    args = [str(python), str(HERE / "harness.py"), "--tp", str(tp), "--port", str(_free_port()), *extra]
    for case, (out, fixture) in cases.items():
        args += ["--case", f"{case}={out}={fixture}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"harness failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="session")
def sglang_results(sglang_env, converted):
    """tp → per-rank results; each TP degree runs once for all cases (SGLang's import costs ~15 s)."""
    cache: dict[int, list[dict]] = {}

    def get(tp: int) -> list[dict]:
        if tp not in cache:
            cache[tp] = run_harness(sglang_env, converted, tp)
            report = os.environ.get("NPUCONV_SGLANG_REPORT")  # optional: keep the per-case numbers
            if report:
                Path(f"{report}.tp{tp}.json").write_text(json.dumps(cache[tp], indent=1))
        return cache[tp]

    return get
