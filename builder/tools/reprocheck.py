"""--check-reproducible: build twice from fresh work directories and explain every difference.

Differing bytes are mapped, with independent tools, to the partition (sfdisk), the filesystem (blkid)
and inside it: for ext4 to the superblock, group descriptors, bitmaps, the inode table (inode number and
path via debugfs ncheck), the journal, or a file's data (debugfs icheck + ncheck); for FAT to the boot
sector, FAT, root directory or data, plus the files whose directory entries differ (mdir).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import rules
from ..log import info, step
from ..process import run
from ..spec import Spec, load_spec_document

CHUNK = 1 << 20
BLOCK = 4096
MAX_REPORTED = 40


@dataclass(frozen=True)
class Region:
    """A byte range of the disk and what lies there."""

    start: int
    end: int
    name: str  # "partition 2" or "disk"
    fs: str | None


def differing_blocks(a: Path, b: Path) -> list[int]:
    """Offsets of the 4 KiB blocks in which two equally sized files differ (size difference counts as block -1)."""
    if a.stat().st_size != b.stat().st_size:
        return [-1]
    out: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if not ca:
                break
            if ca != cb:
                for i in range(0, len(ca), BLOCK):
                    if ca[i:i + BLOCK] != cb[i:i + BLOCK]:
                        out.append(pos + i)
            pos += len(ca)
    return out


def regions(image: Path) -> list[Region]:
    """The partitions sfdisk reads from the image (or the whole disk as one filesystem), with blkid's type."""
    res = run(["sfdisk", "--json", str(image)], ok=None)
    size = image.stat().st_size
    if res.returncode != 0:
        return [Region(0, size, "disk (no partition table)", _fs_type(image, 0))]
    parts = json.loads(res.stdout)["partitiontable"]["partitions"]
    out = []
    for p in parts:
        number = re.sub(r"^.*?(\d+)$", r"\1", p["node"])
        start = int(p["start"]) * 512
        out.append(Region(start, start + int(p["size"]) * 512, f"partition {number}", _fs_type(image, start)))
    return out


def _fs_type(image: Path, offset: int) -> str | None:
    """blkid's filesystem type at offset."""
    res = run(["blkid", "-p", "-O", str(offset), "-o", "value", "-s", "TYPE", str(image)], ok=None)
    return res.stdout.strip() or None


def _ext4_layout(target: str) -> tuple[dict[str, int], list[tuple[int, int, int]], set[int]]:
    """Superblock numbers, inode tables as (first block, last block, group) and bitmap/descriptor blocks."""
    out = run(["dumpe2fs", target], ok=None).stdout
    sb = {k: int(v) for k, v in re.findall(r"^(Inodes per group|Inode size|Block size):\s+(\d+)", out, re.M)}
    tables = [(int(a), int(b), int(g)) for g, a, b in
              re.findall(r"^Group (\d+):.*?Inode table at (\d+)-(\d+)", out, re.M | re.S)]
    meta: set[int] = set()
    for _kind, a, b in re.findall(r"(superblock|Group descriptors|bitmap) at (\d+)(?:-(\d+))?", out):
        meta.update(range(int(a), int(b or a) + 1))
    return sb, tables, meta


def _debugfs(target: str, request: str) -> str:
    """One debugfs request's output."""
    return run(["debugfs", "-R", request, target], ok=None).stdout


def explain_ext4(image: Path, region: Region, offsets: list[int], other: Path) -> list[str]:
    """Name what each differing ext4 block holds: metadata, an inode (with its path) or a file's data."""
    target = f"{image}?offset={region.start}"
    sb, tables, meta = _ext4_layout(target)
    lines: list[str] = []
    data_blocks: list[int] = []
    for off in offsets:
        block = (off - region.start) // BLOCK
        table = next((t for t in tables if t[0] <= block <= t[1]), None)
        if table is not None:
            inodes = _differing_inodes(image, other, off, table, block, sb)
            paths = [f"inode {ino} ({_path_of(target, ino)})" for ino in inodes]
            lines.append(f"ext4 block {block}: inode table of group {table[2]}: {', '.join(paths) or 'padding'}")
        elif block in meta:
            lines.append(f"ext4 block {block}: superblock, group descriptors or a bitmap")
        else:
            data_blocks.append(block)
    if data_blocks:
        icheck = _debugfs(target, "icheck " + " ".join(map(str, data_blocks[:MAX_REPORTED])))
        for m in re.finditer(r"^(\d+)\s+(\d+|<block not found>)", icheck, re.M):
            number, owner = m.group(1), m.group(2)
            if owner.isdigit():
                what = "the journal" if owner == "8" else f"data of inode {owner} ({_path_of(target, int(owner))})"
            else:
                what = "a free block (stale bytes left by the VM)"
            lines.append(f"ext4 block {number}: {what}")
    return lines


def _differing_inodes(a: Path, b: Path, off: int, table: tuple[int, int, int], block: int,
                      sb: dict[str, int]) -> list[int]:
    """Inode numbers whose on-disk records differ within one inode table block."""
    size = sb.get("Inode size", 256)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(off)
        fb.seek(off)
        ba, bb = fa.read(BLOCK), fb.read(BLOCK)
    first = table[2] * sb["Inodes per group"] + (block - table[0]) * (BLOCK // size) + 1
    return [first + i for i in range(BLOCK // size) if ba[i * size:(i + 1) * size] != bb[i * size:(i + 1) * size]]


def _path_of(target: str, ino: int) -> str:
    """A path of inode ino (debugfs ncheck), or what the reserved inode is."""
    reserved = {1: "bad blocks", 2: "/", 3: "user quota", 4: "group quota", 7: "resize", 8: "journal",
                11: "/lost+found", 12: "orphan file"}
    out = _debugfs(target, f"ncheck {ino}")
    m = re.search(rf"^{ino}\s+(.+)$", out, re.M)
    return m.group(1) if m else reserved.get(ino, "no path")


def explain_fat(image: Path, region: Region, offsets: list[int], other: Path) -> list[str]:
    """FAT region of each differing block, and the directory entries (name, size, time) that differ."""
    with open(image, "rb") as f:
        f.seek(region.start)
        bs = f.read(512)
    sector = int.from_bytes(bs[11:13], "little")
    reserved = int.from_bytes(bs[14:16], "little") * sector
    fats = bs[16]
    fat_size = (int.from_bytes(bs[22:24], "little") or int.from_bytes(bs[36:40], "little")) * sector
    lines = []
    for off in offsets[:MAX_REPORTED]:
        rel = off - region.start
        where = ("boot sector/reserved" if rel < reserved else "FAT" if rel < reserved + fats * fat_size
                 else "directories or file data")
        lines.append(f"FAT byte {rel}: {where}")
    listings = []
    for img in (image, other):
        res = run(["mdir", "-/", "-a", "-i", f"{img}@@{region.start}", "::"], ok=None)
        listings.append(set(res.stdout.splitlines()))
    for line in sorted(listings[0] ^ listings[1])[:MAX_REPORTED]:
        if line.strip() and "Volume" not in line:
            lines.append(f"FAT directory entry differs: {line.strip()}")
    return lines


def explain(a: Path, b: Path) -> list[str]:
    """A report of every difference between two images of the same spec (empty when identical)."""
    blocks = differing_blocks(a, b)
    if not blocks:
        return []
    if blocks == [-1]:
        return [f"sizes differ: {a.stat().st_size} != {b.stat().st_size} bytes"]
    report = [f"{len(blocks)} blocks of 4 KiB differ"]
    parts = regions(a)
    first = min((r.start for r in parts), default=0)
    for region in [Region(0, first, "partition table / boot code area", None), *parts]:
        inside = [o for o in blocks if region.start <= o < region.end]
        if not inside:
            continue
        blocks = [o for o in blocks if o not in inside]
        head = f"{region.name} ({region.fs or 'no filesystem'}, bytes {region.start}-{region.end}): " \
               f"{len(inside)} blocks differ"
        report.append(head)
        detail: list[str] = []
        if region.fs in rules.ext_family():
            detail = explain_ext4(a, region, inside, b)
        elif region.fs == "vfat":
            detail = explain_fat(a, region, inside, b)
        else:
            detail = [f"byte {o - region.start} of the {region.fs or 'area'}" for o in inside[:MAX_REPORTED]]
        report += ["  " + d for d in detail[:MAX_REPORTED]]
    if blocks:
        report.append(f"outside any partition: {len(blocks)} blocks, first at byte {blocks[0]}")
    return report


def check_reproducible(spec: Spec, work: Path | None) -> int:
    """Build the spec twice (raw, fresh work directories); print the differences; 0 when identical, 1 otherwise."""
    from ..pipeline import build

    raw_spec = load_spec_document({**spec.raw, "format": "raw", "postVM": ""})
    with tempfile.TemporaryDirectory(prefix="mdi-repro-", dir=work) as tmp:
        images = []
        for run in ("first", "second"):
            with step(f"reproducibility check: {run} build"):
                images.append(build(raw_spec, Path(tmp) / run / "out", Path(tmp) / run / "work"))
        report = explain(images[0], images[1])
    if not report:
        info("reproducible: both builds are byte-identical")
        return 0
    print("not reproducible:\n" + "\n".join(report))
    return 1
