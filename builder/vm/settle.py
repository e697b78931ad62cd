"""After the VM stage of a deterministic build: pin what the booted tools left variable, on the host, without root.

The VM mounts the root ext4 and the FAT partitions read-write and runs the bootloader installer, so it
leaves: inode times from the VM's clock (atime of every file read, c/mtime of files written, nanoseconds),
a journal full of transactions, records of deleted inodes and bytes of freed blocks, directory blocks
with stale entries, and FAT entries stamped with the VM's clock (plus systemd-boot's random seed). This
step (1) rebuilds the journal empty, (2) sets atime/ctime/crtime to the epoch and clamps mtime to it,
all nanoseconds 0, (3) rewrites every directory (e2fsck -D), (4) zeroes unused inode records and punches
free blocks out, and (5) rebuilds each FAT filesystem from its files in sorted order with the epoch as
every time (without loader/random-seed, which must not be shared between machines).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import struct
import tempfile
from pathlib import Path

from ..disk.layout import Layout, plan
from ..errors import BuildError
from ..fs import fat, fatcopy
from ..fs.ext import debugfs_errors
from ..log import step
from ..process import run
from ..sandbox.e2fscrc import with_crc_library
from ..spec import Spec

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
RANDOM_SEED = "/loader/random-seed"


def _run(argv: list[str], epoch: int, what: str, ok: tuple[int, ...] = (0,)) -> str:
    """Run an e2fsprogs/mtools command with the fake time; BuildError naming `what` on failure."""
    env = with_crc_library(dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch), SOURCE_DATE_EPOCH=str(epoch), TZ="UTC"))
    return run(argv, f"{what} failed", ok=ok, env=env).stdout


def _groups(target: str) -> tuple[int, int, list[tuple[int, int, list[tuple[int, int]], list[tuple[int, int]]]]]:
    """Inodes per group, inode size, and per group (table start, table end, free block ranges, free inode ranges)."""
    out = run(["dumpe2fs", target], f"dumpe2fs {target} failed").stdout
    ipg = int(re.search(r"^Inodes per group:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    isize = int(re.search(r"^Inode size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]

    def ranges(text: str) -> list[tuple[int, int]]:
        out_r = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out_r.append((int(lo), int(hi or lo)))
        return out_r

    groups = []
    pattern = r"^Group \d+:.*?Inode table at (\d+)-(\d+).*?Free blocks: ?([^\n]*)\n\s+Free inodes: ?([^\n]*)"
    for m in re.finditer(pattern, out, re.M | re.S):
        groups.append((int(m.group(1)), int(m.group(2)), ranges(m.group(3)), ranges(m.group(4))))
    return ipg, isize, groups


def _punch(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range (reads back as zeros), keeping the file size."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        os.pwrite(fd, bytes(length), offset)


def _inode_times(image: Path, offset: int, epoch: int, scratch: Path) -> None:
    """atime/ctime/crtime := epoch, mtime clamped to it, *_extra (ns) and generation := 0, for used inodes.

    Checksums that cover the generation (directory and extent blocks) are recomputed by the e2fsck -fyD after.
    """
    target = f"{image}?offset={offset}"
    ipg, isize, groups = _groups(target)
    lines: list[str] = []
    with open(image, "rb") as f:
        for g, (start, end, _, free_inodes) in enumerate(groups):
            free = {i for lo, hi in free_inodes for i in range(lo, hi + 1)}
            f.seek(offset + start * 4096)
            table = f.read((end - start + 1) * 4096)
            for idx in range(min(ipg, len(table) // isize)):
                ino = g * ipg + idx + 1
                if ino in free or (ino < 11 and ino != 2):
                    continue
                rec = table[idx * isize:(idx + 1) * isize]
                mtime = struct.unpack_from("<I", rec, 16)[0]
                mtime_extra = struct.unpack_from("<I", rec, 136)[0] if isize > 136 else 0
                sets = [("atime", f"@{epoch}"), ("ctime", f"@{epoch}"), ("crtime", f"@{epoch}"),
                        ("atime_extra", "0"), ("ctime_extra", "0"), ("crtime_extra", "0")]
                if mtime > epoch or mtime_extra:
                    sets += [("mtime", f"@{min(mtime, epoch)}"), ("mtime_extra", "0")]
                if struct.unpack_from("<I", rec, 100)[0]:  # i_generation: random for inodes made in the VM
                    sets.append(("generation", "0"))
                lines += [f"sif <{ino}> {field} {value}" for field, value in sets]
    cmds = scratch / "vmpin-times.cmds"
    cmds.write_text("\n".join(lines) + "\n")
    res = run(["debugfs", "-w", "-f", str(cmds), target], ok=None,
              env=with_crc_library(dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch))))
    errors = debugfs_errors(res.stderr)
    if res.returncode != 0 or errors:
        raise BuildError(f"debugfs could not pin inode times after the VM: {'; '.join(errors[:5])}")


def _scrub_free_space(image: Path, offset: int) -> None:
    """Zero records of unused inodes and punch out free blocks: no bytes of deleted files remain."""
    target = f"{image}?offset={offset}"
    ipg, isize, groups = _groups(target)
    fd = os.open(image, os.O_RDWR)
    try:
        for g, (start, _, free_blocks, free_inodes) in enumerate(groups):
            for lo, hi in free_blocks:
                _punch(fd, offset + lo * 4096, (hi - lo + 1) * 4096)
            for lo, hi in free_inodes:
                first = offset + start * 4096 + (lo - 1 - g * ipg) * isize
                length = (hi - lo + 1) * isize
                data = os.pread(fd, length, first)
                if data.count(0) != len(data):
                    os.pwrite(fd, bytes(length), first)
    finally:
        os.close(fd)


def settle_ext(image: Path, offset: int, epoch: int, scratch: Path) -> None:
    """The root ext4 after the VM: empty journal, pinned times, rewritten directories, scrubbed free space."""
    target = f"{image}?offset={offset}"
    if "has_journal" in _run(["dumpe2fs", "-h", target], epoch, "dumpe2fs -h"):  # not ext2
        _run(["tune2fs", "-O", "^has_journal", target], epoch, "removing the journal")
        _run(["tune2fs", "-j", target], epoch, "recreating the journal")
    _inode_times(image, offset, epoch, scratch)
    _run(["e2fsck", "-fyD", target], epoch, "e2fsck -fyD (rewriting directories)", ok=(0, 1))
    _scrub_free_space(image, offset)
    for assignment in ("mtime @0", f"wtime @{epoch}", f"lastcheck @{epoch}", "mnt_count 0", "kbytes_written 0",
                       'last_mounted ""'):
        _run(["debugfs", "-w", "-R", f"ssv {assignment}", target], epoch, f"debugfs ssv {assignment}")
    _run(["e2fsck", "-fn", target], epoch, "e2fsck -fn after pinning")


def settle_fat(image: Path, layout: Layout, epoch: int, deterministic: bool) -> None:
    """Rebuild every FAT partition from its files on zeroed space: sorted order, the epoch's times, no random seed."""
    for p in layout.partitions:
        if p.fs != "vfat" or p.role == "root":
            continue
        drive = f"{image}@@{p.start}"
        env = fatcopy.mtools_env(epoch)
        with tempfile.TemporaryDirectory(prefix="mdi-fat-") as tmp:
            files = Path(tmp) / "files"
            files.mkdir()
            res = run(["mcopy", "-s", "-n", "-i", drive, "::/*", str(files)], ok=None, env=env)
            if res.returncode != 0 and "No match" not in res.stderr:
                raise BuildError(f"reading the {p.label} FAT partition failed: {res.stderr.strip()}")
            seed = files / RANDOM_SEED.lstrip("/")
            seed.unlink(missing_ok=True)
            # mkfs.vfat leaves the data area as it was: without zeroing it, what the VM wrote (the random
            # seed, older copies of files, the tails of their last clusters) would stay in the image.
            fd = os.open(image, os.O_RDWR)
            try:
                _punch(fd, p.start, p.size)
            finally:
                os.close(fd)
            fat.make(image, p, deterministic)
            for dirpath, dirnames, filenames in os.walk(files):
                dirnames.sort()
                rel = os.path.relpath(dirpath, files)
                for name in sorted(dirnames):
                    _run(["mmd", "-i", drive, f"::/{os.path.join(rel, name) if rel != '.' else name}"], epoch,
                         f"mmd on {p.label}")
                for name in sorted(filenames):
                    src = os.path.join(dirpath, name)
                    os.utime(src, (epoch, epoch))
                    dest = f"::/{os.path.join(rel, name) if rel != '.' else name}"
                    _run(["mcopy", "-m", "-i", drive, src, dest], epoch, f"mcopy to {p.label}")
        fat.check(image, p)


def settle_after_vm(spec: Spec, image: Path, layout: Layout, scratch: Path) -> None:
    """Everything the VM stage left variable, pinned (deterministic builds only)."""
    if not spec.deterministic:
        return
    epoch = spec.source_date_epoch
    with step("settle the VM's writes (times, journal, free space, FAT)"):
        if spec.ext_root:
            settle_ext(image, layout.root.start, epoch, scratch)
        settle_fat(image, layout, epoch, spec.deterministic)


def settle_image(spec: Spec, image: Path) -> None:
    """settle_after_vm for a raw image of this spec (layout from its size), with a temporary scratch directory."""
    with tempfile.TemporaryDirectory(prefix="mdi-pin-") as tmp:
        settle_after_vm(spec, image, plan(spec, image.stat().st_size), Path(tmp))
