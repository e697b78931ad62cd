"""Write the partition table with pyparted at the offsets of the layout, then pin GUIDs/ids when deterministic.

The result must read back (sfdisk --json) as what nixos/lib/make-disk-image.nix (nixpkgs) gets from
`parted --script` and `sgdisk`: tests/test_partition_tables.py runs both and compares.
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from pathlib import Path
from typing import BinaryIO

import _ped
import parted

from ..errors import BuildError
from ..process import run
from ..units import SECTOR
from .layout import Layout

PARTED_FS = {"vfat": "fat32", "ext4": "ext4", "ext3": "ext3", "ext2": "ext2"}


def write_table(image: Path, layout: Layout) -> None:
    """Create the msdos or GPT table in image (which has its final size) with flags and names.

    Each partition is made as parted's `mkpart` makes it: the filesystem type sets the system (msdos type
    byte, GPT type GUID), then the LBA flag goes on wherever the label has one (parted.c do_mkpart), which
    turns msdos FAT32 from 0x0b into 0x0c, then the layout's flags (`set N boot on`, ...). Identifiers the
    layout leaves None (deterministic = false) stay as libparted draws them, at random, as in nixpkgs.
    """
    if layout.table is None:
        return
    device = parted.getDevice(str(image))
    try:
        disk = parted.freshDisk(device, layout.table)
        for p in layout.partitions:
            geometry = parted.Geometry(device=device, start=p.start // SECTOR, end=p.end // SECTOR - 1)
            fs = parted.FileSystem(type=PARTED_FS[p.fs], geometry=geometry) if p.fs in PARTED_FS else None
            part = parted.Partition(disk=disk, type=parted.PARTITION_NORMAL, fs=fs, geometry=geometry)
            disk.addPartition(part, constraint=parted.Constraint(exactGeom=geometry))
            if part.number != p.number:
                raise BuildError(f"parted numbered partition {p.role} {part.number}, expected {p.number}")
            if layout.table == "gpt" and p.name:
                part.name = p.name
            if part.isFlagAvailable(parted.PARTITION_LBA):
                part.setFlag(parted.PARTITION_LBA)
            for flag in p.flags:
                part.setFlag(_ped.partition_flag_get_by_name(flag))
        disk.commit()
    except parted.PartedException as exc:
        raise BuildError(f"writing the {layout.table} partition table failed: {exc}") from None
    finally:
        device.removeFromCache()
    _fix_ids(image, layout)


def _patch_gpt_header(f: BinaryIO, lba: int, disk_guid: str | None, part_guids: dict[int, str]) -> None:
    """Set GUIDs in one GPT header and its entry array, recomputing both CRC32s."""
    f.seek(lba * SECTOR)
    header = bytearray(f.read(SECTOR))
    if header[:8] != b"EFI PART":
        raise BuildError(f"no GPT header at LBA {lba}")
    size = struct.unpack_from("<I", header, 12)[0]
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    f.seek(entries_lba * SECTOR)
    entries = bytearray(f.read(count * entry_size))
    for number, guid in part_guids.items():
        off = (number - 1) * entry_size
        entries[off + 16:off + 32] = uuid.UUID(guid).bytes_le
    if disk_guid:
        header[56:72] = uuid.UUID(disk_guid).bytes_le
    struct.pack_into("<I", header, 88, zlib.crc32(entries))
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(header[:size]))
    f.seek(entries_lba * SECTOR)
    f.write(entries)
    f.seek(lba * SECTOR)
    f.write(header)


def _fix_ids(image: Path, layout: Layout) -> None:
    """Set the fixed disk GUID / MBR disk id and partition GUIDs of a deterministic build (sgdisk's job upstream).

    A layout of a non-deterministic spec holds none of them, and nothing here is written.
    """
    with open(image, "r+b") as f:
        if layout.mbr_id is not None:
            f.seek(440)
            f.write(struct.pack("<I", layout.mbr_id))
        part_guids = {p.number: p.guid for p in layout.partitions if p.guid}
        if layout.table == "gpt" and (layout.disk_guid or part_guids):
            f.seek(SECTOR)
            backup_lba = struct.unpack_from("<Q", f.read(SECTOR), 32)[0]
            for lba in (1, backup_lba):
                _patch_gpt_header(f, lba, layout.disk_guid, part_guids)


def check(image: Path, layout: Layout) -> None:
    """sfdisk must read the table without a complaint and find exactly the planned partitions (start and size)."""
    if layout.table is None:
        return
    verify = run(["sfdisk", "--verify", str(image)], ok=None)
    complaints = [ln for ln in verify.stderr.splitlines() if ln.strip()]
    if verify.returncode != 0 or complaints:
        raise BuildError(f"sfdisk --verify found problems in the {layout.table} partition table: "
                         + "; ".join(complaints[:5] or [verify.stdout.strip()[-500:]]))
    listed = run(["sfdisk", "--json", str(image)], "sfdisk cannot read the partition table")
    found = sorted(
        (int(p["node"][len(str(image)):].lstrip("p")), int(p["start"]) * SECTOR, int(p["size"]) * SECTOR)
        for p in json.loads(listed.stdout)["partitiontable"].get("partitions", [])
    )
    planned = sorted((p.number, p.start, p.size) for p in layout.partitions)
    if found != planned:
        raise BuildError(f"the partition table reads back as {found} (number, start, size in bytes), "
                         f"not the planned {planned}")
