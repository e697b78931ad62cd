"""Reading input files the user names (the spec, closureInfo's registration) with a bound on their size."""

from __future__ import annotations

from typing import BinaryIO

CHUNK = 1 << 20


def read_at_most(f: BinaryIO, limit: int) -> bytes:
    """The file's bytes, or its first limit + 1 bytes when it is longer (the caller refuses those).

    Read in 1 MiB pieces: `f.read(limit + 1)` would allocate the whole bound up front (512 MiB for a
    registration), which a build machine without overcommit, or under a memory limit, refuses.
    """
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = f.read(min(CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
