"""What an image holds, read with independent tools: sfdisk, dumpe2fs, e2fsck, and the file's blocks."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LINUX_ROOT_TYPES = {"0FC63DAF-8483-4772-8E79-3D69D8477DE4", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"}
_BLOCK = 4096
_ZERO = bytes(_BLOCK)
_CHUNK = 8 << 20


@dataclass(frozen=True)
class ImageFacts:
    """Sizes of the image file and of its root ext4 filesystem."""

    apparent: int  # st_size
    allocated: int  # st_blocks * 512
    nonzero: int  # bytes in 4 KiB blocks that are not all zero (the data actually written)
    root_offset: int
    root_size: int
    fs_block_size: int
    fs_blocks: int
    fs_free_blocks: int
    fs_reserved_blocks: int
    fs_inodes: int
    fs_free_inodes: int
    fsck_ok: bool | None

    @property
    def fs_free(self) -> int:
        """Free bytes in the root filesystem (dumpe2fs Free blocks, including any root-reserved ones)."""
        return self.fs_free_blocks * self.fs_block_size

    @property
    def fs_used_inodes(self) -> int:
        """Inodes in use (the tree's objects plus the filesystem's own)."""
        return self.fs_inodes - self.fs_free_inodes

    def as_dict(self) -> dict[str, Any]:
        """Plain data for results.json."""
        return asdict(self)


def root_partition(image: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the Linux root partition, from sfdisk --json; the whole file if no table."""
    proc = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return 0, image.stat().st_size
    table = json.loads(proc.stdout)["partitiontable"]
    roots = [p for p in table["partitions"] if p["type"].upper() in LINUX_ROOT_TYPES]
    if not roots:
        raise RuntimeError(f"{image}: no Linux root partition in {table['partitions']}")
    sector = int(table.get("sectorsize", 512))
    return roots[-1]["start"] * sector, roots[-1]["size"] * sector


def nonzero_bytes(image: Path) -> int:
    """Bytes of the file's allocated extents that are in non-zero 4 KiB blocks."""
    total = 0
    fd = os.open(image, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            pos = start
            while pos < stop:
                chunk = os.pread(fd, min(_CHUNK, stop - pos), pos)
                if not chunk:
                    break
                view = memoryview(chunk)
                for i in range(0, len(chunk), _BLOCK):
                    if view[i:i + _BLOCK] != _ZERO[:min(_BLOCK, len(chunk) - i)]:
                        total += min(_BLOCK, len(chunk) - i)
                pos += len(chunk)
    finally:
        os.close(fd)
    return total


def _dumpe2fs(spec: str) -> dict[str, str]:
    """The superblock fields dumpe2fs -h prints, by name."""
    out = subprocess.run(["dumpe2fs", "-h", spec], capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def image_facts(image: Path, fsck: bool, scan: bool, offset: int | None = None) -> ImageFacts:
    """Measure an image: file sizes, the root fs's superblock, optionally e2fsck -fn and a zero-block scan."""
    st = image.stat()
    if offset is None:
        offset, size = root_partition(image)
    else:
        size = st.st_size - offset
    spec = f"{image}?offset={offset}" if offset else str(image)
    sb = _dumpe2fs(spec)
    fsck_ok = None
    if fsck:
        fsck_ok = subprocess.run(["e2fsck", "-fn", spec], capture_output=True).returncode == 0
    return ImageFacts(
        apparent=st.st_size,
        allocated=st.st_blocks * 512,
        nonzero=nonzero_bytes(image) if scan else -1,
        root_offset=offset,
        root_size=size,
        fs_block_size=int(sb["Block size"]),
        fs_blocks=int(sb["Block count"]),
        fs_free_blocks=int(sb["Free blocks"]),
        fs_reserved_blocks=int(sb["Reserved block count"]),
        fs_inodes=int(sb["Inode count"]),
        fs_free_inodes=int(sb["Free inodes"]),
        fsck_ok=fsck_ok,
    )
