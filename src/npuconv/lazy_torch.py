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
    """Stands for the ``torch`` module; the first attribute access imports it.

    An import cut short by a signal (:class:`npuconv.interrupts.Interrupted`, ``KeyboardInterrupt``:
    anything not an ``Exception``) leaves torch's C extension half-loaded, and a second ``import
    torch`` in the same process fails with an unrelated ``ImportError``. So that interruption is
    remembered and raised again on every later access (cleanup code touching ``torch.…`` then ends
    the run as interrupted, not as an internal error)."""

    _interrupted: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        if _LazyTorch._interrupted is not None:
            raise _LazyTorch._interrupted
        try:
            import torch
        except BaseException as e:
            if not isinstance(e, Exception):  # a signal during the import
                _LazyTorch._interrupted = e
            raise
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = _LazyTorch()

__all__ = ["torch"]
