"""Read images with independent tools (sfdisk, blkid, e2fsck, debugfs, fsck.vfat): never the builder's model."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing text output."""
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def sfdisk_json(image: Path) -> dict[str, Any]:
    """The partition table as `sfdisk --json` reports it, without the file-specific device names."""
    table: dict[str, Any] = json.loads(run("sfdisk", "--json", str(image)).stdout)["partitiontable"]
    table.pop("device", None)
    for p in table.get("partitions", []):
        p["node"] = re.sub(r"^.*?(\d+)$", r"\1", p["node"])
    return table


def part_offset(image: Path, number: int) -> int:
    """Byte offset of partition `number` according to sfdisk."""
    for p in sfdisk_json(image)["partitions"]:
        if p["node"] == str(number):
            return int(p["start"]) * 512
    raise KeyError(number)


def part_size(image: Path, number: int) -> int:
    """Byte size of partition `number` according to sfdisk."""
    for p in sfdisk_json(image)["partitions"]:
        if p["node"] == str(number):
            return int(p["size"]) * 512
    raise KeyError(number)


def blkid(image: Path, offset: int) -> dict[str, str]:
    """blkid's low-level probe of the filesystem at offset."""
    out = run("blkid", "-p", "-O", str(offset), "-o", "export", str(image), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def e2fsck_clean(image: Path, offset: int) -> subprocess.CompletedProcess[str]:
    """e2fsck -fn of the ext4 at offset (exit 0 means clean)."""
    return run("e2fsck", "-fn", f"{image}?offset={offset}", check=False)


def superblock(image: Path, offset: int) -> dict[str, str]:
    """dumpe2fs -h fields of the ext4 at offset."""
    out = run("dumpe2fs", "-h", f"{image}?offset={offset}").stdout
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def fsck_vfat(image: Path, offset: int, size: int, scratch: Path) -> subprocess.CompletedProcess[str]:
    """fsck.vfat -n on a copy of the partition's bytes (fsck.vfat takes no offset)."""
    part = scratch / f"part-{offset}.fat"
    with open(image, "rb") as src, open(part, "wb") as dst:
        src.seek(offset)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
    try:
        return run("fsck.vfat", "-n", str(part), check=False)
    finally:
        part.unlink()


def debugfs(image: Path, offset: int, request: str) -> str:
    """Output of one debugfs request on the ext4 at offset."""
    return run("debugfs", "-R", request, f"{image}?offset={offset}").stdout


def inode_facts(image: Path, offset: int, path: str) -> dict[str, int]:
    """mode, uid, gid, links and inode number of a path, read by debugfs."""
    quoted = '"' + path.replace('"', '""') + '"'
    out = debugfs(image, offset, f"stat {quoted}")
    m = re.search(r"Inode: (\d+)\s+Type: \S+\s+Mode:\s+(\d+)", out)
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    ln = re.search(r"Links: (\d+)", out)
    t = re.search(r"Type: (\S+)", out)
    if not (m and u and ln and t):
        raise FileNotFoundError(f"{path}: {out[:200]}")
    kind = {"regular": 0o100000, "directory": 0o040000, "symlink": 0o120000}.get(t.group(1), 0)
    return {"ino": int(m.group(1)), "mode": kind | int(m.group(2), 8), "uid": int(u.group(1)),
            "gid": int(u.group(2)), "links": int(ln.group(1))}


def extract_root(image: Path, offset: int, dest: Path) -> Path:
    """Copy the whole ext4 out with debugfs rdump (as root: owners, modes and times kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    res = run("debugfs", "-R", f"rdump / {dest}", f"{image}?offset={offset}", check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return dest
