"""The read-only squashfs root (onlyNixStore): mksquashfs -all-root with fixed times, into its own file.

mksquashfs sorts every directory and numbers inodes in that order, so the output does not depend on
the host's readdir order; -mkfs-time pins the superblock time and file times are the store's own.
squashfs has no label and no UUID field: the label is not stored (mount it by partition or path).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BuildError
from ..process import run
from ..sandbox.fakeroot import run_tool
from .build import RootBuild


def make(build: RootBuild, fs_file: Path) -> None:
    """Create the squashfs in fs_file from the staged root (one processor: output order independent of timing)."""
    fs_file.unlink(missing_ok=True)
    argv = ["mksquashfs", str(build.root), str(fs_file), "-all-root", "-noappend", "-quiet", "-no-progress",
            "-mkfs-time", str(build.source_date_epoch), "-processors", "1", "-no-xattrs"]
    res = run_tool(argv, binds=build.binds, scratch=build.scratch, epoch=None)
    if res.returncode != 0:
        raise BuildError(f"mksquashfs failed: {(res.stderr or res.stdout).strip()}")


def check(fs_file: Path) -> None:
    """unsquashfs must read the superblock and list every inode (-lls walks all directories and inodes)."""
    for argv in (["unsquashfs", "-s", str(fs_file)], ["unsquashfs", "-lls", "-d", "/", str(fs_file)]):
        run(argv, f"{argv[0]} {argv[1]} found problems in the root filesystem")
