"""The read-only erofs root (onlyNixStore): mkfs.erofs --all-root -T into its own file, label patched in.

mkfs.erofs builds from a directory (the store bound in, builder/sandbox/fakeroot.py) with every owner root and
one fixed timestamp (-T: compact inodes carry no own time, so every file shows it); hard links and
symlinks are kept. erofs-utils 1.5 has no label option: the volume name is written into the superblock
here and its CRC32C recomputed, as newer mkfs.erofs -L does.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..crc32c import crc32c_raw
from ..errors import BuildError
from ..process import run
from ..sandbox.fakeroot import run_tool
from .build import RootBuild

SUPER_OFFSET = 1024
BLOCK = 4096
FEATURE_SB_CHKSUM = 0x1
VOLUME_NAME = 64  # offset of volume_name[16] in the superblock
MAGIC = 0xE0F5E1E2


def set_label(fs_file: Path, label: str) -> None:
    """Write the volume name into the superblock and refresh its checksum."""
    with open(fs_file, "r+b") as f:
        f.seek(SUPER_OFFSET)
        sb = bytearray(f.read(BLOCK - SUPER_OFFSET))
        if struct.unpack_from("<I", sb, 0)[0] != MAGIC:
            raise BuildError(f"{fs_file} has no erofs superblock")
        sb[VOLUME_NAME:VOLUME_NAME + 16] = label.encode().ljust(16, b"\0")
        if struct.unpack_from("<I", sb, 8)[0] & FEATURE_SB_CHKSUM:
            struct.pack_into("<I", sb, 4, 0)
            struct.pack_into("<I", sb, 4, crc32c_raw(bytes(sb)))
        f.seek(SUPER_OFFSET)
        f.write(sb)


def make(build: RootBuild, fs_file: Path) -> None:
    """Create the erofs in fs_file (its natural size) from the staged root."""
    fs_file.unlink(missing_ok=True)
    # -x-1: no extended attributes (a Nix store has none; the host's labels, measure.HOST_LABELS, stay out).
    argv = ["mkfs.erofs", "--quiet", "--all-root", "-x-1", "-T", str(build.source_date_epoch)]
    if build.uuid:
        argv.append(f"-U{build.uuid}")
    argv += [str(fs_file), str(build.root)]
    res = run_tool(argv, binds=build.binds, scratch=build.scratch, epoch=None)
    if res.returncode != 0:
        raise BuildError(f"mkfs.erofs failed: {(res.stderr or res.stdout).strip()}")
    set_label(fs_file, build.label)


def check(fs_file: Path) -> None:
    """fsck.erofs must read every inode and the superblock checksum clean."""
    run(["fsck.erofs", str(fs_file)], "fsck.erofs found problems in the root filesystem")
