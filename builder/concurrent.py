"""Independent steps side by side (each mostly waits on a subprocess), so the second core does part of them.

When the main thread is interrupted (a signal unwinds the build) or fails while a step runs on another
thread, the tools still running are killed first, so that thread ends at once and the build stops as
quickly as a single-threaded one would; the step on the thread then reports itself failed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .log import info, step
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


def _no_thread(exc: RuntimeError) -> bool:
    """Whether exc is Python's refusal to start a thread (RLIMIT_NPROC, or no address space for its stack)."""
    return "can't start new thread" in str(exc)


class _Thread:
    """One step on its own thread, its failure kept for the caller to raise."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name, self.fn = name, fn
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"step {name}", daemon=True)

    def _run(self) -> None:
        try:
            _logged(self.name, self.fn)
        except BaseException as exc:  # raised in the caller's thread by result()
            self.failure = exc

    def start(self) -> bool:
        """Start the thread; False when none can be started (the caller then runs the step itself)."""
        try:
            self.thread.start()
        except RuntimeError as exc:
            if not _no_thread(exc):
                raise
            info(f"cannot start a thread for {self.name} ({exc}); running the steps one after another")
            return False
        return True

    def result(self) -> None:
        """Raise the step's failure, if any (after wait)."""
        if self.failure is not None:
            raise self.failure


@contextmanager
def _stopping_on_failure(started: list[_Thread]) -> Iterator[None]:
    """Wait for the started threads when the block ends; if the block raised, kill the tools they run first."""
    try:
        yield
    except BaseException:
        _kill_tools()
        for t in started:
            t.thread.join()
        raise
    for t in started:
        t.thread.join()


@contextmanager
def alongside(name: str, fn: Callable[[], None]) -> Iterator[None]:
    """Run fn as the step `name` on a second thread while the block runs; raise its failure after the block.

    When no thread can be started, fn runs first, then the block.
    """
    side = _Thread(name, fn)
    if not side.start():
        _logged(name, fn)
        yield
        return
    with _stopping_on_failure([side]):
        yield
        side.thread.join()  # inside: a signal arriving while it waits still kills the tools first
    side.result()


def run_side_by_side(steps: Sequence[Step], workers: int = 4) -> None:
    """Run every (name, step) on its own thread (workers at a time), each logged; when all are done, raise the
    first failure. Steps no thread can be started for run in this thread, one after another."""
    failures: list[BaseException | None] = []  # in the steps' order
    for first in range(0, len(steps), workers):
        threads = [_Thread(name, fn) for name, fn in steps[first:first + workers]]
        started: list[_Thread] = []
        for side in threads:
            if not side.start():
                break
            started.append(side)
        with _stopping_on_failure(started):
            for side in threads[len(started):]:  # no thread for them: here, one after another
                try:
                    _logged(side.name, side.fn)
                except Exception as exc:  # raised once every step has ended, as a thread's failure is
                    side.failure = exc
            for side in started:
                side.thread.join()  # inside: a signal arriving while it waits still kills the tools first
        failures += [side.failure for side in threads]
    for failure in failures:
        if failure is not None:
            raise failure
