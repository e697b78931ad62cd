"""Sparse copies between image files: only the data segments are copied (SEEK_DATA/SEEK_HOLE), holes stay holes."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import BuildError


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(start, end) of every data segment of a file within [start, end)."""
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        ranges.append((data, min(hole, end)))
        pos = hole
    return ranges


def copy_sparse(src: Path, src_offset: int, length: int, dst: Path, dst_offset: int) -> None:
    """Copy bytes [src_offset, src_offset+length) of src to dst at dst_offset, data segments only."""
    with open(src, "rb") as s, open(dst, "r+b") as d:
        for start, end in data_ranges(s.fileno(), src_offset, src_offset + length):
            pos = start
            while pos < end:
                done = os.copy_file_range(s.fileno(), d.fileno(), end - pos, pos, dst_offset + pos - src_offset)
                if done <= 0:
                    raise BuildError(f"copying {src} into {dst} stopped at byte {pos}")
                pos += done


def place(fs_file: Path, image: Path, offset: int, limit: int) -> None:
    """Write fs_file's data segments into image at offset; refuse a file larger than its partition (limit)."""
    size = fs_file.stat().st_size
    if size > limit:
        raise BuildError(f"the root filesystem ({size} bytes) does not fit its partition ({limit} bytes)")
    copy_sparse(fs_file, 0, size, image, offset)


def extract(image: Path, start: int, size: int, dest: Path) -> None:
    """Copy bytes [start, start+size) of image into a new sparse file dest (for tools that take no offset)."""
    with open(dest, "wb") as f:
        f.truncate(size)
    copy_sparse(image, start, size, dest, 0)


def largest_file(where: Path) -> int:
    """The largest file size the filesystem of where allows this process (its limit, or RLIMIT_FSIZE).

    where is a directory (a fresh unlinked file is made in it) or an empty file of the caller's own, left
    empty again. Found by truncating the sparse file (no data is written; 63 truncates).
    """
    if where.is_dir():
        fd, name = tempfile.mkstemp(dir=where, prefix=".size-probe-")
        os.unlink(name)
    else:
        fd = os.open(where, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        low, high = 0, 2**63 - 1
        while low < high:
            mid = (low + high + 1) // 2
            try:
                os.ftruncate(fd, mid)
                low = mid
            except OSError as exc:
                if exc.errno not in (errno.EFBIG, errno.EINVAL):
                    raise
                high = mid - 1
        os.ftruncate(fd, 0)
        return low
    finally:
        os.close(fd)
