"""Named moments of a conversion, for sweeping a disturbance (a signal, a rival run) over the whole run.

A *moment* is "just before" or "just after" a call of one of :data:`POINTS` — the steps of a run
from planning to the last cleanup: taking the lock, making the temporary container, writing each
tensor, the side files, each rename and fsync of publishing, the removal of the container and
the release of the lock. :func:`install` wraps those functions so that ``action(i, name)`` runs at
every moment; the i-th moment of a run is the same in every run of the same conversion.

Run as a script it is the CLI under a sweep (``python tests/moments.py K SIGNAL EVENTS_JSON ARGS…``):
it installs npuconv's signal handling exactly as ``python -m npuconv`` does, sends itself SIGNAL
(``SIGINT``, ``SIGKILL``, ``SIGINT2`` = two Ctrl-C, the second during cleanup, …) at moment K, and
writes the names of all moments it passed to EVENTS_JSON (K = -1: just count).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
from typing import Callable

POINTS = [
    "npuconv.convert:make_plan",
    "npuconv.io.publish:OutputLock.acquire",
    "npuconv.io.publish:remove_abandoned",
    "npuconv.io.publish:AtomicDirectory._make_container",
    "npuconv.io.safetensors_io:StreamingWriter.write",
    "npuconv.io.safetensors_io:StreamingWriter.close",
    "npuconv.convert:_finish_output",
    "npuconv.io.publish:check_replaceable",
    "npuconv.io.publish:renameat2",
    "npuconv.io.publish:_fsync_dir",
    "shutil:rmtree",
    "npuconv.io.publish:OutputLock.release",
]


def install(action: Callable[[int, str], None], patch: Callable = setattr) -> list[str]:
    """Wrap every point (with ``patch``, e.g. pytest's ``monkeypatch.setattr``); returns the
    (growing) list of moments passed so far."""
    seen: list[str] = []

    def wrap(label: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            seen.append(f"before {label}")
            action(len(seen) - 1, seen[-1])
            result = fn(*args, **kwargs)
            seen.append(f"after {label}")
            action(len(seen) - 1, seen[-1])
            return result

        return wrapper

    for point in POINTS:
        module_name, _, attr = point.partition(":")
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        patch(owner, name, wrap(attr, getattr(owner, name)))
    return seen


def _main() -> None:
    moment, how, events_path, *args = sys.argv[1:]
    moment = int(moment)
    from npuconv import interrupts

    interrupts.install()

    def action(i: int, label: str) -> None:
        if i == moment:
            if how == "SIGINT2":  # a second Ctrl-C as soon as cleanup starts
                os.kill(os.getpid(), signal.SIGINT)
                _second_at_cleanup()
            else:
                os.kill(os.getpid(), getattr(signal, how))

    def _second_at_cleanup() -> None:
        import shutil

        rmtree = shutil.rmtree

        def rmtree_twice(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return rmtree(*a, **k)

        shutil.rmtree = rmtree_twice

    seen = install(action)
    sys.argv = ["npuconv", *args]
    try:
        from npuconv.__main__ import main

        main()
    finally:
        with open(events_path, "w") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    _main()
