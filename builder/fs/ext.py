"""The root ext4: created and populated at its partition offset with mkfs.ext4 -d, in one pass over the tree.

No root and no mount: mkfs.ext4 writes the tree at `-E offset`. mkfs copies owners and times from the
build's files, so it runs with the stat shim (builder/sandbox/statshim.c, LD_PRELOAD) that shows it every file as
owned by root with atime/ctime at the epoch, and E2FSPROGS_FAKE_TIME pins what it stamps itself (crtime;
with deterministic also the superblock's times; e2fsprogs 1.47.0 ignores SOURCE_DATE_EPOCH). The numeric
owners contents asked for are then set with debugfs. Without the shim (not built, or MDI_STAT_SHIM=none)
one debugfs pass over every inode sets owners and times instead: same result, slower. mkfs (the probes too),
the debugfs pass and e2fsck also run with the checksum library (builder/sandbox/e2fscrc.c): libext2fs'
CRC-32C on the CPU's crc32 instruction, the same bytes in less time; mkfs also with the directory library
(builder/sandbox/e2fsdir.c), which adds each entry where libext2fs would, without scanning the directory,
and the data library (builder/sandbox/e2fsdata.c), which puts the data of the files of 64 KiB or more into
the image without passing it through user space, on a thread of its own (shared blocks where the filesystem
can, else direct writes from the store's pages) while mkfs writes everything else.
mkfs -d writes every directory linear; e2fsck -fyD then rewrites each one, with a hash index where it has
more than one block (docs/directories.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..concurrent import alongside, run_side_by_side
from ..disk import layout, table
from ..disk.writeback import written_back
from ..errors import BuildError, OutOfHostSpace, UserError
from ..log import info, step
from ..process import run
from ..sandbox.e2fscrc import with_crc_library
from ..sandbox.e2fsdata import data_plan, describe, read_report
from ..sandbox.e2fsdir import dir_library
from ..sandbox.namespace import run_with_binds, userns_available
from ..sandbox.preload import preload_list
from ..sandbox.statshim import stat_shim
from ..spec import Spec
from ..staging import measure, store
from ..staging.contents import ModeFix, OwnerFix
from ..staging.measure import BLOCK
from ..staging.root import StagedRoot, closure_binds, remove_tree_quietly, stage_root
from ..units import MiB, align_up, human
from . import fat
from .build import NoSpace

# The first inode mkfs -d creates from the tree (after the reserved ones and lost+found).
FIRST_TREE_INODE = 12

# Free space on the work directory's filesystem below which a mkfs "No space left" means the host is full.
HOST_FULL_BYTES = 1 << 20


@dataclass(frozen=True)
class Ext4Params:
    """How to create the root ext4."""

    label: str
    uuid: str | None
    hash_seed: str | None
    inodes: int
    fake_time: int | None
    # ext4, or ext3/ext2 as nixpkgs makes them for partitionTableType = "none" (mkfs.${fsType}).
    fs_type: str = "ext4"


def _mkfs_argv(params: Ext4Params, target: str, size_bytes: int, offset: int | None, source: str | None) -> list[str]:
    """mkfs.ext4's command line (-t for ext2/ext3); every -E option in one list since only the last -E counts."""
    ext = ["nodiscard", "lazy_itable_init=1", "lazy_journal_init=1", "root_owner=0:0"]
    if offset is not None:
        ext.insert(0, f"offset={offset}")
    if params.hash_seed:
        ext.append(f"hash_seed={params.hash_seed}")
    argv = ["mkfs.ext4", "-q", "-F", "-t", params.fs_type, "-b", str(BLOCK), "-T", "default", "-m", "5",
            "-N", str(params.inodes),
            "-L", params.label, "-E", ",".join(ext)]
    if params.uuid:
        argv += ["-U", params.uuid]
    if source is not None:
        argv += ["-d", source]
    return [*argv, target, f"{size_bytes // 1024}k"]


def _env(params: Ext4Params) -> dict[str, str]:
    """Environment for e2fsprogs: fixed time when deterministic, no mke2fs.conf surprises, fast checksums."""
    env = dict(os.environ)
    if params.fake_time is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(params.fake_time)
    env.pop("MKE2FS_CONFIG", None)
    return with_crc_library(env)


def superblock(target: str) -> dict[str, str]:
    """dumpe2fs -h of a filesystem (target may carry '?offset=N'), as a dict."""
    res = run(["dumpe2fs", "-h", target], f"dumpe2fs -h {target} failed")
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def overhead_blocks(size_bytes: int, params: Ext4Params, scratch: Path) -> int:
    """Blocks an EMPTY ext4 of this size and inode count uses (metadata, journal, root, lost+found)."""
    with tempfile.NamedTemporaryFile(dir=scratch, prefix="probe-", suffix=".ext4") as f:
        os.truncate(f.name, size_bytes)
        run(_mkfs_argv(params, f.name, size_bytes, None, None), "mkfs.ext4 probe failed", env=_env(params))
        sb = superblock(f.name)
    return int(sb["Block count"]) - int(sb["Free blocks"])


# What `e2fsck -fyD` prints on a filesystem it finds clean (LC_ALL=C): the pass headers (e2fsck/problem.c,
# PR_1_PASS_HEADER to PR_5_PASS_HEADER, and PR_3A_PASS_HEADER before the rehash), blank lines, and unix.c's
# "***** FILE SYSTEM WAS MODIFIED *****" and summary lines after the device name. Any other line is a problem
# (problem.c fix_problem prints each one, then its "Fix? yes") or a warning.
CLEAN_FSCK_LINES = frozenset({
    "Pass 1: Checking inodes, blocks, and sizes",
    "Pass 2: Checking directory structure",
    "Pass 3: Checking directory connectivity",
    "Pass 3A: Optimizing directories",
    "Pass 4: Checking reference counts",
    "Pass 5: Checking group summary information",
})

# Up to this many inodes, e2fsck counts links in plain arrays (-E inode_count_fullmap: 4 bytes per inode, here
# at most 64 MiB) instead of its sorted lists: the same bytes, in less CPU time (docs/directories.md).
FULLMAP_INODES = 1 << 24

# Lines of an e2fsck report shown in a failure message.
SHOWN_LINES = 20


def _fsck_options(inodes: int) -> list[str]:
    """e2fsck's -E options: no readahead (the image was just written and sits in the page cache; the fadvise
    calls only cost system calls), and array link counts for filesystems of up to FULLMAP_INODES inodes."""
    fullmap = 0 < inodes <= FULLMAP_INODES
    return ["-E", "readahead_kb=0,inode_count_fullmap" if fullmap else "readahead_kb=0"]


def fsck_problems(stdout: str, stderr: str, device: str) -> list[str]:
    """The lines of an `e2fsck -fyD` run (LC_ALL=C) that a clean run does not print: the problems it found.

    device: the name e2fsck puts before its closing lines, the volume label when there is one (e2fsck/unix.c).
    Not the version banner on stderr, nor the dynamic loader's notice that a preloaded library (the checksum
    library) was ignored: e2fsck then ran with libext2fs' own checksums.
    """
    summary = re.compile(re.escape(device) + r": \d+/\d+ files \(\d+\.\d% non-contiguous\), \d+/\d+ blocks")
    modified = f"{device}: ***** FILE SYSTEM WAS MODIFIED *****"
    out = [ln for ln in stdout.splitlines()
           if ln.strip() and ln not in CLEAN_FSCK_LINES and ln != modified and not summary.fullmatch(ln)]
    err = [ln for ln in stderr.splitlines()
           if ln.strip() and not re.fullmatch(r"e2fsck \d[\w.-]* \([\w-]+\)", ln)
           and not (ln.startswith("ERROR: ld.so: ") and "LD_PRELOAD" in ln)]
    return out + err


def fsck_device_name(label: str, image: Path) -> str:
    """The name e2fsck gives the filesystem in its report (e2fsck/unix.c): the superblock's label, at most its
    16 bytes (mkfs truncates a longer one), else the file name without the "?offset" io options; each
    whitespace byte and ':' replaced by '_'. Decoded as the runner decodes tools' output."""
    name = label.encode()[:16].split(b"\0")[0] if label else os.fsencode(image)
    return re.sub(rb"[ \t\n\v\f\r:]", b"_", name).decode("utf-8", "backslashreplace")


def index_directories(image: Path, offset: int, params: Ext4Params, epoch: int | None = None) -> None:
    """One e2fsck -fyD: checks what mkfs and debugfs wrote, and rewrites every directory, indexed if of 2+ blocks.

    mkfs.ext4 -d (e2fsprogs 1.47) writes every directory linear, and the kernel indexes a directory only
    while it has one block (fs/ext4/namei.c make_indexed_dir), so a big one would stay linear for life:
    linear lookups, and no more than 65000 subdirectories. e2fsck's rehash (e2fsck/rehash.c) indexes a
    directory of two blocks or more, entries sorted by the superblock's hash seed, so the bytes follow
    from the tree and the seed. No e2fsck.conf: its indexed_dir_slack_percentage would change the bytes, and
    its [problems] settings could silence a problem.

    -y repairs whatever else e2fsck finds, so its report is the check of what mkfs and the owners pass
    (debugfs) wrote: the build fails unless e2fsck exits 0 (1 once it fixed a problem: E2F_FLAG_PROBLEMS_FIXED,
    or a superblock not marked clean; e2fsck/unix.c) and prints nothing but a clean run's lines (fsck_problems).
    """
    target = f"{image}?offset={offset}"
    env = dict(_env(params), E2FSCK_CONFIG="/dev/null", LC_ALL="C")  # C: the report is read, untranslated
    if params.fake_time is not None:  # e2fsck's clock (e2fsck/e2fsck.c), stamped as last check and write time
        env["E2FSCK_TIME"] = str(params.fake_time)
    elif epoch is not None and epoch > time.time():
        # mkfs wrote with the stat shim's clock, the epoch (populate); a later real clock is fine, an earlier
        # one would read the superblock's write time as "in the future", a problem to e2fsck.
        env["E2FSCK_TIME"] = str(epoch)
    res = run(["e2fsck", "-fyD", *_fsck_options(params.inodes), target], env=env, ok=None)
    device = fsck_device_name(params.label, image)
    problems = fsck_problems(res.stdout, res.stderr, device)
    if res.returncode != 0 or problems:
        shown = "\n".join(problems[:SHOWN_LINES]) or (
            "the superblock's state was not clean" if res.returncode == 1 else "nothing printed")
        more = f"\n... and {len(problems) - SHOWN_LINES} more lines" if len(problems) > SHOWN_LINES else ""
        raise BuildError(f"e2fsck found problems in the root filesystem as mkfs.ext4 and debugfs wrote it (e2fsck "
                         f"-fyD, which repairs them while it indexes the directories, exited {res.returncode}):\n"
                         f"{shown}{more}")


def _inode_times(target: str, ino: int) -> tuple[int, int, int, int]:
    """(uid, gid, ctime, crtime) of one inode, read back with debugfs."""
    res = run(["debugfs", "-R", f"stat <{ino}>", target], ok=None)
    found = dict(re.findall(r"^\s*(ctime|crtime): 0x([0-9a-f]+)", res.stdout, re.M))
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", res.stdout)
    if res.returncode != 0 or owner is None or len(found) != 2:
        raise BuildError(f"debugfs could not read inode {ino} back: {res.stderr.strip()}")
    return int(owner[1]), int(owner[2]), int(found["ctime"], 16), int(found["crtime"], 16)


def populate(
    image: Path, offset: int, size_bytes: int, root: Path, params: Ext4Params,
    binds: Sequence[tuple[str, str]], scratch: Path, epoch: int, lazy_store: str | None = None,
    store: str | None = None,
) -> bool:
    """Create the ext4 at offset in image and fill it from root (with store paths bound in when given).

    Returns whether mkfs already wrote owner 0 and the epoch's times (the stat shim was loaded), which is
    checked on the image rather than assumed: a library the loader refuses is only a warning to it.
    """
    argv = _mkfs_argv(params, str(image), size_bytes, offset, str(root))
    env = _env(params)
    # Through env(1), so only mkfs is preloaded, not the namespace helper that execs it. The directory
    # library only there: it adds entries where libext2fs would, without scanning (builder/sandbox/e2fsdir.c);
    # and the data library: file data into the image in the kernel (builder/sandbox/e2fsdata.c).
    report = scratch / "data-report"
    report.unlink(missing_ok=True)
    settings, data = data_plan(image, offset, report)
    preload = preload_list(env.pop("LD_PRELOAD", None), dir_library(), data) or None
    argv = [*settings, *argv]
    shim = stat_shim()
    if shim:
        preload = preload_list(preload, shim)
        argv = [f"MDI_SHIM_EPOCH={epoch}", *argv]
        if store:  # the store files' host labels are left out (statshim.c)
            argv = [f"MDI_SHIM_STORE={store}", *argv]
        env["E2FSPROGS_FAKE_TIME"] = str(params.fake_time if params.fake_time is not None else epoch)
    if preload:
        argv = ["env", f"LD_PRELOAD={preload}", *argv]
    if binds:
        res = run_with_binds(binds, argv, scratch / "binds.json", env, lazy_store, epoch)
    else:
        res = run(argv, ok=None, env=env)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        host = os.statvfs(image.parent)
        if "No space left" in msg and host.f_bavail * host.f_frsize < HOST_FULL_BYTES:
            # The sparse image file could not grow: the build host's disk is full, not the image's filesystem.
            raise OutOfHostSpace(f"the directory the image is written in, {str(image.parent)!r}, ran out of space "
                             f"({host.f_bavail * host.f_frsize} bytes free) while writing the image: {msg}")
        if "Could not allocate" in msg or "No space left" in msg:
            raise NoSpace(f"the root filesystem ({size_bytes} bytes) is too small for its contents: {msg}")
        raise BuildError(f"mkfs.ext4 -d failed: {msg}")
    info(describe(read_report(report) if data else None, loaded=data is not None))
    if not shim:
        return False
    if _inode_times(f"{image}?offset={offset}", FIRST_TREE_INODE) == (0, 0, epoch, epoch):
        return True
    info(f"the stat shim {shim} did not take effect in mkfs.ext4; setting owners and times with debugfs")
    return False


def _used_inodes(target: str) -> list[int]:
    """Inode numbers in use, from dumpe2fs's per-group free inode ranges."""
    res = run(["dumpe2fs", target], f"dumpe2fs {target} failed")
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", res.stdout, re.M).group(1))  # type: ignore[union-attr]
    used: list[int] = []
    group = 0
    for m in re.finditer(r"^Group (\d+):.*?\n\s+Free inodes: ?([^\n]*)", res.stdout, re.M | re.S):
        group = int(m.group(1))
        first, last = group * per_group + 1, (group + 1) * per_group
        free: set[int] = set()
        for part in filter(None, (p.strip() for p in m.group(2).split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
        used.extend(i for i in range(first, last + 1) if i not in free)
    return used


def _quote(path: str) -> str:
    """Quote a path for debugfs' command parser (doubled quotes inside quotes)."""
    return '"' + path.replace('"', '""') + '"'


def normalize(
    image: Path, offset: int, fixes: Sequence[OwnerFix], epoch: int, scratch: Path, params: Ext4Params,
    every_inode: bool = True, modes: Sequence[ModeFix] = (), xattrs: Sequence[tuple[str, str]] = (),
) -> None:
    """Contents' numeric owners and modes, and with every_inode root and the epoch's times on all others: one debugfs.

    modes and xattrs (image path, attribute name to remove) also carry the store files whose metadata is
    not their NAR's (measure.StoreFix).

    It also zeroes the superblock's lifetime-writes counter, which counts what each pass wrote, so an image
    made with the stat shim and one made without it are the same bytes.
    """
    target = f"{image}?offset={offset}"
    cmd_file = scratch / "debugfs.cmds"
    times = [("uid", 0), ("gid", 0), ("atime", f"@{epoch}"), ("ctime", f"@{epoch}"), ("crtime", f"@{epoch}")]
    # Written as produced, and debugfs' echo discarded, so memory stays flat however many inodes there are.
    # surrogateescape: names that are not UTF-8 (os.fsdecode'd from a source tree) go back as their own bytes.
    with open(cmd_file, "w", encoding="utf-8", errors="surrogateescape") as out:
        for ino in _used_inodes(target) if every_inode else []:
            if ino != 2 and ino < 11:
                continue
            out.writelines(f"sif <{ino}> {field} {value}\n" for field, value in times)
        for fix in fixes:
            out.write(f"sif {_quote(fix.image_path)} uid {fix.uid}\nsif {_quote(fix.image_path)} gid {fix.gid}\n")
        out.writelines(f"sif {_quote(m.image_path)} mode 0{m.mode:o}\n" for m in modes)
        out.writelines(f"ea_rm {_quote(path)} {_quote(name)}\n" for path, name in xattrs)
        out.write("ssv kbytes_written 0\n")
    # Not through process.run: debugfs -f echoes every request on stdout (one line per inode), which is dropped.
    # With the directory library: a path's lookup in a big directory without a scan of it (e2fsdir.c).
    env = _env(params)
    env["LD_PRELOAD"] = preload_list(env.get("LD_PRELOAD"), dir_library())
    res = subprocess.run(["debugfs", "-w", "-f", str(cmd_file), target], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, errors="replace", env=env)
    errors = debugfs_errors(res.stderr)
    if res.returncode != 0 or errors:
        raise BuildError(f"debugfs could not set owners, modes and times: {'; '.join(errors[:5]) or res.returncode}")


def debugfs_errors(stderr: str) -> list[str]:
    """The lines of a `debugfs -f` run's stderr that report a failed request.

    Not its version banner, nor the dynamic loader's notice that a preloaded library (the checksum library)
    was ignored: debugfs then ran with libext2fs' own checksums, which give the same bytes.
    """
    return [ln for ln in stderr.splitlines()
            if ln and not ln.startswith("debugfs ") and not (ln.startswith("ERROR: ld.so: ") and "LD_PRELOAD" in ln)]


def check(image: Path, offset: int, inodes: int = 0) -> None:
    """e2fsck -fn must find the filesystem clean; the build fails otherwise.

    inodes: the filesystem's inode count when known, for array link counts up to FULLMAP_INODES.
    """
    run(["e2fsck", "-fn", *_fsck_options(inodes), f"{image}?offset={offset}"],
        "e2fsck found problems in the root filesystem", env=with_crc_library(dict(os.environ)))


@dataclass(frozen=True)
class Sizing:
    """The chosen disk and root filesystem sizes and how they were reached."""

    disk_size: int
    fs_size: int
    inodes: int
    usage: measure.Usage


def _fs_bytes_for(disk_size: int, spec: Spec) -> int:
    """The root filesystem size a disk of disk_size leaves (partition size floored to 4 KiB)."""
    return layout.root_bytes(spec, disk_size)


def ext_params(spec: Spec, inodes: int) -> Ext4Params:
    """ext4 creation parameters from the spec."""
    det = spec.deterministic
    return Ext4Params(
        label=spec.label, uuid=spec.root_fsuid, hash_seed=spec.root_fsuid if det else None,
        inodes=inodes, fake_time=spec.source_date_epoch if det else None, fs_type=spec.fs_type,
    )


def _needed_fs_bytes(spec: Spec, usage: measure.Usage, free: int, scratch: Path) -> tuple[int, int]:
    """Smallest ext4 size (and inode count) holding usage with at least `free` bytes left, by measuring mkfs."""
    want = usage.blocks * measure.BLOCK + free
    size = align_up(int(want * 1.05) + 8 * MiB, measure.BLOCK)
    for _ in range(6):
        inodes = measure.inode_count(size, usage.inodes, free)
        over = overhead_blocks(size, ext_params(spec, inodes), scratch)
        new = align_up(want + over * measure.BLOCK, measure.BLOCK)
        if new == size:
            break
        size = new
    return size, measure.inode_count(size, usage.inodes, free)


def choose_size(spec: Spec, staged: StagedRoot, scratch: Path, store_usage: measure.StoreMeasure) -> Sizing:
    """diskSize: auto from the measured tree + additionalSpace + table space, or the fixed size if it fits."""
    subs = {dest: src for src, dest in staged.store_binds}
    usage = measure.measure(staged.root, subs, store_usage)
    if spec.disk_size is None:
        fs_size, inodes = _needed_fs_bytes(spec, usage, spec.additional_space, scratch)
        if spec.share_root_filesystem:  # from the tree alone, the same for every layout (builder/fs/shared.py)
            fs_size = layout.shared_root_bytes(fs_size)
        disk = layout.smallest_disk(spec, fs_size)
    else:
        disk = spec.disk_size
        need, _ = _needed_fs_bytes(spec, usage, 0, scratch)
        if _fs_bytes_for(disk, spec) < need:
            minimum = layout.smallest_disk(spec, need) // MiB
            raise UserError(
                f"diskSize = {disk // MiB} MiB is too small: the root filesystem needs {human(need)} "
                f"({human(usage.blocks * measure.BLOCK)} of files and directories in {usage.inodes} inodes, plus "
                f"ext4 metadata); use diskSize >= {minimum} or \"auto\""
            )
        fs_size = _fs_bytes_for(disk, spec)
        inodes = measure.inode_count(fs_size, usage.inodes, 0)
    if not (spec.share_root_filesystem and spec.disk_size is None):  # otherwise it fills its partition
        fs_size = _fs_bytes_for(disk, spec)
    info(f"content: {usage.inodes} inodes, {human(usage.file_bytes)} of file data, "
         f"{human(usage.blocks * measure.BLOCK)} in 4 KiB blocks")
    info(f"root filesystem {human(fs_size)} ({inodes} inodes); disk {human(disk)} "
         f"({'auto, additionalSpace ' + human(spec.additional_space) if spec.disk_size is None else 'fixed'})")
    return Sizing(disk, fs_size, inodes, usage)


def write_image(spec: Spec, staged: StagedRoot, size: Sizing, image: Path, scratch: Path,
                plan: layout.Layout | None = None) -> layout.Layout:
    """Create the sparse image, its table, the root ext4 (populated) and empty FAT partitions; check them.

    plan: the layout to write (default: the spec's on the chosen disk; layout.root_only for the root alone).
    The FAT partitions are other byte ranges of the file: they are made on a second thread while mkfs.ext4
    fills the root. The checks only read, so they run side by side.
    """
    if plan is None:
        plan = layout.plan(spec, size.disk_size)
    with open(image, "wb") as f:
        f.truncate(plan.disk_size)
    with step("partition table"):
        table.write_table(image, plan)
    root = plan.root
    params = ext_params(spec, size.inodes)
    epoch = spec.source_date_epoch
    with alongside("boot filesystems", partial(_make_boot_filesystems, spec, image, plan)), written_back(image):
        with step("root filesystem (mkfs.ext4 -d)"):
            binds = closure_binds(staged, epoch)
            try:
                store = staged.root if spec.only_nix_store else staged.root / spec.store_dir.lstrip("/")
                stamped = populate(image, root.start, size.fs_size, staged.root, params, binds, scratch, epoch,
                                   staged.lazy_store, str(store))
            except NoSpace as exc:  # measured to fit: unless the store grew meanwhile
                refuse_changed_store(size.usage, str(exc))
                raise
    # The staging tree is read; removing it (a syscall per entry) overlaps debugfs on the other core.
    remover = threading.Thread(target=remove_tree_quietly, args=(staged.root,), name="remove staging", daemon=True)
    try:
        remover.start()
        started = True
    except RuntimeError:  # no thread can be started (builder/concurrent.py): the pipeline removes it afterwards
        started = False
    store_modes, store_xattrs = store_fixes(spec, size.usage.store_fixes, labels_hidden=stamped)
    try:
        # Before the rehash: debugfs finds each path it fixes in directories still linear, with the directory
        # library's hash of their names (libext2fs' own lookup scans a directory, indexed or not).
        with step("owners and times (debugfs)" if not stamped else "contents owners (debugfs)"):
            normalize(image, root.start, staged.owner_fixes, epoch, scratch, params, every_inode=not stamped,
                      modes=[*staged.mode_fixes, *store_modes], xattrs=store_xattrs)
        # Also the check of what mkfs and debugfs wrote: e2fsck -fyD's report must be a clean run's.
        with step("index directories (e2fsck -fyD)"):
            index_directories(image, root.start, params, epoch)
    finally:
        if started:
            remover.join()
    run_side_by_side(_checks(spec, image, plan, size.usage, size.inodes))
    return plan


def store_fixes(spec: Spec, fixes: Sequence[measure.StoreFix], labels_hidden: bool = False,
                ) -> tuple[list[ModeFix], list[tuple[str, str]]]:
    """The modes to set and extended attributes to remove, by image path, that give store files their NAR's metadata.

    mkfs.ext4 -d copies the mode and every extended attribute (llistxattr) of what it reads; Nix's store
    has 0444/0555 and none but the host's labels (measure.HOST_LABELS), which the stat shim hid from mkfs
    when labels_hidden and are removed here otherwise. One log line each for forged files and labelled ones.
    """
    modes: list[ModeFix] = []
    xattrs: list[tuple[str, str]] = []
    forged = [fix for fix in fixes if fix.forged]
    labelled = [fix for fix in fixes if fix.labels]
    for fix in fixes:
        image_path = fix.path[len(spec.store_dir):] if spec.only_nix_store else fix.path
        names = fix.xattrs if labels_hidden else fix.xattrs + fix.labels
        if (fix.forged or names) and "\n" in image_path:
            raise UserError(f"system.closureInfo: store file {fix.path!r} holds a newline in its name and needs its "
                            "metadata canonicalised, which cannot be done on it in the image")
        if fix.forged:
            modes.append(ModeFix(image_path, fix.mode))
        xattrs += [(image_path, name) for name in names]
    if forged:
        info(f"{len(forged)} store files not as Nix would have them (first: {forged[0].path!r}): given their NAR's "
             "modes" + (", other extended attributes dropped" if any(f.xattrs for f in forged) else ""))
    if labelled:
        labels = ", ".join(sorted({n for f in labelled for n in f.labels}))
        info(f"{len(labelled)} store files carry the build host's {labels}, which Nix leaves on them: "
             "left out of the image")
    return modes, xattrs


def _make_boot_filesystems(spec: Spec, image: Path, plan: layout.Layout) -> None:
    """The empty FAT partitions (ESP, XBOOTLDR, BOOT)."""
    for p in plan.partitions:
        if p.fs == "vfat":
            fat.make(image, p, spec.deterministic)


def refuse_changed_store(usage: measure.Usage, what: str) -> None:
    """Raise a BuildError naming the store paths that changed since they were measured, if any did."""
    changed = measure.changed_store_paths(usage.store_prints)
    if changed:
        shown = ", ".join(repr(p) for p in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise BuildError(f"the store changed while the image was being built: {shown} "
                         f"{'is' if len(changed) == 1 else 'are'} not as when measured for sizing (files grown, "
                         f"replaced, added or removed), so {what}; build again once the store is left alone")


def _checks(spec: Spec, image: Path, plan: layout.Layout, usage: measure.Usage,
            inodes: int = 0) -> list[tuple[str, Callable[[], None]]]:
    """The root ext4 clean (e2fsck -fn), auto sizing's free space reached, and each FAT partition clean."""
    root = plan.root

    def free_space() -> None:
        sb = superblock(f"{image}?offset={root.start}")
        free = int(sb["Free blocks"]) * measure.BLOCK
        info(f"root filesystem free: {human(free)}")
        if spec.disk_size is None and free < spec.additional_space:
            refuse_changed_store(usage, f"auto sizing left {human(free)} free, less than additionalSpace "
                                 f"{human(spec.additional_space)}")
            raise BuildError(f"auto sizing left {human(free)} free, less than additionalSpace "
                             f"{human(spec.additional_space)} (estimate too low; please report)")

    checks: list[tuple[str, Callable[[], None]]] = [
        ("check root filesystem (e2fsck)", partial(check, image, root.start, inodes)),
        ("root filesystem free space", free_space),
    ]
    checks += [(f"check {p.label} (fsck.vfat)", partial(fat.check, image, p)) for p in plan.partitions
               if p.fs == "vfat"]
    return checks


def prepare_root(spec: Spec, regs: list[store.Registration], image: Path, scratch: Path,
                 root_only: bool = False) -> layout.Layout:
    """Stage, size and write the image with its ext2/3/4 root made in place by mkfs -d; the layout written.

    root_only: image is the root filesystem alone (shareRootFilesystem), sized as every layout has it.
    """
    # Sizing the store starts now, in worker processes, and overlaps the staging.
    with measure.StoreMeasure([r.path for r in regs]) as store_usage:
        with step("stage root"):
            staged = stage_root(spec, regs, scratch / "root", lazy_store=userns_available())
        with step("size"):
            size = choose_size(spec, staged, scratch, store_usage)
    return write_image(spec, staged, size, image, scratch, layout.root_only(spec, size.fs_size) if root_only else None)
