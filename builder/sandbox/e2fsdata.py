"""The data library (e2fsdata.c, built with the package as builder.sandbox._e2fsdata) mkfs.ext4 -d runs with.

Preloaded into mkfs.ext4 only, it moves the file data from the store into the image in the kernel: shared
blocks (FICLONERANGE) where the store and the image are one filesystem that shares blocks (XFS with
reflink, btrfs), else copy_file_range, else sendfile, mkfs writing the metadata as without it, so the
image's bytes are the same. MDI_E2FS_DATA=none leaves mkfs as it is (tests compare the two).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..units import human
from .preload import built_library

# Path of the library to preload into mkfs.ext4, or "none"; default: the one built with the package.
DATA_ENV = "MDI_E2FS_DATA"

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


def data_settings(image: Path, offset: int, report: Path) -> list[str]:
    """env(1) words telling the library which file is the image, where the filesystem starts, where to report."""
    return [f"MDI_DATA_IMAGE={os.path.abspath(image)}", f"MDI_DATA_OFFSET={offset}", f"MDI_DATA_REPORT={report}"]


@dataclass(frozen=True)
class DataReport:
    """What the library did: files taken over, bytes by each way, and the errno of each way refused (0: none)."""

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
        why = f"{DATA_ENV}=none" if os.environ.get(DATA_ENV) == "none" else "the data library is not built"
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
    if report.mkfs:
        line += f"; {report.mkfs} B of file ends under 16 bytes written by mkfs"
    return line
