"""Copy a filesystem built as its own file into its partition, writing only the data (holes stay holes)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import BuildError


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of every data segment of a file, found with SEEK_DATA/SEEK_HOLE."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, min(end, size)))
        pos = end
    return ranges


def place(fs_file: Path, image: Path, offset: int, limit: int) -> None:
    """Write fs_file's data segments into image at offset; refuse a file larger than its partition (limit)."""
    size = fs_file.stat().st_size
    if size > limit:
        raise BuildError(f"the root filesystem ({size} bytes) does not fit its partition ({limit} bytes)")
    with open(fs_file, "rb") as src, open(image, "r+b") as dst:
        for start, end in _data_ranges(src.fileno(), size):
            pos = start
            while pos < end:
                done = os.copy_file_range(src.fileno(), dst.fileno(), end - pos, pos, offset + pos)
                if done <= 0:
                    raise BuildError(f"copying {fs_file} into {image} stopped at byte {pos}")
                pos += done
