"""Independent steps run side by side (each mostly waits on a subprocess), so the second core does half of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .log import step


def run_side_by_side(steps: Sequence[tuple[str, Callable[[], None]]], workers: int = 4) -> None:
    """Run every (name, step) on its own thread, each logged; when all are done, raise the first failure."""
    def logged(name: str, fn: Callable[[], None]) -> None:
        with step(name):
            fn()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="step") as pool:
        futures = [pool.submit(logged, name, fn) for name, fn in steps]
    for future in futures:
        future.result()
