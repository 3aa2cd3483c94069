"""``torch``, imported the first time one of its attributes is used.

``import torch`` costs 1–5 s and 250–600 MB; ``npuconv --help``, ``--version`` and ``inspect``
need none of it (issue 15: start-up ≤ 0.3 s). Modules on those paths write::

    from npuconv.lazy_torch import torch

and use ``torch.…`` as usual inside functions: the real module is imported on the first attribute
access (``torch.float16``, ``torch.empty``, …) and every access after that is a dictionary lookup
in ``sys.modules``. Nothing at import time may touch an attribute — a module-level constant or a
default argument such as ``dtype=torch.float32`` would import torch at once; use dtype *names*
there (:mod:`npuconv.io.safetensors_io`'s table). ``tests/test_startup.py`` checks that the
commands above leave ``torch`` out of ``sys.modules``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


class _LazyTorch:
    """Stands for the ``torch`` module; the first attribute access imports it."""

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = _LazyTorch()

__all__ = ["torch"]
