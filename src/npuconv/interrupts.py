"""Signals as one exception, raised once, never in the middle of publishing or cleaning up.

The CLI calls :func:`install` first thing (before importing click, rich or torch). From then on
SIGINT, SIGTERM and SIGHUP each raise :class:`Interrupted` (a ``BaseException``, so neither
``except Exception`` nor click's own Ctrl-C handling swallows it) in the main thread, once:

* a second signal while the first is being handled (cleanup of the temporary output, a second
  Ctrl-C) is recorded and ignored, so cleanup always runs to its end;
* inside a :func:`deferred` block (publishing OUT, removing a temporary directory, taking the
  lock) a signal is only recorded and raised when the outermost block ends, so OUT is never left
  half swapped and no temporary directory is left half removed;
* :func:`check` raises a recorded signal that something swallowed (a library that catches
  ``BaseException``); the output is never published after a signal arrived.

Exit codes (``128 + signal``, the shell convention): SIGINT 130, SIGHUP 129, SIGTERM 143.
Without :func:`install` (the library used from Python) nothing changes: Python's own
``KeyboardInterrupt`` applies and :func:`deferred` / :func:`check` are no-ops.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

HANDLED = ("SIGINT", "SIGTERM", "SIGHUP")
NAMES = {"SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "terminated (SIGTERM)", "SIGHUP": "hung up (SIGHUP)"}


class Interrupted(BaseException):
    """A handled signal arrived; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        self.published = None  # set by npuconv.io.publish when OUT was completed before the signal took effect
        name = signal.Signals(signum).name
        super().__init__(NAMES.get(name, name))


_received: int | None = None  # the first handled signal, once it arrived
_raised = False  # whether Interrupted was raised for it already
_depth = 0  # nesting of deferred() blocks
_finished = False  # the command is done: signals are ignored


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to :class:`Interrupted` (main thread only)."""
    for name in HANDLED:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)


def finish() -> None:
    """The command is done (its exit code decided): signals from now on are ignored, so that one
    arriving during interpreter shutdown cannot print a traceback or change the exit code."""
    global _finished
    _finished = True
    for name in HANDLED:  # SIG_IGN, not a flag only: Python resets its own handlers to SIG_DFL at exit
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is _on_signal:
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _on_signal(signum: int, _frame) -> None:
    global _received
    if _received is not None or _finished:  # already being handled (or done): let the cleanup finish
        return
    _received = signum
    if _depth == 0:
        _raise()


def _raise() -> None:
    global _raised
    _raised = True
    raise Interrupted(_received)


def check() -> None:
    """Raise :class:`Interrupted` if a signal was ever recorded (also one that something swallowed).

    Called right before publishing: after a signal, the output is never published."""
    if _received is not None:
        _raise()


@contextmanager
def deferred() -> Iterator[None]:
    """Record signals during the block; raise the first one when the outermost block ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _received is not None and not _raised:
        _raise()


def message(error: Interrupted) -> str:
    """The one line the CLI prints for a handled signal."""
    if error.published is not None:
        return f"{error}: stopped after {error.published} was published complete"
    return f"{error}; nothing was published at the output path"
