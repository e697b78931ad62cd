"""The data library (e2fsdata.c, built with the package as builder.sandbox._e2fsdata) mkfs.ext4 -d runs with.

Preloaded into mkfs.ext4 only, it puts the data of every file of 64 KiB or more into the image without
passing it through user space, on a thread of its own beside mkfs, while mkfs writes the metadata, so the
image's bytes are the same: shared blocks (FICLONERANGE) where the image's filesystem shares them with the
source (XFS with reflink, btrfs), else written past the image's page cache (O_DIRECT, from the source's),
else copy_file_range, else sendfile. Smaller files go mkfs' own way, which costs less for them
(docs/file-data.md). MDI_E2FS_DATA_FILES=all takes every file (the tests use it to put tails, tiny and
sparse files through the library); MDI_E2FS_DATA=none leaves mkfs as it is.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import UserError
from ..units import human
from .preload import built_library

# Path of the library to preload into mkfs.ext4, or "none"; default: the one built with the package.
DATA_ENV = "MDI_E2FS_DATA"
# "large" (default): files of LARGE bytes or more through the library; "all": every file.
FILES_ENV = "MDI_E2FS_DATA_FILES"
# Below this a clone or an in-kernel copy costs more than mkfs' own writes (measured: docs/file-data.md).
LARGE = 64 * 1024

# Why the kernel would not share blocks, in words, by the errno FICLONERANGE gave.
_NO_CLONE = {
    errno.EXDEV: "the store and the image are on different filesystems",
    errno.EOPNOTSUPP: "the image's filesystem does not share blocks (reflinks need XFS with reflink=1 or btrfs)",
    errno.ENOTTY: "the image's filesystem does not share blocks",
    errno.EPERM: "sharing blocks was refused (EPERM)",
}

# Why data was not written past the image's page cache, by e2fsdata.c's enum skip (the report's direct_skip).
_NOT_DIRECT = {
    1: "the image is in memory (tmpfs), where there is no page cache to pass by",
    2: "the image's filesystem is not one they are used on (ext4, XFS, btrfs)",
    3: "the image's filesystem refuses O_DIRECT writes",
    4: "the filesystem's blocks are not whole 4 KiB pages of the image",
    5: "a source file could not be mapped",
    6: "mkfs was not seen opening the image, so its readahead could not be turned off",
}


@cache
def data_library() -> str | None:
    """The data library to preload into mkfs.ext4 (builder.sandbox._e2fsdata), if any."""
    return built_library(DATA_ENV, "_e2fsdata", "e2fsdata")


def files_mode() -> str:
    """MDI_E2FS_DATA_FILES, checked: "large" (default) or "all"."""
    mode = os.environ.get(FILES_ENV) or "large"
    if mode not in ("large", "all"):
        raise UserError(f"{FILES_ENV}={mode!r}: expected 'large' (the files of 64 KiB or more through the data "
                        "library) or 'all' (every file)")
    return mode


def data_plan(image: Path, offset: int, report: Path) -> tuple[list[str], str | None]:
    """(env(1) words for mkfs, the library to preload) or ([], None): which file is the image, where the
    filesystem starts, where to report, and the smallest file the library takes."""
    library = data_library()
    if library is None:
        return [], None
    smallest = 0 if files_mode() == "all" else LARGE
    return [f"MDI_DATA_IMAGE={os.path.abspath(image)}", f"MDI_DATA_OFFSET={offset}", f"MDI_DATA_REPORT={report}",
            f"MDI_DATA_MIN_SIZE={smallest}"], library


@dataclass(frozen=True)
class DataReport:
    """What the library did: files left to mkfs for their size, files taken over, bytes by each way, and the
    errno of each way refused (0: none)."""

    small_files: int
    small_bytes: int
    files: int
    cloned: int
    direct: int
    copy_file_range: int
    sendfile: int
    read_write: int
    mkfs: int
    clone_errno: int
    direct_skip: int
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
    copied = report.copy_file_range + report.sendfile + report.read_write
    moved = report.cloned + report.direct + copied
    ways = [(report.cloned, "shared with the source files' blocks (reflink)"),
            (report.direct, "written past the image's page cache (O_DIRECT)"),
            (report.copy_file_range, "copied in the kernel (copy_file_range)"),
            (report.sendfile, "copied in the kernel (sendfile)"),
            (report.read_write, "read and written through memory")]
    parts = [f"{human(n)} {how}" for n, how in ways if n]
    line = f"file data of {report.files} files, {human(moved)}: {', '.join(parts) or 'none'}"
    if report.clone_errno and moved > report.cloned:
        why = _NO_CLONE.get(report.clone_errno, os.strerror(report.clone_errno))
        line += f"; not shared: {why}"
    if copied and report.direct_skip:
        line += f"; not written directly: {_NOT_DIRECT.get(report.direct_skip, f'reason {report.direct_skip}')}"
    if report.small_files:
        line += f"; {report.small_files} files under 64 KiB ({human(report.small_bytes)}) written by mkfs"
    if report.mkfs:
        line += f"; {report.mkfs} B of file ends under 16 bytes written by mkfs"
    return line
