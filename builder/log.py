"""Step logging: each pipeline step prints its name and elapsed time to stderr."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Steps run side by side on threads (builder/concurrent.py): each line is written whole, under this lock.
# (print() writes the text and its newline in two calls, so two threads' lines could run together.)
_LINES = threading.RLock()


def _line(text: str) -> None:
    """Write one whole line to stderr and flush it (nothing when the builder was started with fd 2 closed).

    The log is best effort: a stderr that cannot be written (a full disk, /dev/full) does not fail the build.
    """
    stream = sys.stderr
    if stream is None:
        return
    with _LINES:
        try:
            stream.write(text + "\n")
            stream.flush()
        except OSError:
            pass


def info(message: str) -> None:
    """Print one progress line to stderr (build logs)."""
    _line(f"[makeDiskImage] {message}")


def warn(message: str) -> None:
    """Print a warning to stderr: something accepted that the user should know about."""
    _line(f"[makeDiskImage] warning: {message}")


@contextmanager
def step(name: str) -> Iterator[None]:
    """Log the start and the elapsed time of a named step."""
    started = time.monotonic()
    try:
        info(f"{name} ...")  # inside: a signal arriving while the start is logged still reports the step failed
        yield
    except BaseException:
        info(f"{name} failed after {time.monotonic() - started:.2f}s")
        raise
    info(f"{name} done in {time.monotonic() - started:.2f}s")
