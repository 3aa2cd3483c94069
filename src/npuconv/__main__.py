"""``python -m npuconv`` and the ``npuconv`` console script.

Signal handling is installed here, before click, rich or torch are imported, so a Ctrl-C at any
moment of start-up is one clean line and exit 130 too (see :mod:`npuconv.interrupts`).
"""

import os
import sys


def _standard_streams() -> None:
    """Give closed stdin/stdout/stderr (``npuconv … >&-``) /dev/null, so that no file we open gets fd
    0-2 (and receives someone's prints), and printing to a closed stream is a no-op, not a crash."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))


def main() -> None:
    from npuconv import interrupts

    interrupts.install()
    try:
        _standard_streams()
        from npuconv.cli import main as cli_main

        cli_main()
    except interrupts.Interrupted as e:  # before the CLI's own handler is in place (start-up, parsing)
        interrupts.finish()
        sys.stderr.write(f"error: {interrupts.message(e)}\n")
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
