"""Root filesystems other than ext4: build each as its own file, size it, place it into its partition, check it.

ext4 is made in place at its offset (builder/fs/ext.py, the pipeline's own path). Every other fsType goes
through here: btrfs and xfs (writable; sized from the measured tree + additionalSpace, grown and rebuilt
if mkfs runs out of space or leaves too little free), erofs and squashfs (read-only; onlyNixStore only,
their size is what mkfs wrote). The finished file is copied into the partition sparse-aware.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from .. import rules
from ..disk import layout, table
from ..disk.sparse import place
from ..errors import UserError
from ..log import info, step
from ..sandbox.namespace import userns_available
from ..spec import Spec
from ..staging import measure
from ..staging.root import StagedRoot, closure_binds
from ..units import MiB, align_up, human
from . import btrfs, erofs, fat, squashfs, xfs
from .build import NoSpace, RootBuild

WRITABLE: dict[str, tuple[Callable[[int, int, int], int], Callable[[RootBuild, Path, int], None],
                          Callable[[Path], int], Callable[[Path], None], str]] = {
    "btrfs": (btrfs.needed_bytes, btrfs.make, btrfs.free_bytes, btrfs.check, "mkfs.btrfs --rootdir"),
    "xfs": (xfs.needed_bytes, xfs.make, xfs.free_bytes, xfs.check, "mkfs.xfs -p"),
}
READ_ONLY_MAKERS: dict[str, tuple[Callable[[RootBuild, Path], None], Callable[[Path], None], str]] = {
    "erofs": (erofs.make, erofs.check, "mkfs.erofs"),
    "squashfs": (squashfs.make, squashfs.check, "mksquashfs"),
}
MAX_ATTEMPTS = 8


def _root_bytes(spec: Spec, disk_size: int) -> int:
    """Bytes of the root partition on a disk of disk_size, floored to 4 KiB."""
    return layout.root_bytes(spec, disk_size)


def _disk_for(spec: Spec, fs_bytes: int) -> int:
    """The smallest disk (whole MiB) whose root partition holds fs_bytes."""
    return align_up(fs_bytes + layout.root_start(spec) + layout.tail_reserve(spec), MiB)


def _binds(staged: StagedRoot, epoch: int) -> tuple[tuple[str, str], ...]:
    """The store binds, or none after copying the closure in when user namespaces are unavailable."""
    if userns_available() or not staged.store_binds:
        return staged.store_binds
    return tuple(closure_binds(staged, epoch))


def refuse_store_fixes(spec: Spec, usage: measure.Usage) -> None:
    """Refuse store files whose metadata is not their NAR's (measure.StoreFix): only the ext writer sets it right."""
    labelled = [f for f in usage.store_fixes if f.labels]
    if labelled and spec.fs_type == "btrfs":  # mkfs.btrfs --rootdir copies every attribute and cannot be told not to
        raise UserError(f"system.closureInfo: store file {labelled[0].path!r} (and {len(labelled) - 1} more) carries "
                        f"the build host's {', '.join(labelled[0].labels)}, which Nix leaves on store files but "
                        "mkfs.btrfs --rootdir would copy into the image; use fsType = \"ext4\" or \"xfs\" on this host")
    for fix in [f for f in usage.store_fixes if f.forged][:1]:
        what = ([f"mode {stat.S_IMODE(os.lstat(fix.path).st_mode):04o} (Nix gives {stat.S_IMODE(fix.mode):04o})"]
                if os.lstat(fix.path).st_mode != fix.mode else [])
        what += [f"extended attributes {', '.join(fix.xattrs)} (a Nix store has none)"] if fix.xattrs else []
        raise UserError(f"system.closureInfo: store file {fix.path!r} has {' and '.join(what)}: not what Nix's store "
                        f"holds, so the store is damaged or forged; fsType = \"{spec.fs_type}\" cannot canonicalise it "
                        "(ext4 does)")


def _build_writable(spec: Spec, build: RootBuild, fs_file: Path, usage: measure.Usage) -> tuple[int, int]:
    """Make a btrfs/xfs that fits (fixed diskSize) or leaves additionalSpace free (auto); return (disk, free)."""
    needed, make, free_of, _, tool = WRITABLE[spec.fs_type]
    data = usage.blocks * measure.BLOCK
    if spec.fs_type == "xfs":
        data = max(data, xfs.protofile(build)[2])  # hard links become copies in xfs
    if spec.disk_size is not None:
        size = _root_bytes(spec, spec.disk_size)
        minimum = needed(data, usage.inodes, 0)
        try:
            if size < (xfs.MIN_BYTES if spec.fs_type == "xfs" else btrfs.MIN_BYTES):
                raise NoSpace("below the minimum size")
            with step(f"root filesystem ({tool})"):
                make(build, fs_file, size)
            _refuse_grown(fs_file, size)
        except NoSpace:
            raise UserError(f"diskSize = {spec.disk_size // MiB} MiB is too small for fsType = \"{spec.fs_type}\": "
                            f"the root filesystem needs about {human(minimum)}; use diskSize >= "
                            f"{_disk_for(spec, minimum) // MiB} or \"auto\"") from None
        return spec.disk_size, free_of(fs_file)
    want = needed(data, usage.inodes, spec.additional_space)
    for _ in range(MAX_ATTEMPTS):
        if spec.share_root_filesystem:  # from the tree alone, the same for every layout (builder/fs/shared.py)
            size = layout.shared_root_bytes(want)
            disk = layout.smallest_disk(spec, size)
        else:
            disk = _disk_for(spec, want)
            size = _root_bytes(spec, disk)
        try:
            with step(f"root filesystem ({tool}, {human(size)})"):
                make(build, fs_file, size)
        except NoSpace:
            want = align_up(int(want * 1.4), MiB)
            continue
        grown = fs_file.stat().st_size
        if grown > size:  # mkfs.btrfs --rootdir extends a file that is too small instead of failing
            want = align_up(grown + spec.additional_space + 16 * MiB, MiB)
            continue
        free = free_of(fs_file)
        if free >= spec.additional_space:
            return disk, free
        want = align_up(want + spec.additional_space - free + 16 * MiB, MiB)
    raise UserError(f"could not size the {spec.fs_type} root: mkfs kept running out of space (last try "
                    f"{human(want)}); give diskSize explicitly")


def _refuse_grown(fs_file: Path, size: int) -> None:
    """A filesystem file mkfs grew beyond its partition does not fit (fixed diskSize)."""
    if fs_file.stat().st_size > size:
        raise NoSpace(f"needs {fs_file.stat().st_size} bytes")


def _build_read_only(spec: Spec, build: RootBuild, fs_file: Path) -> int:
    """Make an erofs/squashfs (its own size) and return the disk size that holds it."""
    make, _, tool = READ_ONLY_MAKERS[spec.fs_type]
    with step(f"root filesystem ({tool})"):
        make(build, fs_file)
    fs_bytes = align_up(fs_file.stat().st_size, 4096)
    if spec.additional_space:
        info(f"additionalSpace is not used: {spec.fs_type} is read-only")
    if spec.disk_size is None:
        # shareRootFilesystem places the file with builder/fs/shared.py, which takes the smallest disk.
        return layout.smallest_disk(spec, fs_bytes) if spec.share_root_filesystem else _disk_for(spec, fs_bytes)
    if _root_bytes(spec, spec.disk_size) < fs_bytes:
        raise UserError(f"diskSize = {spec.disk_size // MiB} MiB is too small: the {spec.fs_type} root is "
                        f"{human(fs_bytes)}; use diskSize >= {_disk_for(spec, fs_bytes) // MiB} or \"auto\"")
    return spec.disk_size


def prepare_root(spec: Spec, staged: StagedRoot, image: Path, scratch: Path, root_only: bool = False) -> layout.Layout:
    """Build the non-ext4 root as its own file, then the disk: table, root placed at its offset, FAT partitions.

    root_only: image is the root filesystem alone (shareRootFilesystem), a whole number of 4 KiB blocks.
    """
    epoch = spec.source_date_epoch
    # Measured from the store itself (before a copy of it is made when namespaces are unavailable).
    usage = measure.measure(staged.root, {dest: src for src, dest in staged.store_binds})
    refuse_store_fixes(spec, usage)
    build = RootBuild(
        root=staged.root, binds=_binds(staged, epoch), owner_fixes=staged.owner_fixes, mode_fixes=staged.mode_fixes,
        label=spec.label, uuid=spec.root_fsuid, epoch=epoch if spec.deterministic else None, source_date_epoch=epoch,
        scratch=scratch,
    )
    fs_file = scratch / f"root.{spec.fs_type}"
    try:
        if rules.fs_types()[spec.fs_type].read_only:
            disk = _build_read_only(spec, build, fs_file)
            check = READ_ONLY_MAKERS[spec.fs_type][1]
        else:
            disk, free = _build_writable(spec, build, fs_file, usage)
            check = WRITABLE[spec.fs_type][3]
            info(f"root filesystem free: {human(free)}")
        with step(f"check root filesystem ({spec.fs_type})"):
            check(fs_file)
        plan = (layout.root_only(spec, align_up(fs_file.stat().st_size, layout.FS_BLOCK)) if root_only
                else layout.plan(spec, disk))
        info(f"root {spec.fs_type} {human(fs_file.stat().st_size)}; disk {human(plan.disk_size)}")
        lay_out_around(spec, image, plan, fs_file)
    finally:
        fs_file.unlink(missing_ok=True)
    return plan


def lay_out_around(spec: Spec, image: Path, plan: layout.Layout, root_file: Path) -> str:
    """image as plan's sparse disk: its partition table, root_file placed in the root partition, the empty FAT
    partitions made and checked. How root_file was placed (builder/disk/sparse.py's place)."""
    with open(image, "wb") as f:
        f.truncate(plan.disk_size)
    with step("partition table"):
        table.write_table(image, plan)
    with step("place root filesystem"):
        how = place(root_file, image, plan.root.start, plan.root.size)
    with step("boot filesystems"):
        for p in plan.partitions:
            if p.fs == "vfat" and p.role != "root":
                fat.make(image, p, spec.deterministic)
                fat.check(image, p)
    return how
