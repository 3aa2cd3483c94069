"""npuconv.interrupts: one Interrupted per run, deferred while publishing, never lost when swallowed.

The handler is called directly (as the signal module would call it in the main thread), so the
test process keeps its own signal handling.
"""

from __future__ import annotations

import signal

import pytest

from npuconv import interrupts


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    for name, value in (("_received", None), ("_raised", False), ("_depth", 0), ("_finished", False)):
        monkeypatch.setattr(interrupts, name, value)


def test_a_signal_raises_interrupted_with_the_shell_exit_code():
    for signum, code in ((signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGTERM, 143)):
        interrupts._received, interrupts._raised = None, False
        with pytest.raises(interrupts.Interrupted) as caught:
            interrupts._on_signal(signum, None)
        assert caught.value.exit_code == code
        assert not isinstance(caught.value, Exception)  # `except Exception` cannot swallow it


def test_a_second_signal_is_ignored_so_cleanup_runs_to_its_end():
    with pytest.raises(interrupts.Interrupted):
        interrupts._on_signal(signal.SIGINT, None)
    interrupts._on_signal(signal.SIGINT, None)  # during cleanup: no second exception


def test_inside_deferred_a_signal_is_raised_when_the_block_ends():
    steps = []
    with pytest.raises(interrupts.Interrupted):
        with interrupts.deferred():
            interrupts._on_signal(signal.SIGTERM, None)
            steps.append("publish completed")
            with interrupts.deferred():  # nested: raised only by the outermost block
                steps.append("cleanup completed")
    assert steps == ["publish completed", "cleanup completed"]


def test_a_swallowed_signal_still_stops_publishing():
    try:
        interrupts._on_signal(signal.SIGINT, None)
    except BaseException:  # a library that swallows everything
        pass
    with pytest.raises(interrupts.Interrupted):
        interrupts.check()


def test_after_finish_signals_are_ignored():
    interrupts.finish()
    interrupts._on_signal(signal.SIGINT, None)
    interrupts.check()


def test_the_message_says_whether_out_was_published():
    error = interrupts.Interrupted(signal.SIGINT)
    assert interrupts.message(error) == "interrupted (Ctrl-C); nothing was published at the output path"
    error.published = "/data/out"
    assert "after /data/out was published complete" in interrupts.message(error)
