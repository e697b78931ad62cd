"""Signals and child lifetimes: SIGTERM/SIGINT/SIGHUP unwind the build so cleanup runs; helpers die with the builder.

Python's default SIGTERM and SIGHUP kill the interpreter on the spot: no `finally`, so temporary
directories and partial images stay behind. `handle_termination` turns each of these signals into an
`Interrupted` exception (ignoring repeats, so a second Ctrl-C cannot cut the cleanup short).
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
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_libc = ctypes.CDLL(None, use_errno=True)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """Signal handler: ignore further termination signals, then unwind the build."""
    for sig in TERMINATING:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise Interrupted; the previous handlers come back after."""
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
