"""The writing libraries as oracles: each lives in its own venv built by ``.ci/oracle-env.sh``.

``${NPUCONV_ORACLE_ENVS:-~/.cache/npuconv/oracles}/<name>/bin/python`` (``modelslim``: msmodelslim
26.1.0 + transformers 4.57.3; ``compressed-tensors``: compressed-tensors 0.20.0). The tests run
the tool there in a subprocess (``python -m npuconv.references.<tool>`` or a small script) and
compare in this process. When the library is importable here, this interpreter is used instead.
Without either, a test skips on a developer machine and FAILS in CI (``CI`` set), so the oracle
can never silently stop running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = {"modelslim": "msmodelslim", "compressed-tensors": "compressed_tensors"}


def oracle_root() -> Path:
    return Path(os.environ.get("NPUCONV_ORACLE_ENVS") or Path.home() / ".cache" / "npuconv" / "oracles")


def oracle_python(name: str) -> str:
    """The interpreter that has the ``name`` library (see the module docstring for skip / fail)."""
    if importlib.util.find_spec(LIBRARIES[name]) is not None:
        return sys.executable
    python = oracle_root() / name / "bin" / "python"
    if python.is_file():
        return str(python)
    message = f"oracle env '{name}' missing: run .ci/oracle-env.sh (looked in {oracle_root()})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_oracle(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with the oracle's interpreter and this worktree's npuconv on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    done = subprocess.run([oracle_python(name), *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"oracle {name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def tool_dequant(name: str, directories: list[Path], out_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The tool's dequantization of each directory (module prefix → float32 weight), one subprocess;
    a str instead where the tool's own packer disagrees with the stored tensors (ToolMismatch)."""
    module = {"modelslim": "npuconv.references.modelslim", "compressed-tensors": "npuconv.references.compressed_tensors"}[name]
    outs = [out_dir / f"tool_dequant_{i}.safetensors" for i in range(len(directories))]
    pairs = json.dumps([[str(d), str(o)] for d, o in zip(directories, outs)])
    script = (f"import json, sys, pathlib\nfrom {module} import dequantize_directory\n"
              f"from npuconv.references import ToolMismatch, dump_main\n"
              f"for src, out in json.loads(sys.argv[1]):\n    try:\n        dump_main(dequantize_directory, [src, out])\n"
              f"    except ToolMismatch as e:\n        pathlib.Path(out + '.mismatch').write_text(str(e))\n")
    run_oracle(name, "-c", script, pairs)
    return [_load_or_mismatch(o) for o in outs]


def _load_or_mismatch(path: Path) -> dict[str, torch.Tensor] | str:
    """The tool's weights, or (a str) the tool's refusal: stored tensors its own packer would not write."""
    from safetensors.torch import load_file

    mismatch = path.with_name(path.name + ".mismatch")
    if mismatch.is_file():
        return mismatch.read_text()
    return {k.removesuffix(".weight"): v for k, v in load_file(path).items()}
