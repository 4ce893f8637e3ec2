"""SIGTERM and SIGINT (Slurm preemption, `kill`, Ctrl-C) stop a run cleanly instead of killing it.

Inside the training loop a signal is only recorded: the loop finishes its step, writes resume.pt and then
stops (`RunInterrupted`); anywhere else the run stops at once. The pipeline then writes metrics.json with
`status: interrupted`, prints one line and exits with 128 + the signal number; the same command continues.
Under submitit, whose USR2 handler requeues a job that is about to time out, USR2 gets the same treatment
and submitit's handler is called afterwards, so the requeued job resumes from the exact step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("pcamx")
HANDLED = (signal.SIGTERM, signal.SIGINT)
REQUEUE = signal.SIGUSR2  # submitit's "time is nearly up" signal


class RunInterrupted(Exception):
    """The run was asked to stop by a signal; `step` is the training step it stopped after, if training."""

    def __init__(self, signum: int, step: int | None = None):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}" + (f" after step {step}" if step is not None else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Guard:
    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferring = False
        self.previous: dict[int, Any] = {}

    def on_signal(self, signum: int, frame: Any) -> None:
        self.pending = signum
        if not self.deferring:
            raise RunInterrupted(signum)


_guard = _Guard()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Turn the signals into RunInterrupted for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = list(HANDLED)
    if callable(signal.getsignal(REQUEUE)):  # someone (submitit) handles USR2: finish the step first
        signals.append(REQUEUE)
    _guard.pending, _guard.deferring = None, False
    _guard.previous = {s: signal.signal(s, _guard.on_signal) for s in signals}
    try:
        yield
    finally:
        for s, handler in _guard.previous.items():
            signal.signal(s, handler)
        _guard.previous = {}


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: a signal is recorded for `check()` instead of stopping the code mid-step."""
    before, _guard.deferring = _guard.deferring, True
    try:
        yield
    finally:
        _guard.deferring = before


def requested() -> int | None:
    """The signal received and not yet acted on, if any."""
    return _guard.pending


def forward(signum: int) -> None:
    """After `handling()` ended: hand a signal to the handler now installed again, when it is one we must
    honour (submitit's USR2 requeue, which exits the process itself); otherwise return."""
    previous: Callable | Any = signal.getsignal(signum)
    if signum == REQUEUE and callable(previous):
        log.info("handing %s to the job's own handler (requeue)", signal.Signals(signum).name)
        previous(signum, None)
