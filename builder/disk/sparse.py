"""Copies between image files: reflinks where the filesystem shares blocks, else only the data segments are
copied (SEEK_DATA/SEEK_HOLE, copy_file_range), so holes stay holes."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
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


# What copy_file_range fails with where the kernel cannot copy between the two files, e.g. across
# filesystems (Linux >= 5.19 refuses most of those: a store on ext4 or btrfs, a build directory on tmpfs).
NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
CHUNK = 1 << 20


def _copy_range(s: int, d: int, length: int, src_pos: int, dst_pos: int, in_kernel: bool) -> tuple[int, bool]:
    """Copy some of [src_pos, src_pos+length) of fd s to fd d at dst_pos; (bytes done, copy_file_range usable)."""
    if in_kernel:
        try:
            return os.copy_file_range(s, d, length, src_pos, dst_pos), True
        except OSError as exc:
            if exc.errno not in NO_COPY_FILE_RANGE:
                raise
    data = os.pread(s, min(length, CHUNK), src_pos)
    return (os.pwrite(d, data, dst_pos) if data else 0), False


def copy_sparse(src: Path, src_offset: int, length: int, dst: Path, dst_offset: int) -> None:
    """Copy bytes [src_offset, src_offset+length) of src to dst at dst_offset, data segments only.

    In the kernel (copy_file_range) where it can; read and written through here where it cannot.
    """
    in_kernel = True
    with open(src, "rb") as s, open(dst, "r+b") as d:
        for start, end in data_ranges(s.fileno(), src_offset, src_offset + length):
            pos = start
            while pos < end:
                done, in_kernel = _copy_range(s.fileno(), d.fileno(), end - pos, pos, dst_offset + pos - src_offset,
                                              in_kernel)
                if done <= 0:
                    raise BuildError(f"copying {src} into {dst} stopped at byte {pos}")
                pos += done


# linux/fs.h: FICLONERANGE = _IOW(0x94, 13, struct file_clone_range { s64 src_fd; u64 src_offset, src_length,
# dest_offset; }). The destination shares the source's blocks (btrfs, xfs with reflink, bcachefs): no data moves.
FICLONERANGE = 0x4020940D
# What FICLONERANGE fails with where it cannot share: no support, another filesystem, unaligned ranges.
NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


def clone_range(s: int, d: int, length: int, dst_offset: int) -> bool:
    """Share fd s's first length bytes (0: to its end) into fd d at dst_offset; False where it cannot be done."""
    try:
        fcntl.ioctl(d, FICLONERANGE, struct.pack("=qQQQ", s, 0, length, dst_offset))
    except OSError as exc:
        if exc.errno in NO_REFLINK:
            return False
        raise
    return True


def reflink(src: Path, length: int, dst: Path, dst_offset: int) -> bool:
    """Share src's first length bytes into dst at dst_offset (both 4 KiB aligned); False where it cannot be done."""
    with open(src, "rb") as s, open(dst, "r+b") as d:
        return clone_range(s.fileno(), d.fileno(), length, dst_offset)


def clones(directory: Path) -> bool:
    """Whether files in directory can share blocks (XFS with reflink, btrfs, bcachefs): a probe of two files
    without names (O_TMPFILE), so nothing is left even if the build is killed."""
    try:
        with tempfile.TemporaryFile(dir=directory) as a, tempfile.TemporaryFile(dir=directory) as b:
            a.write(b"\1" * 4096)
            a.flush()
            return clone_range(a.fileno(), b.fileno(), 0, 0)
    except OSError:
        return False


def place(fs_file: Path, image: Path, offset: int, limit: int) -> str:
    """Put fs_file into image at offset: a reflink where possible, else its data segments copied; how, in words.

    A file larger than its partition (limit) is refused.
    """
    size = fs_file.stat().st_size
    if size > limit:
        raise BuildError(f"the root filesystem ({size} bytes) does not fit its partition ({limit} bytes)")
    if size % 4096 == 0 and offset % 4096 == 0 and reflink(fs_file, size, image, offset):
        return "reflink"
    copy_sparse(fs_file, 0, size, image, offset)
    return "sparse copy"


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
