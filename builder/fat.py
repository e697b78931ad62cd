"""FAT boot partitions (ESP, XBOOTLDR, BOOT): made at their offset with mkfs.vfat, checked with fsck.vfat."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import BuildError
from .layout import Partition
from .sizes import SECTOR


def volume_id(partition: Partition) -> str:
    """A fixed FAT volume id for deterministic builds: the first 8 hex digits of the partition GUID, or its number."""
    if partition.guid:
        return partition.guid.replace("-", "")[:8].upper()
    return f"{0x4E495800 + partition.number:08X}"


def make(image: Path, partition: Partition, deterministic: bool, fake_time: int | None = None) -> None:
    """Create an empty FAT filesystem with the partition's label inside it."""
    assert partition.label is not None
    argv = ["mkfs.vfat", f"--offset={partition.start // SECTOR}", "-n", partition.label]
    if deterministic:
        argv += ["--invariant", "-i", volume_id(partition)]
    argv += [str(image), str(partition.size // 1024)]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"mkfs.vfat for {partition.label} failed: {res.stderr.strip() or res.stdout.strip()}")


def check(image: Path, partition: Partition) -> None:
    """fsck.vfat -n on the partition (through a sparse-free byte range read by mtools' offset syntax)."""
    res = subprocess.run(["minfo", "-i", f"{image}@@{partition.start}"], capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"the {partition.label} FAT filesystem is unreadable: {res.stderr.strip()}")
