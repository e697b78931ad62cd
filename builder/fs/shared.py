"""shareRootFilesystem: the root filesystem built once, as its own file, and placed into each variant's disk.

With shareRootFilesystem = true the root filesystem's size never depends on the table or the format: with
diskSize = "auto" it comes from the contents alone (layout.shared_root_bytes), with a fixed diskSize it is the
root partition that size leaves. So `root-filesystem` builds it once (pipeline.build_root_filesystem), and
`prepare --root-filesystem` lays the disk out around it, places it (reflink or sparse copy) and makes the
boot partitions: the same bytes as prepare building that variant alone. Nix keys the shared build by what
the root filesystem is made from (nix/args rootFilesystemSpec), so equal keys are one derivation.
"""

from __future__ import annotations

from pathlib import Path

from .. import rules
from ..disk import layout
from ..errors import UserError
from ..log import info
from ..process import run
from ..spec import Spec
from ..units import MiB, human
from .placed import lay_out_around


def probe(path: Path) -> dict[str, str]:
    """What blkid reads from a filesystem image: TYPE, UUID, ... (empty when it finds none)."""
    res = run(["blkid", "-p", "-o", "export", str(path)], ok=(0, 2))
    if res.returncode == 2:  # nothing found
        return {}
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def expected_bytes(spec: Spec) -> int | None:
    """The size a shared root filesystem must have for this spec's layout; None when any whole-MiB size fits
    (diskSize = "auto": the disk is laid out around it)."""
    if spec.disk_size is None:
        return None
    return layout.root_bytes(spec, spec.disk_size)


def check_root_file(spec: Spec, path: Path) -> int:
    """Refuse a root filesystem file that is not this spec's (type, UUID, size for the layout); its size."""
    where = f"--root-filesystem {str(path)!r}"
    if not spec.share_root_filesystem:
        raise UserError(f"{where}: the spec does not have shareRootFilesystem = true; only then is the root "
                        "filesystem sized independently of the layout, so that a shared one fits")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"{where}: {exc.strerror}") from None
    found = probe(path)
    if found.get("TYPE") != spec.fs_type:
        raise UserError(f"{where} holds {found.get('TYPE') or 'no filesystem'}, not the spec's fsType "
                        f"{spec.fs_type!r}")
    if spec.root_fsuid is not None and "UUID" in found and found["UUID"].lower() != spec.root_fsuid:
        raise UserError(f"{where} has the UUID {found['UUID']}, not the spec's rootFSUID {spec.root_fsuid}")
    read_only = rules.fs_types()[spec.fs_type].read_only
    want = expected_bytes(spec)
    layout_words = (f"partitionTableType = {spec.partition_table_type!r}"
                    + ("" if spec.disk_size is None else f", diskSize = {spec.disk_size // MiB} MiB"))
    if size == 0 or size % layout.FS_BLOCK:
        raise UserError(f"{where} is {size} bytes, not a whole number of 4 KiB blocks: not a root filesystem "
                        "that `root-filesystem` built")
    if want is None and not read_only and size % MiB:
        raise UserError(f"{where} is {size} bytes, not a whole number of MiB, as shareRootFilesystem sizes a "
                        f"writable root with diskSize = \"auto\" ({layout_words})")
    if want is not None and (size > want if read_only else size != want):
        raise UserError(f"{where} is {size} bytes ({human(size)}), but the root partition of this layout "
                        f"({layout_words}) holds {want} bytes ({human(want)}): it was built for another layout "
                        "or diskSize; a root filesystem is shared only by variants whose root partitions are the "
                        "same size")
    return size


def place_root(spec: Spec, root_file: Path, image: Path) -> layout.Layout:
    """A sparse image laid out around the shared root filesystem: table, the root placed, empty FAT partitions."""
    size = check_root_file(spec, root_file)
    disk = spec.disk_size if spec.disk_size is not None else layout.smallest_disk(spec, size)
    plan = layout.plan(spec, disk)
    info(f"root filesystem {human(size)} from {root_file}; disk {human(disk)}")
    how = lay_out_around(spec, image, plan, root_file)
    info(f"root filesystem placed by {how}")
    return plan
