"""``npuconv.lazy_torch``: an ``import torch`` cut short by a signal is raised again on later use,
never retried (a half-loaded torch cannot be imported twice in one process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_interrupted_import_is_raised_again_not_retried(tmp_path):
    # a stand-in "torch": the first import is interrupted, a second one fails as torch's C extension does
    (tmp_path / "torch.py").write_text(textwrap.dedent("""
        import builtins
        if getattr(builtins, "_fake_torch_tried", False):
            raise ImportError("cannot load module more than once per process")
        builtins._fake_torch_tried = True
        raise KeyboardInterrupt
    """))
    script = textwrap.dedent("""
        from npuconv.lazy_torch import torch
        outcomes = []
        for _ in range(2):
            try:
                torch.float32
            except KeyboardInterrupt:
                outcomes.append("interrupted")
            except ImportError as e:
                outcomes.append(f"import error: {e}")
        print(outcomes)
    """)
    env = {"PYTHONPATH": f"{tmp_path}:{SRC}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "['interrupted', 'interrupted']", result.stdout + result.stderr


def test_real_torch_attribute():
    from npuconv.lazy_torch import torch
    import torch as real

    assert torch.float16 is real.float16
