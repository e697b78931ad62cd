"""What each root fsType allows: read-only ones only with onlyNixStore, vfat never, a UUID when deterministic.

Label byte limits per fsType live in spec.LABEL_MAX_BYTES.
"""

from __future__ import annotations

from typing import Any

READ_ONLY = ("erofs", "squashfs")
# The ext family, all made by mke2fs -d (nixpkgs runs mkfs.${fsType}, so ext2 and ext3 work with "none").
EXT_FAMILY = ("ext2", "ext3", "ext4")
# Filesystems whose UUID is fixed from rootFSUID when deterministic.
HAS_UUID = (*EXT_FAMILY, "btrfs", "xfs", "erofs")
WRITABLE_CHOICES = "ext4, btrfs or xfs"


def fs_type_problems(doc: dict[str, Any]) -> list[str]:
    """Cross-field problems of fsType with label, onlyNixStore and rootFSUID."""
    fs = doc["fsType"]
    problems: list[str] = []
    if fs == "vfat":
        return [
            "$.fsType: \"vfat\" is not allowed for the root filesystem: FAT has no owners, permission bits, "
            f"symlinks or hard links, which a Nix store and a NixOS root need (use {WRITABLE_CHOICES}; "
            "erofs or squashfs with onlyNixStore = true)"
        ]
    if fs in READ_ONLY and not doc["onlyNixStore"]:
        problems.append(
            f"$.fsType: {fs!r} is read-only and allowed only with onlyNixStore = true (a system root must be "
            f"writable for activation and the bootloader; use {WRITABLE_CHOICES})"
        )
    if fs in HAS_UUID and doc["deterministic"] and doc["rootFSUID"] is None:
        problems.append(
            f"$.rootFSUID: null is not allowed with deterministic = true and fsType = \"{fs}\" (give a UUID)"
        )
    return problems
