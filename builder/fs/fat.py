"""FAT boot partitions (ESP, XBOOTLDR, BOOT): made at their offset with mkfs.vfat, checked with fsck.vfat -n."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..disk.layout import Partition
from ..disk.sparse import extract
from ..errors import BuildError
from ..process import run
from ..units import SECTOR


def volume_id(partition: Partition) -> str:
    """A fixed FAT volume id for deterministic builds: the first 8 hex digits of the partition GUID, or its number."""
    if partition.guid:
        return partition.guid.replace("-", "")[:8].upper()
    return f"{0x4E495800 + partition.number:08X}"


def fat_bits(size: int) -> str:
    """The FAT type (12, 16 or 32) mkfs.vfat picks for a device of this size, as nixpkgs gets it in its VM.

    With --offset into a bigger image file, mkfs.vfat would choose from the whole file's size (FAT32 for
    images over 512 MiB) and then refuse a small ESP; so the choice is measured on a device of the
    partition's own size and passed with -F.
    """
    with tempfile.TemporaryDirectory(prefix="mdi-fat-") as tmp:
        probe = Path(tmp) / "probe.fat"
        with open(probe, "wb") as f:
            f.truncate(size)
        run(["mkfs.vfat", str(probe)], f"mkfs.vfat cannot make a FAT filesystem of {size} bytes")
        version = run(["blkid", "-p", "-o", "value", "-s", "VERSION", str(probe)], ok=None).stdout.strip()
    if version not in ("FAT12", "FAT16", "FAT32"):
        raise BuildError(f"cannot tell which FAT type mkfs.vfat picks for {size} bytes (blkid: {version!r})")
    return version[3:]


def make(image: Path, partition: Partition, deterministic: bool) -> None:
    """Create an empty FAT filesystem with the partition's label inside it."""
    assert partition.label is not None
    argv = ["mkfs.vfat", "-F", fat_bits(partition.size), f"--offset={partition.start // SECTOR}",
            "-n", partition.label]
    if deterministic:
        argv += ["--invariant", "-i", volume_id(partition)]
    argv += [str(image), str(partition.size // 1024)]
    run(argv, f"mkfs.vfat for {partition.label} failed")


def check(image: Path, partition: Partition) -> None:
    """fsck.vfat -n must find the partition clean; it takes no offset, so it reads a sparse copy of the range."""
    with tempfile.TemporaryDirectory(prefix="mdi-fsck-") as tmp:
        copy = Path(tmp) / "partition.fat"
        try:
            extract(image, partition.start, partition.size, copy)
        except OSError as exc:
            raise BuildError(f"cannot read the {partition.label} FAT partition for checking: {exc}") from None
        run(["fsck.vfat", "-n", str(copy)],
            f"fsck.vfat found problems in the {partition.label} FAT filesystem (partition {partition.number})")
