"""Reading input files the user names (the spec, closureInfo's registration) with a bound on their size."""

from __future__ import annotations

from typing import BinaryIO

CHUNK = 1 << 20


def read_at_most(f: BinaryIO, limit: int) -> bytearray:
    """The file's bytes, or its first limit + 1 bytes when it is longer (the caller refuses those).

    Read in 1 MiB pieces into one growing buffer: `f.read(limit + 1)` would allocate the whole bound up
    front (512 MiB for a registration), which a build machine without overcommit, or under a memory limit,
    refuses; a list of pieces joined at the end would need twice what was read.
    """
    data = bytearray()
    while len(data) <= limit:
        chunk = f.read(min(CHUNK, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    return data
