"""Describe a disk image as independent tools read it: qemu-img, sfdisk, blkid, dumpe2fs and mtools.

Nothing here uses the builder's own layout model: it is what tests and users compare against the spec.
Images that are not raw are first converted to a sparse temporary raw file with qemu-img. The root
filesystem is the last partition with a Linux filesystem type (GPT 0FC63DAF-… or x86-64 root, MBR 83),
or the whole file when there is no partition table.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .. import rules
from ..errors import BuildError, UserError
from ..process import run

LINUX_TYPES = {
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem data
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",  # Linux root (x86-64)
    "83",
}


def _run(cmd: list[str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run an inspecting tool (builder/process.py), returning the result when its exit status is in ok."""
    return run(cmd, ok=ok, missing="needed to inspect images")


def qemu_info(path: Path) -> dict[str, Any]:
    """qemu-img's view of the file: format and virtual size, probed from its content."""
    info: dict[str, Any] = json.loads(_run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    return info


def partition_table(raw: Path) -> dict[str, Any] | None:
    """`sfdisk --json` of a raw image, or None when it holds no partition table."""
    done = _run(["sfdisk", "--json", str(raw)], ok=(0, 1))
    if done.returncode == 1:
        if "does not contain a recognized partition table" in done.stderr:
            return None
        raise BuildError(f"sfdisk --json {raw} failed: {done.stderr.strip()}")
    table: dict[str, Any] = json.loads(done.stdout)["partitiontable"]
    return table


def probe_filesystem(raw: Path, offset: int, size: int) -> dict[str, str]:
    """What `blkid -p` finds in [offset, offset+size) of raw (TYPE, LABEL, UUID, VERSION, ...); {} if nothing."""
    done = _run(["blkid", "-p", "-o", "export", "-O", str(offset), "-S", str(size), str(raw)], ok=(0, 2))
    if done.returncode == 2:
        return {}
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    fields.pop("DEVNAME", None)
    return fields


def dumpe2fs_header(raw: Path, offset: int) -> dict[str, str]:
    """The superblock fields `dumpe2fs -h` prints for the ext filesystem at offset (unix io `?offset=`)."""
    out = _run(["dumpe2fs", "-h", f"{raw}?offset={offset}"]).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def fat_free_bytes(raw: Path, offset: int) -> int | None:
    """Free bytes of the FAT filesystem at offset, as mtools' `mdir` reports them."""
    done = _run(["mdir", "-i", f"{raw}@@{offset}", "-a", "::"], ok=(0, 1))
    match = re.search(r"^\s*([\d ]+) bytes free", done.stdout, re.MULTILINE)
    return int(match.group(1).replace(" ", "")) if match else None


def _partition_number(device: str, node: str) -> int:
    """The partition number sfdisk encodes in its node name (`img2`, or `img1p2` after a digit)."""
    suffix = node[len(device):] if node.startswith(device) else node
    match = re.search(r"(\d+)$", suffix)
    if match is None:
        raise BuildError(f"cannot read a partition number from sfdisk node {node!r}")
    return int(match.group(1))


def _filesystem(raw: Path, offset: int, size: int) -> dict[str, Any]:
    """fsType, label, uuid and version of a region, plus free space for FAT."""
    probed = probe_filesystem(raw, offset, size)
    fs: dict[str, Any] = {
        "fsType": probed.get("TYPE"),
        "label": probed.get("LABEL"),
        "uuid": probed.get("UUID"),
        "fsVersion": probed.get("VERSION"),
    }
    if fs["fsType"] == "vfat":
        fs["freeBytes"] = fat_free_bytes(raw, offset)
    return fs


def _partitions(raw: Path, table: dict[str, Any]) -> list[dict[str, Any]]:
    """Every partition of an sfdisk table with byte offsets and what lies in it."""
    sector = int(table.get("sectorsize", 512))
    parts = []
    for p in table.get("partitions", []):
        start, size = int(p["start"]) * sector, int(p["size"]) * sector
        parts.append({
            "number": _partition_number(table["device"], p["node"]),
            "start": start,
            "size": size,
            "end": start + size,
            "type": str(p["type"]).upper() if table["label"] == "gpt" else str(p["type"]),
            "guid": p.get("uuid"),
            "name": p.get("name"),
            "attrs": p.get("attrs"),
            "bootable": bool(p.get("bootable", False)),
            **_filesystem(raw, start, size),
        })
    return parts


def root_filesystem(raw: Path, offset: int, size: int) -> dict[str, Any]:
    """The root filesystem's identity and, for ext2/3/4, its geometry and free space from the superblock."""
    fs = _filesystem(raw, offset, size)
    root: dict[str, Any] = {"offset": offset, "fsType": fs["fsType"], "label": fs["label"], "uuid": fs["uuid"]}
    for key in ("blockSize", "blockCount", "freeBlocks", "freeBytes", "reservedBlocks", "inodeCount",
                "freeInodes", "features", "hashSeed"):
        root[key] = None
    if fs["fsType"] in rules.ext_family():
        h = dumpe2fs_header(raw, offset)
        root.update(
            blockSize=int(h["Block size"]),
            blockCount=int(h["Block count"]),
            freeBlocks=int(h["Free blocks"]),
            freeBytes=int(h["Free blocks"]) * int(h["Block size"]),
            reservedBlocks=int(h["Reserved block count"]),
            inodeCount=int(h["Inode count"]),
            freeInodes=int(h["Free inodes"]),
            features=h["Filesystem features"].split(),
            hashSeed=h.get("Directory Hash Seed"),
        )
    return root


def inspect_raw(raw: Path, fmt: str, virtual_size: int) -> dict[str, Any]:
    """Describe a raw image file (fmt and virtual_size are what qemu-img said of the original)."""
    table = partition_table(raw)
    report: dict[str, Any] = {"format": fmt, "virtualSize": virtual_size}
    if table is None:
        report.update(table=None, diskGuid=None, diskId=None, firstLba=None, lastLba=None, partitions=[])
        report["root"] = root_filesystem(raw, 0, virtual_size)
        return report
    parts = _partitions(raw, table)
    report.update(
        table=table["label"],
        diskGuid=table["id"].upper() if table["label"] == "gpt" else None,
        diskId=table.get("id"),
        firstLba=table.get("firstlba"),
        lastLba=table.get("lastlba"),
        partitions=parts,
    )
    linux = [p for p in parts if p["type"] in LINUX_TYPES]
    report["root"] = root_filesystem(raw, linux[-1]["start"], linux[-1]["size"]) if linux else None
    return report


def inspect_image(path: Path) -> dict[str, Any]:
    """What independent tools read from an image of any qemu-img format: table, partitions, filesystems, free space."""
    if not path.is_file():
        raise UserError(f"image {str(path)!r}: no such file")
    info = qemu_info(path)
    fmt, size = str(info["format"]), int(info["virtual-size"])
    if fmt == "raw":
        return inspect_raw(path, fmt, size)
    with tempfile.TemporaryDirectory(prefix="mdi-inspect-") as tmp:
        raw = Path(tmp) / "image.raw"
        _run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)])
        return inspect_raw(raw, fmt, size)
