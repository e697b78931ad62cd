"""Measure what the root filesystem will hold and size it tightly: data counted once, metadata measured.

The estimate walks the staged root (store placeholders resolved to the real store paths), counting each
inode once (hard links shared), 4 KiB blocks for file data, directory blocks from their entries, long
symlinks and extent blocks. The filesystem's own overhead (inode tables, bitmaps, journal, reserved GDT)
is measured by running mkfs on an empty sparse file of the candidate size.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
DIR_TAIL = 12  # metadata_csum dirent tail per directory block
EXTENTS_PER_LEAF = 340
MAX_EXTENT_BLOCKS = 32768
FAST_SYMLINK_MAX = 59


@dataclass(frozen=True)
class Usage:
    """What a tree costs in an ext4 with 4 KiB blocks, metadata of the empty filesystem excluded."""

    inodes: int
    blocks: int
    file_bytes: int  # apparent bytes of unique regular files (the "closure size" of reports)


def _dir_blocks(names: list[str]) -> int:
    """Blocks of a linear ext4 directory holding these names (plus . and ..), with its extent block."""
    usable = BLOCK - DIR_TAIL
    # An entry takes 8 bytes + the name's bytes, rounded up to 4 (store names are ASCII: no encoding needed).
    if "".join(names).isascii():
        recs = [(len(n) + 11) & ~3 for n in names]
    else:
        recs = [(len(os.fsencode(n)) + 11) & ~3 for n in names]
    if 24 + sum(recs) <= usable:  # most directories: one block
        return 1
    blocks, used = 1, 24
    for rec in recs:
        if used + rec > usable:
            blocks += 1
            used = rec
        else:
            used += rec
    if blocks > 4:
        blocks += -(-blocks // EXTENTS_PER_LEAF)
    return blocks


def _file_blocks(size: int) -> int:
    """Blocks of a regular file's data, plus an extent leaf when it needs more than four extents."""
    data = -(-size // BLOCK)
    extents = -(-data // MAX_EXTENT_BLOCKS) + data // (4 * MAX_EXTENT_BLOCKS)
    return data + (1 if extents > 4 else 0)


def measure(root: Path, substitutes: dict[str, str]) -> Usage:
    """Measure root, reading each path listed in substitutes (staged placeholder -> real path) from its source.

    One scandir per directory: entry types come from the directory itself, so only non-directories are
    stat'ed, once each (the closure is read for its metadata once, before mkfs reads it for its data).
    """
    seen: set[tuple[int, int]] = set()
    inodes = blocks = file_bytes = 0
    dirs = [str(root)]
    while dirs:
        directory = dirs.pop()
        inodes += 1
        names: list[str] = []
        with os.scandir(directory) as entries:
            for entry in entries:
                names.append(entry.name)
                real = substitutes.get(entry.path)
                if real is None:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                else:
                    st = os.lstat(real)
                    if stat.S_ISDIR(st.st_mode):
                        dirs.append(real)
                        continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                inodes += 1
                mode = st.st_mode
                if stat.S_ISREG(mode):
                    blocks += _file_blocks(st.st_size)
                    file_bytes += st.st_size
                elif stat.S_ISLNK(mode) and st.st_size > FAST_SYMLINK_MAX:
                    blocks += 1
        blocks += _dir_blocks(names)
    return Usage(inodes=inodes, blocks=blocks, file_bytes=file_bytes)


def inode_count(fs_bytes: int, used_inodes: int, additional: int) -> int:
    """Inodes to create: mke2fs' default ratio (16 KiB), or enough for the tree plus headroom if more."""
    return max(fs_bytes // 16384, used_inodes + additional // 16384 + 64, 1024)
