"""Signals and child lifetimes: every terminating signal unwinds the build so cleanup runs; helpers die with it.

The default action of SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGALRM, the real-time signals... kills the
interpreter on the spot: no `finally`, so temporary directories and partial images stay behind.
`handle_termination` turns each of them into an `Interrupted` exception (ignoring repeats, so a second
Ctrl-C cannot cut the cleanup short). Not among them: SIGKILL and SIGSTOP (nobody can catch them), the
hardware faults SIGSEGV, SIGBUS, SIGILL and SIGFPE (a handler cannot return from a real fault), and SIGPIPE
and SIGXFSZ, which Python ignores from the start (the write fails with EPIPE or EFBIG and the build
unwinds on that error).
`die_with_parent` is a preexec hook that makes a long-lived child (the namespace helper running mkfs,
qemu) receive SIGKILL when the builder dies, even by SIGKILL, so nothing outlives a killed build.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import Interrupted

PR_SET_PDEATHSIG = 1
_NOT_HANDLED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                signal.SIGPIPE, signal.SIGXFSZ}
# Default action "terminate" or "core" (signal(7)); the others' default is to ignore, stop or continue.
_DEFAULT_IGNORE_OR_STOP = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP,
                           signal.SIGTTIN, signal.SIGTTOU}
TERMINATING: tuple[int, ...] = tuple(sorted(
    {int(s) for s in signal.valid_signals()} - {int(s) for s in _NOT_HANDLED | _DEFAULT_IGNORE_OR_STOP}
))
_libc = ctypes.CDLL(None, use_errno=True)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """Signal handler: ignore further termination signals, then unwind the build."""
    for sig in TERMINATING:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, every signal in TERMINATING raises Interrupted; the previous handlers come back after."""
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in TERMINATING}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """In a forked child before exec (preexec_fn): receive SIGKILL when the builder process dies."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
