"""Partition layouts as nixpkgs' make-disk-image.nix makes them: where each partition lies, its type, flags,
name, label and mount point (the table facts come from builder/rules.json)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import rules
from ..spec import Spec
from ..units import SECTOR, MiB, align_up

GPT_BACKUP = 33 * SECTOR  # backup partition entries + header at the end of a GPT disk
GPT_FIRST_USABLE = 34  # LBA: protective MBR, header and 32 sectors of entries come first
ALIGN = MiB  # parted's optimal alignment on an image file (no I/O topology): 1 MiB
FS_BLOCK = 4096  # every root filesystem is a whole number of these
# nixpkgs' parted scripts: efixbootldr's ESP `8MiB 100MiB` and legacy+gpt's bios_grub `1MB 2MB` start here; the
# other starts and ends are the tables' bootStartMiB and rootStartMiB in builder/rules.json.
ESP_START = 8 * MiB
BIOS_GRUB_START = MiB

# The GUIDs nixos/lib/make-disk-image.nix (nixpkgs) gives sgdisk when deterministic. Its disk GUID,
# "97FD5997-D90B-4AA3-8D16-C1723AEA73C", has only 11 hex digits in the last group. sgdisk (gptfdisk's
# GUIDData::operator=) reads a string shorter than 36 characters as 32 hex digits WITHOUT dashes, two
# characters per byte at fixed places, dashes and all: "-D" reads as -13 (0xF3), "6-" as 6, and so on.
# What it writes, and so what upstream images carry, is this:
DISK_GUID = "97FD5997-F390-0B4A-A3F8-D106C1723AEA"
PART1_GUID = "1C06F03B-704E-4657-B9CD-681A087A2FDC"
PART2_GUID = "970C694F-AFD0-4B99-B750-CDB7A329AB6F"
# nixpkgs leaves the MBR disk id to parted (random). We pin one when deterministic, for bit-for-bit rebuilds.
MBR_DISK_ID = 0x97FD5997

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_GRUB_TYPE = "21686148-6449-6E6F-744E-656564454649"
XBOOTLDR_TYPE = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@dataclass(frozen=True)
class Partition:
    """One partition: byte range [start, end), parted flags, GPT name, filesystem and where it mounts."""

    number: int
    role: str  # root, esp, xbootldr, boot (legacy+boot FAT), bios_grub
    start: int
    end: int
    name: str
    flags: tuple[str, ...]
    fs: str | None
    label: str | None
    mountpoint: str | None
    guid: str | None

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """The whole disk: table kind (msdos, gpt or None for a bare filesystem), size and partitions."""

    table: str | None
    disk_size: int
    partitions: tuple[Partition, ...]
    disk_guid: str | None
    mbr_id: int | None

    @property
    def root(self) -> Partition:
        """The root filesystem's partition (for `none`, the whole file)."""
        return next(p for p in self.partitions if p.role == "root")

    def by_role(self, role: str) -> Partition | None:
        """The partition with that role, if the layout has one."""
        return next((p for p in self.partitions if p.role == role), None)


@dataclass(frozen=True)
class Mount:
    """What the VM stage mounts: a partition (None: the whole disk, no table), its filesystem and mount point."""

    number: int | None
    fs: str
    mountpoint: str


def table_kind(table_type: str) -> str | None:
    """msdos, gpt or None."""
    return rules.tables()[table_type].label


def root_start(spec: Spec) -> int:
    """Byte offset where the root filesystem begins: fixed for the table, or where the boot partition ends."""
    start = rules.tables()[spec.partition_table_type].root_start
    return spec.boot_partition_end if start is None else start


def tail_reserve(spec: Spec) -> int:
    """The most bytes the table leaves after the root partition, on any disk size (see root_end)."""
    return ALIGN if table_kind(spec.partition_table_type) == "gpt" else 0


def parted_fill_end(disk_size: int, start: int, gpt: bool) -> int:
    """Where `parted --script IMG -- mkpart ... START 100%` ends a partition (exclusive byte offset).

    nixos/lib/make-disk-image.nix (nixpkgs) ends every root partition at "100%". parted reads a percentage
    with a fuzz of half a percent (ped_unit_parse_custom: radius = ceil(disk/100 in sectors)/2 - 1 around
    the sector 100% names) and, under its default optimal alignment, picks the end nearest to it within
    that range whose next sector is 1 MiB aligned and that the label can hold. msdos can hold the last
    sector, so the partition reaches the disk's end. GPT keeps its backup in the last 33 sectors, so on a
    disk of more than about 200 MiB the root ends 1 MiB before the disk does; on a smaller one the aligned
    end is outside the fuzz and parted falls back to no alignment: the last usable sector.
    """
    length = disk_size // SECTOR
    unit = length * SECTOR // 100  # bytes of one percent, as libparted computes it
    radius = max(-(-unit // SECTOR) // 2 - 1, 0)
    lowest = 100 * unit // SECTOR - radius
    last = length - GPT_FIRST_USABLE if gpt else length - 1
    aligned = (last + 1) // (ALIGN // SECTOR) * (ALIGN // SECTOR) - 1
    end = aligned if aligned >= lowest and aligned * SECTOR >= start else last
    return (end + 1) * SECTOR


def root_end(spec: Spec, disk_size: int) -> int:
    """Byte offset where the root partition ends for a disk of this size (parted's "100%", see parted_fill_end)."""
    kind = table_kind(spec.partition_table_type)
    if kind is None:
        return disk_size
    return parted_fill_end(disk_size, root_start(spec), kind == "gpt")


def root_bytes(spec: Spec, disk_size: int) -> int:
    """The root filesystem size a disk of disk_size leaves: its root partition, floored to whole 4 KiB blocks."""
    return (root_end(spec, disk_size) - root_start(spec)) // FS_BLOCK * FS_BLOCK


def shared_root_bytes(needed: int) -> int:
    """The size of a root filesystem that needs `needed` bytes, under shareRootFilesystem with diskSize = "auto".

    Whole MiB, from the contents alone: exactly what the root partition of the smallest disk holds on an
    msdos table or none, and on GPT disks over about 200 MiB (see parted_fill_end); on smaller GPT disks the
    partition ends up to 1 MiB past it. The same bytes then fit every layout.
    """
    return align_up(needed, MiB)


def smallest_disk(spec: Spec, fs_bytes: int) -> int:
    """The smallest disk (whole MiB) whose root partition, as root_end places it, holds fs_bytes."""
    disk = align_up(root_start(spec) + fs_bytes, MiB)
    while root_end(spec, disk) - root_start(spec) < fs_bytes:
        disk += MiB
    return disk


def _boot_partitions(spec: Spec) -> list[Partition]:
    """The partitions other than the root, as nixpkgs' parted script makes them for the table type."""
    t = spec.partition_table_type
    gpt = table_kind(t) == "gpt"
    boot = spec.boot_partition_end
    # Where the partition ending at bootSize starts, and where a fixed root starts (builder/rules.json).
    boot_start, root_fixed = rules.tables()[t].boot_start, rules.tables()[t].root_start

    def part(number: int, role: str, s: int, e: int, name: str, flags: tuple[str, ...], fs: str | None,
             label: str | None, mnt: str | None) -> Partition:
        guid = {1: PART1_GUID, 2: PART2_GUID}[number] if spec.deterministic and gpt else None
        return Partition(number, role, s, e, name if gpt else "", flags, fs, label, mnt, guid)

    if t == "legacy+boot":
        assert boot_start is not None
        return [part(1, "boot", boot_start, boot, "", ("boot",), "vfat", "BOOT", "/boot")]
    if t == "legacy+gpt":
        assert root_fixed is not None
        return [part(1, "bios_grub", BIOS_GRUB_START, root_fixed, "no-fs", ("bios_grub",), None, None, None)]
    if t == "efi":
        assert boot_start is not None
        return [part(1, "esp", boot_start, boot, "ESP", ("boot", "esp"), "vfat", "ESP", "/boot")]
    if t == "efixbootldr":  # the ESP ends where XBOOTLDR, the partition ending at bootSize, starts
        assert boot_start is not None
        return [part(1, "esp", ESP_START, boot_start, "ESP", ("boot", "esp"), "vfat", "ESP", "/efi"),
                part(2, "xbootldr", boot_start, boot, "BOOT", ("bls_boot",), "vfat", "BOOT", "/boot")]
    if t == "hybrid":
        assert boot_start is not None
        # nixpkgs' `mkpart no-fs 0 1024KiB`: "0" is in parted's default unit (MB, fuzz ±0.5 MB), so the start
        # falls to the first usable sector, 34; and "1024KiB" keeps its last sector, 2048, because parted
        # takes one sector off an IEC end only for "[kMGTPEZY]iB" (parted.c _string_ends_with_iec_unit):
        # "KiB", with a capital K, is not one of them. So it ends 1 MiB + 1 sector in, not at 1 MiB.
        return [part(1, "esp", boot_start, boot, "ESP", ("boot", "esp"), "vfat", "ESP", "/boot"),
                part(2, "bios_grub", GPT_FIRST_USABLE * SECTOR, MiB + SECTOR, "no-fs", ("bios_grub",),
                     None, None, None)]
    return []


def plan(spec: Spec, disk_size: int) -> Layout:
    """The layout nixpkgs' parted script makes for this spec on a disk of disk_size bytes (whole MiB)."""
    t = spec.partition_table_type
    kind = table_kind(t)
    det, gpt = spec.deterministic, kind == "gpt"
    root = Partition(
        number=rules.tables()[t].root_partition or 0, role="root", start=root_start(spec),
        end=root_end(spec, disk_size), name=("ROOT" if t == "efixbootldr" else "primary") if gpt else "",
        flags=(), fs=spec.fs_type, label=spec.label, mountpoint="/",
        guid=spec.root_gpuid if (det and gpt) else None,
    )
    return Layout(
        table=kind,
        disk_size=disk_size,
        partitions=tuple(sorted([*_boot_partitions(spec), root], key=lambda p: p.number)),
        disk_guid=DISK_GUID if (det and kind == "gpt") else None,
        mbr_id=MBR_DISK_ID if (det and kind == "msdos") else None,
    )


def root_only(spec: Spec, fs_bytes: int) -> Layout:
    """A root filesystem built as its own file (shareRootFilesystem): no table, the whole file is the root."""
    root = Partition(number=0, role="root", start=0, end=fs_bytes, name="", flags=(), fs=spec.fs_type,
                     label=spec.label, mountpoint="/", guid=None)
    return Layout(table=None, disk_size=fs_bytes, partitions=(root,), disk_guid=None, mbr_id=None)


def mounts(spec: Spec) -> tuple[Mount, ...]:
    """What the VM stage mounts, in order: the root, then the FAT partitions, shallower mount points first.

    Only partition numbers, filesystems and mount points: no disk size is needed.
    """
    fat = [Mount(p.number, p.fs, p.mountpoint) for p in _boot_partitions(spec) if p.fs == "vfat" and p.mountpoint]
    root = Mount(rules.tables()[spec.partition_table_type].root_partition, spec.fs_type, "/")
    return (root, *sorted(fat, key=lambda m: m.mountpoint.count("/")))
