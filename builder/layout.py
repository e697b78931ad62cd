"""Partition layouts of DESIGN §3: where each partition lies, its type, flags, name, label and mount point."""

from __future__ import annotations

from dataclasses import dataclass

from .sizes import SECTOR, MiB
from .spec import Spec

GPT_BACKUP = 33 * SECTOR  # backup partition entries + header at the end of a GPT disk

# Fixed GUIDs nixpkgs uses when deterministic. nixpkgs' disk GUID string has only 11 hex digits in its
# last group (a typo sgdisk does not accept as written); we complete it with a final 0.
DISK_GUID = "97FD5997-D90B-4AA3-8D16-C1723AEA73C0"
PART1_GUID = "1C06F03B-704E-4657-B9CD-681A087A2FDC"
PART2_GUID = "970C694F-AFD0-4B99-B750-CDB7A329AB6F"
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


ROOT_NUMBER = {"legacy": 1, "legacy+boot": 2, "legacy+gpt": 2, "efi": 2, "efixbootldr": 3, "hybrid": 3, "none": None}


def table_kind(table_type: str) -> str | None:
    """msdos, gpt or None."""
    if table_type == "none":
        return None
    return "msdos" if table_type in ("legacy", "legacy+boot") else "gpt"


def root_start(spec: Spec) -> int:
    """Byte offset where the root filesystem begins."""
    return {
        "legacy": MiB,
        "legacy+gpt": 2 * MiB,
        "none": 0,
    }.get(spec.partition_table_type, spec.boot_size)


def tail_reserve(spec: Spec) -> int:
    """Bytes after the root partition that the table needs (the backup GPT)."""
    return GPT_BACKUP if table_kind(spec.partition_table_type) == "gpt" else 0


def root_end(spec: Spec, disk_size: int) -> int:
    """Byte offset where the root partition ends for a disk of this size."""
    if spec.partition_table_type == "none":
        return disk_size
    return disk_size - tail_reserve(spec)


def plan(spec: Spec, disk_size: int) -> Layout:
    """The layout of DESIGN §3 for this spec on a disk of disk_size bytes (a multiple of 1 MiB)."""
    t = spec.partition_table_type
    det = spec.deterministic
    gpt = table_kind(t) == "gpt"
    boot = spec.boot_size
    start, end = root_start(spec), root_end(spec, disk_size)

    def part(number: int, role: str, s: int, e: int, name: str, flags: tuple[str, ...], fs: str | None,
             label: str | None, mnt: str | None) -> Partition:
        guid = None
        if det and gpt:
            guid = spec.root_gpuid if role == "root" else {1: PART1_GUID, 2: PART2_GUID}[number]
        return Partition(number, role, s, e, name if gpt else "", flags, fs, label, mnt, guid)

    root_num = ROOT_NUMBER[t]
    root_name = "ROOT" if t == "efixbootldr" else "primary"
    parts: list[Partition] = []
    if t == "legacy+boot":
        parts.append(part(1, "boot", MiB, boot, "", ("boot",), "vfat", "BOOT", "/boot"))
    elif t == "legacy+gpt":
        parts.append(part(1, "bios_grub", MiB, 2 * MiB, "no-fs", ("bios_grub",), None, None, None))
    elif t == "efi":
        parts.append(part(1, "esp", 8 * MiB, boot, "ESP", ("boot", "esp"), "vfat", "ESP", "/boot"))
    elif t == "efixbootldr":
        parts.append(part(1, "esp", 8 * MiB, 100 * MiB, "ESP", ("boot", "esp"), "vfat", "ESP", "/efi"))
        parts.append(part(2, "xbootldr", 100 * MiB, boot, "BOOT", ("bls_boot",), "vfat", "BOOT", "/boot"))
    elif t == "hybrid":
        parts.append(part(1, "esp", 8 * MiB, boot, "ESP", ("boot", "esp"), "vfat", "ESP", "/boot"))
        parts.append(part(2, "bios_grub", 34 * SECTOR, MiB, "no-fs", ("bios_grub",), None, None, None))
    parts.append(Partition(
        number=root_num or 0, role="root", start=start, end=end,
        name=root_name if gpt else "", flags=(), fs=spec.fs_type, label=spec.label, mountpoint="/",
        guid=spec.root_gpuid if (det and gpt) else None,
    ))
    kind = table_kind(t)
    return Layout(
        table=kind,
        disk_size=disk_size,
        partitions=tuple(sorted(parts, key=lambda p: p.number)),
        disk_guid=DISK_GUID if (det and kind == "gpt") else None,
        mbr_id=MBR_DISK_ID if (det and kind == "msdos") else None,
    )
