"""The data library (e2fsdata.c, built with the package as builder.sandbox._e2fsdata) mkfs.ext4 -d runs with.

Preloaded into mkfs.ext4 only, it puts the file data into the image in the kernel while mkfs writes the
metadata, so the image's bytes are the same. Where the image's filesystem shares blocks (XFS with reflink,
btrfs) the data of the sources on that filesystem is cloned, not copied (FICLONERANGE). Elsewhere mkfs
writes the data itself, as it costs less on this machine's ext4 than the library's per-file work
(docs/file-data.md); MDI_E2FS_DATA_COPY=kernel makes the library copy every file in the kernel anyway
(copy_file_range, else sendfile), which the tests use. MDI_E2FS_DATA=none leaves mkfs as it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import UserError
from ..units import human
from .preload import built_library

# Path of the library to preload into mkfs.ext4, or "none"; default: the one built with the package.
DATA_ENV = "MDI_E2FS_DATA"
# "clone" (default): the library only where the image's filesystem shares blocks; "kernel": always.
COPY_ENV = "MDI_E2FS_DATA_COPY"
# linux/fs.h: FICLONE = _IOW(0x94, 9, int): the whole file, sharing the source's blocks.
FICLONE = 0x40049409

# Why the kernel would not share blocks, in words, by the errno FICLONERANGE gave.
_NO_CLONE = {
    errno.EXDEV: "the store and the image are on different filesystems",
    errno.EOPNOTSUPP: "the image's filesystem does not share blocks (reflinks need XFS with reflink=1 or btrfs)",
    errno.ENOTTY: "the image's filesystem does not share blocks",
    errno.EPERM: "sharing blocks was refused (EPERM)",
}


@cache
def data_library() -> str | None:
    """The data library to preload into mkfs.ext4 (builder.sandbox._e2fsdata), if any."""
    return built_library(DATA_ENV, "_e2fsdata", "e2fsdata")


def copy_mode() -> str:
    """MDI_E2FS_DATA_COPY, checked: "clone" (default) or "kernel"."""
    mode = os.environ.get(COPY_ENV) or "clone"
    if mode not in ("clone", "kernel"):
        raise UserError(f"{COPY_ENV}={mode!r}: expected 'clone' (the data library only where the image's "
                        "filesystem shares blocks) or 'kernel' (every file copied in the kernel)")
    return mode


def clones(directory: Path) -> bool:
    """Whether files in directory can share blocks (FICLONE between two files of a probe: XFS with reflink,
    btrfs, bcachefs). The probe files have no name (O_TMPFILE), so nothing is left even if killed."""
    try:
        with tempfile.TemporaryFile(dir=directory) as a, tempfile.TemporaryFile(dir=directory) as b:
            a.write(b"\1" * 4096)
            a.flush()
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
        return True
    except OSError:
        return False


def data_plan(image: Path, offset: int, report: Path) -> tuple[list[str], str | None]:
    """(env(1) words for mkfs, the library to preload) or ([], None); the words say which file is the image,
    where the filesystem starts, where to report, and whether only sources on its filesystem are taken."""
    library = data_library()
    if library is None:
        return [], None
    words = [f"MDI_DATA_IMAGE={os.path.abspath(image)}", f"MDI_DATA_OFFSET={offset}", f"MDI_DATA_REPORT={report}"]
    if copy_mode() == "kernel":
        return words, library
    if not clones(image.parent):
        return [], None
    return [*words, "MDI_DATA_SAME_FS=1"], library


@dataclass(frozen=True)
class DataReport:
    """What the library did: files taken over, bytes by each way, and the errno of each way refused (0: none);
    files left to mkfs because they are on another filesystem than the image's, or small."""

    other_files: int
    other_bytes: int
    small_files: int
    small_bytes: int
    files: int
    cloned: int
    copy_file_range: int
    sendfile: int
    read_write: int
    mkfs: int
    clone_errno: int
    copy_file_range_errno: int
    sendfile_errno: int


def read_report(path: Path) -> DataReport | None:
    """The library's report (a "name number" line each), None when it wrote none (not loaded, or off)."""
    try:
        fields = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
        return DataReport(**{name: int(fields[name]) for name in DataReport.__dataclass_fields__})
    except (OSError, KeyError, ValueError, TypeError):
        return None


def describe(report: DataReport | None, loaded: bool = True) -> str:
    """One log line: how the file data went into the image, and why not shared when it was not."""
    if not loaded:
        if os.environ.get(DATA_ENV) == "none":
            why = f"{DATA_ENV}=none"
        elif data_library() is None:
            why = "the data library is not built"
        else:
            why = ("the image's filesystem does not share blocks, and an in-kernel copy costs more here than it "
                   f"saves; {COPY_ENV}=kernel copies anyway")
        return f"file data: read and written by mkfs.ext4 itself ({why})"
    if report is None:
        return "file data: read and written by mkfs.ext4 itself (the data library did not load)"
    moved = report.cloned + report.copy_file_range + report.sendfile + report.read_write
    ways = [(report.cloned, "shared with the source files' blocks (reflink)"),
            (report.copy_file_range, "copied in the kernel (copy_file_range)"),
            (report.sendfile, "copied in the kernel (sendfile)"),
            (report.read_write, "read and written through memory")]
    parts = [f"{human(n)} {how}" for n, how in ways if n]
    line = f"file data of {report.files} files, {human(moved)}: {', '.join(parts) or 'none'}"
    if report.clone_errno and moved > report.cloned:
        why = _NO_CLONE.get(report.clone_errno, os.strerror(report.clone_errno))
        line += f"; not shared: {why}"
    if report.small_files:
        line += f"; {report.small_files} files under 64 KiB ({human(report.small_bytes)}) written by mkfs"
    if report.other_files:
        line += (f"; {report.other_files} files ({human(report.other_bytes)}) on other filesystems than the "
                 "image's written by mkfs")
    if report.mkfs:
        line += f"; {report.mkfs} B of file ends under 16 bytes written by mkfs"
    return line
