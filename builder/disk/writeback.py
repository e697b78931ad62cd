"""The image written back to disk beside mkfs, not after it.

mkfs.ext4 -d leaves the image's pages dirty in memory, and its fsync at close (lib/ext2fs/unix_io.c
unix_flush) then waits for all of them to reach the disk after its CPU work is done: the two add up. While
mkfs runs, a thread of the builder asks the kernel every INTERVAL seconds to start writing back what is
dirty so far (sync_file_range with SYNC_FILE_RANGE_WRITE only: it starts the writes and does not wait for
them), on the other core, so the disk works while mkfs does. The bytes written are the same; on an image in
memory (tmpfs) it does nothing. Measured on the 1 GiB benchmark closure, mkfs.ext4 -d alone: 2.01 s
against 2.55-2.77 s (docs/file-data.md).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INTERVAL = 0.2
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _sync_file_range() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


@contextmanager
def written_back(image: Path) -> Iterator[None]:
    """While the block runs, start the writeback of image's dirty pages every INTERVAL seconds (see above).

    Nothing is waited for, and nothing fails the build: without sync_file_range, a thread or the file, the
    block runs as it would without this.
    """
    fn = _sync_file_range()
    stop = threading.Event()
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC) if fn is not None else -1
    except OSError:
        fd = -1

    def kick() -> None:
        assert fn is not None
        while not stop.wait(INTERVAL):
            fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    thread = threading.Thread(target=kick, name="writeback", daemon=True)
    try:
        if fd >= 0:
            thread.start()
    except RuntimeError:  # no thread can be started (builder/concurrent.py): written back at the end, as before
        pass
    try:
        yield
    finally:
        stop.set()
        if thread.ident is not None:
            thread.join()
        if fd >= 0:
            os.close(fd)
