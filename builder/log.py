"""Step logging: each pipeline step prints its name and elapsed time to stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def info(message: str) -> None:
    """Print one progress line to stderr (build logs)."""
    print(f"[makeDiskImage] {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Print a warning to stderr: something accepted that the user should know about."""
    print(f"[makeDiskImage] warning: {message}", file=sys.stderr, flush=True)


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
