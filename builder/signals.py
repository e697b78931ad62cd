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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import Interrupted

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_NOT_HANDLED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                signal.SIGPIPE, signal.SIGXFSZ}
# Default action "terminate" or "core" (signal(7)); the others' default is to ignore, stop or continue.
_DEFAULT_IGNORE_OR_STOP = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP,
                           signal.SIGTTIN, signal.SIGTTOU}
TERMINATING: tuple[int, ...] = tuple(sorted(
    {int(s) for s in signal.valid_signals()} - {int(s) for s in _NOT_HANDLED | _DEFAULT_IGNORE_OR_STOP}
))
_libc = ctypes.CDLL(None, use_errno=True)
# Looked up now, not in a forked child (preexec_fn) while other threads run: no dlsym after fork.
_prctl = _libc.prctl


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
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)


def _children_by_parent() -> dict[int, list[tuple[int, bool]]]:
    """Every process on the host by parent pid, as (pid, is a zombie), read from /proc."""
    out: dict[int, list[tuple[int, bool]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        out.setdefault(int(fields[1]), []).append((int(name), fields[0] == b"Z"))
    return out


def descendants() -> list[tuple[int, bool]]:
    """(pid, is a zombie) of every process below this one, children first."""
    tree = _children_by_parent()
    found: list[tuple[int, bool]] = []
    todo = [os.getpid()]
    while todo:
        for pid, zombie in tree.get(todo.pop(), []):
            found.append((pid, zombie))
            todo.append(pid)
    return found


@contextmanager
def reaping_descendants() -> Iterator[None]:
    """Within the block this process is a child subreaper; at its end every descendant is killed and reaped.

    A process started in its own session (setsid), daemonized by a double fork or ignoring SIGTERM is
    still re-parented to the builder when its parent exits, never to init: so when the block ends (the
    command returned, failed or a signal unwinds the build) the builder finds all that is left under it
    in /proc and ends it with SIGKILL. Needs no privilege, so it holds for a build user as for root.
    """
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        kill_descendants()
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def kill_descendants(timeout: float = 10.0) -> None:
    """SIGKILL every process below this one and reap those that end up as its children, until none is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = descendants()
        if not left:
            return
        for pid, zombie in left:
            if not zombie:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in [pid for pid, _ in left]:
            try:
                os.waitpid(pid, os.WNOHANG)  # a child of ours (directly, or re-parented to the subreaper)
            except ChildProcessError:
                pass  # not (yet) ours: its parent is being killed, then it is re-parented here
        time.sleep(0.01)
