"""Exceptions with a user-facing, one-line message and an exit code.

Exit codes (every command): 0 ok, 1 verification failed, 2 bad input or usage.
"""

from __future__ import annotations


class NpuconvError(Exception):
    """Base class: the message is shown to the user as is, on one line."""

    exit_code = 2


class InputError(NpuconvError):
    """The checkpoint, a file in it, or a command-line value is malformed or inconsistent."""


class UnsupportedError(NpuconvError):
    """The input is well formed but uses a format, scheme or layout npuconv does not handle."""


class OutputError(NpuconvError):
    """The output location cannot be used or written."""


class VerificationFailed(NpuconvError):
    """A numerical check failed."""

    exit_code = 1
