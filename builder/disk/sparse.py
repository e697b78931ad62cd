"""Sparse copies between image files: only the data segments are copied (SEEK_DATA/SEEK_HOLE), holes stay holes."""

from __future__ import annotations

import errno
import os
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


# Errors of copy_file_range that mean "not between these two files" (e.g. a tmpfs file and an ext4 one).
_NO_COPY_RANGE = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
CHUNK = 1 << 20


def _copy_range(s: int, d: int, start: int, end: int, delta: int, in_kernel: bool) -> bool:
    """Copy [start, end) of s to d at +delta; in the kernel while it allows, else by pread/pwrite. Returns which."""
    pos = start
    while pos < end:
        if in_kernel:
            try:
                done = os.copy_file_range(s, d, end - pos, pos, pos + delta)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                in_kernel = False
                continue
        else:
            chunk = os.pread(s, min(CHUNK, end - pos), pos)
            done = os.pwrite(d, chunk, pos + delta) if chunk else 0
        if done <= 0:
            raise OSError(errno.EIO, f"copy stopped at byte {pos}")
        pos += done
    return in_kernel


def copy_sparse(src: Path, src_offset: int, length: int, dst: Path, dst_offset: int) -> None:
    """Copy bytes [src_offset, src_offset+length) of src to dst at dst_offset, data segments only."""
    in_kernel = True
    with open(src, "rb") as s, open(dst, "r+b") as d:
        for start, end in data_ranges(s.fileno(), src_offset, src_offset + length):
            try:
                in_kernel = _copy_range(s.fileno(), d.fileno(), start, end, dst_offset - src_offset, in_kernel)
            except OSError as exc:
                raise BuildError(f"copying {src} into {dst}: {exc.strerror or exc}") from None


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
