"""The root btrfs: mkfs.btrfs --rootdir into its own file, unprivileged, owners via fakeroot, pinned by libfaketime.

btrfs-progs has no owner or time options and no offset: the tool runs in a user namespace with the
store bound in, under fakeroot (every file reads as root:root, contents' numeric owners come from a
fakeroot state file) and, when deterministic, with libfaketime freezing the clock and seeding the
randomness libuuid draws its chunk-tree and device UUIDs from (builder/sandbox/fakeroot.py). What it cannot
keep: btrfs-progs 6.2 writes device nodes with device number 0:0 (refused, see reject_devices);
hard links are kept.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .. import rules
from ..errors import BuildError, UserError
from ..process import run
from ..sandbox.fakeroot import fakeroot_state, run_tool
from ..sandbox.namespace import userns_available
from ..units import MiB, align_up
from .build import NoSpace, RootBuild

# mkfs.btrfs refuses much smaller devices with DUP metadata (builder/rules.json).
MIN_BYTES = rules.fs_types()["btrfs"].min_bytes


def needed_bytes(data_bytes: int, inodes: int, free: int) -> int:
    """A first guess of the btrfs size for data_bytes in inodes plus free space (metadata is DUP)."""
    metadata = 2 * (inodes * 400 + 16 * MiB)
    return max(MIN_BYTES, align_up(int(data_bytes * 1.05) + metadata + free + 48 * MiB, MiB))


def reject_devices(root: Path) -> None:
    """btrfs-progs 6.2 --rootdir stores device nodes as 0:0; refuse them instead of writing broken nodes."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rel = "/" + os.path.relpath(p, root)
                raise UserError(f"fsType = \"btrfs\" cannot hold the device node {rel}: btrfs-progs 6.2 "
                                "(mkfs.btrfs --rootdir) loses device numbers; use fsType = \"ext4\" or \"xfs\"")


def make(build: RootBuild, fs_file: Path, size: int) -> None:
    """Create a btrfs of size bytes in fs_file holding the staged root."""
    reject_devices(build.root)
    fs_file.unlink(missing_ok=True)
    with open(fs_file, "wb") as f:
        f.truncate(size)
    if userns_available():  # sorted copy on a private tmpfs: inode numbers and walk order independent of the host
        source = build.scratch / "btrfs-root"
        argv = _argv(build, fs_file, size, source)
        res = run_tool(argv, binds=build.binds, scratch=build.scratch, epoch=build.epoch, use_fakeroot=True,
                       sorted_copy=(build.root, source, build.owner_fixes, build.mode_fixes))
    else:  # the closure was copied into the staging root; inode numbers come from the build's filesystem
        state = fakeroot_state(build.owner_fixes, build.root, build.scratch / "fakeroot.state", build.mode_fixes)
        argv = _argv(build, fs_file, size, build.root)
        res = run_tool(argv, binds=build.binds, scratch=build.scratch, epoch=build.epoch, fake_owners=state)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        if "No space left" in msg or "ENOSPC" in msg or "too small" in msg:
            raise NoSpace(msg)
        raise BuildError(f"mkfs.btrfs --rootdir failed: {msg}")


def _argv(build: RootBuild, fs_file: Path, size: int, source: Path) -> list[str]:
    """mkfs.btrfs' command line."""
    argv = ["mkfs.btrfs", "-q", "-f", "-b", str(size), "-L", build.label, "-r", str(source), str(fs_file)]
    if build.uuid:
        argv[1:1] = ["-U", build.uuid]
    return argv


def free_bytes(fs_file: Path) -> int:
    """Unused bytes of the btrfs (total_bytes - bytes_used of its superblock)."""
    res = run(["btrfs", "inspect-internal", "dump-super", str(fs_file)], ok=None)
    total = re.search(r"^total_bytes\s+(\d+)", res.stdout, re.M)
    used = re.search(r"^bytes_used\s+(\d+)", res.stdout, re.M)
    if res.returncode != 0 or not total or not used:
        raise BuildError(f"btrfs inspect-internal dump-super failed: {res.stderr.strip()}")
    return int(total.group(1)) - int(used.group(1))


def check(fs_file: Path) -> None:
    """btrfs check (read-only) must find the filesystem clean."""
    run(["btrfs", "check", "--readonly", str(fs_file)], "btrfs check found problems in the root filesystem")
