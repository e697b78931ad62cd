"""Independent steps side by side (each mostly waits on a subprocess), so the second core does part of them.

When the main thread is interrupted (a signal unwinds the build) or fails while a step runs on another
thread, the tools still running are killed first, so that thread ends at once and the build stops as
quickly as a single-threaded one would; the step on the thread then reports itself failed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from .log import step
from .signals import descendants

Step = tuple[str, Callable[[], None]]


def _logged(name: str, fn: Callable[[], None]) -> None:
    """fn inside a logged step."""
    with step(name):
        fn()


def _kill_tools() -> None:
    """SIGKILL the tools the builder runs (its process group; not the raw image's janitor, which left it);
    not reaped here, so the thread that started each sees it die."""
    group = os.getpgrp()
    for pid, zombie in descendants():
        if not zombie:
            try:
                if os.getpgid(pid) == group:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@contextmanager
def _stopping_on_failure(pool: ThreadPoolExecutor) -> Iterator[None]:
    """Shut pool down when the block ends; if the block raised, kill the tools its threads run first."""
    try:
        yield
    except BaseException:
        _kill_tools()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


@contextmanager
def alongside(name: str, fn: Callable[[], None]) -> Iterator[None]:
    """Run fn as the step `name` on a second thread while the block runs; raise its failure after the block."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
    future: Future[None] = pool.submit(_logged, name, fn)
    with _stopping_on_failure(pool):
        yield
        future.exception()  # wait for it while an interrupt can still arrive here
    future.result()


def run_side_by_side(steps: Sequence[Step], workers: int = 4) -> None:
    """Run every (name, step) on its own thread, each logged; when all are done, raise the first failure."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="step")
    futures = [pool.submit(_logged, name, fn) for name, fn in steps]
    with _stopping_on_failure(pool):
        for future in futures:
            future.exception()
    for future in futures:
        future.result()
