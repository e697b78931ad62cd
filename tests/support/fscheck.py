"""Read non-ext4 root filesystems with their own tools: checkers and extractors (btrfs, xfs, erofs, squashfs)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.imagecheck import part_offset, part_size


def root_range(image: Path, root_number: int | None) -> tuple[int, int]:
    """(offset, size) of the root filesystem according to sfdisk (the whole file for no table)."""
    if root_number is None:
        return 0, os.path.getsize(image)
    return part_offset(image, root_number), part_size(image, root_number)


def cut(image: Path, offset: int, size: int, dest: Path) -> Path:
    """Copy a byte range of image into dest (sparse: zero runs skipped), for tools that take no offset."""
    with open(image, "rb") as src, open(dest, "wb") as dst:
        src.seek(offset)
        left = size
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                dst.seek(len(chunk), os.SEEK_CUR)
            else:
                dst.write(chunk)
            left -= len(chunk)
        dst.truncate(size)
    return dest


def checker(fs: str, part: Path) -> subprocess.CompletedProcess[str]:
    """The filesystem's own checker, read-only."""
    argv = {
        "btrfs": ["btrfs", "check", "--readonly", str(part)],
        "xfs": ["xfs_repair", "-n", "-f", str(part)],
        "erofs": ["fsck.erofs", str(part)],
        "squashfs": ["unsquashfs", "-lls", "-d", "/", str(part)],
    }[fs]
    return subprocess.run(argv, capture_output=True, text=True)


@contextmanager
def _mounted_ro(part: Path, fs: str) -> Iterator[Path]:
    """Mount read-only through a loop device (xfs has no userspace extractor); always unmounted."""
    mnt = Path(tempfile.mkdtemp(prefix="mdi-fs-mnt-"))
    opts = "loop,ro,norecovery" if fs == "xfs" else "loop,ro"
    subprocess.run(["mount", "-t", fs, "-o", opts, str(part), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def extract(fs: str, part: Path, dest: Path) -> Path:
    """Copy the whole filesystem out with its own tool (owners and modes kept: tests run as root)."""
    dest.mkdir(parents=True, exist_ok=True)
    if fs == "btrfs":
        argv = ["btrfs", "restore", "-x", "-m", "-S", str(part), str(dest)]
    elif fs == "erofs":
        argv = ["fsck.erofs", f"--extract={dest}", "--preserve", "--overwrite", str(part)]
    elif fs == "squashfs":
        shutil.rmtree(dest)
        argv = ["unsquashfs", "-q", "-n", "-d", str(dest), str(part)]
    elif fs == "xfs":
        with _mounted_ro(part, fs) as mnt:
            subprocess.run(["cp", "-a", f"{mnt}/.", str(dest)], check=True)
        return dest
    else:
        raise ValueError(fs)
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} extract failed: {res.stderr[-2000:]}")
    return dest


def owners_and_modes(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below root as image path -> (uid, gid, permission bits incl. setuid/sticky)."""
    out: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out["/" + os.path.relpath(p, root)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out
