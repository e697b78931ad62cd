"""The spec's `bootLoader.grub` section: GRUB's options, as the Nix side (nix/grub.nix) reads them from the system.

Kept apart from builder/boot/grub.py (which writes the files and the boot code) so that builder/spec.py can load
and check the section without importing the layout code. The options are those nixpkgs' grub.nix hands
install-grub.pl in its XML (`grubConfig`): the BIOS package (`grub`, null without BIOS devices) and the EFI
package (`grubEfi`, null without efiSupport), `timeout`, `default`, `extraConfig`, `extraEntries`,
`extraEntriesBeforeNixOS`, `extraPerEntryConfig`, `splashImage`, `configurationLimit`, `fsIdentifier`,
`gfxmodeEfi`, `gfxmodeBios`, `bootloaderId`, `efiSysMountPoint`, `fullName`, `fullVersion`, the devices
(bootLoader.grubDevices), plus `efiInstallAsRemovable` and `mkimage`: a grub-mkimage the build machine runs
(GRUB's images are data: any grub-mkimage of the same version builds them from the target's module directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import rules

# GRUB's platform directories (lib/grub/<platform>) by the system's architecture, with the EFI names.
EFI_PLATFORMS = {"x86_64-linux": ("x86_64-efi", "x64"), "aarch64-linux": ("arm64-efi", "aa64")}
BIOS_PLATFORM = "i386-pc"
BIOS_SYSTEMS = ("x86_64-linux", "i686-linux")


@dataclass(frozen=True)
class GrubConfig:
    """GRUB's options for an install by prepare (no build VM)."""

    bios_package: str | None  # config.boot.loader.grub's package, with lib/grub/i386-pc; None: no BIOS devices
    efi_package: str | None  # its EFI variant, with lib/grub/<arch>-efi; None: efiSupport = false
    mkimage: str  # a grub-mkimage the build machine runs
    system: str  # the configuration's platform (x86_64-linux, aarch64-linux)
    full_name: str
    full_version: str
    timeout: int
    default: int
    extra_config: str
    extra_entries: str
    extra_entries_before_nixos: bool
    extra_per_entry_config: str
    splash_image: str | None
    configuration_limit: int
    fs_identifier: str  # "uuid" or "label"
    gfxmode_efi: str
    gfxmode_bios: str
    bootloader_id: str
    efi_sys_mount_point: str
    efi_install_as_removable: bool

    @property
    def efi_target(self) -> str:
        """install-grub.pl's getEfiTarget: "no", "only" or "both" (the state file's third line)."""
        if self.efi_package is None:
            return "no"
        return "both" if self.bios_package is not None else "only"


def parse_grub(section: dict[str, Any] | None) -> GrubConfig | None:
    """The section (already checked by the schema and grub_problems) as a typed value."""
    if section is None:
        return None
    return GrubConfig(
        bios_package=section["biosPackage"], efi_package=section["efiPackage"], mkimage=section["mkimage"],
        system=section["system"], full_name=section["fullName"], full_version=section["fullVersion"],
        timeout=section["timeout"], default=section["default"], extra_config=section["extraConfig"],
        extra_entries=section["extraEntries"], extra_entries_before_nixos=section["extraEntriesBeforeNixOS"],
        extra_per_entry_config=section["extraPerEntryConfig"], splash_image=section["splashImage"],
        configuration_limit=section["configurationLimit"], fs_identifier=section["fsIdentifier"],
        gfxmode_efi=section["gfxmodeEfi"], gfxmode_bios=section["gfxmodeBios"],
        bootloader_id=section["bootloaderId"], efi_sys_mount_point=section["efiSysMountPoint"],
        efi_install_as_removable=section["efiInstallAsRemovable"],
    )


def grub_problems(doc: dict[str, Any]) -> list[str]:
    """What the schema cannot say about bootLoader.grub: the layout must hold what the options ask for."""
    section = doc["bootLoader"].get("grub")
    if section is None:
        return []
    where = "$.bootLoader.grub"
    problems: list[str] = []
    if section["biosPackage"] is None and section["efiPackage"] is None:
        problems.append(f"{where}: biosPackage and efiPackage are both null (GRUB needs BIOS devices or efiSupport)")
    if section["biosPackage"] is not None and section["system"] not in BIOS_SYSTEMS:
        problems.append(f"{where}.system: {json.dumps(section['system'])} cannot boot GRUB's {BIOS_PLATFORM} "
                        f"(only {', '.join(BIOS_SYSTEMS)})")
    if section["efiPackage"] is not None and section["system"] not in EFI_PLATFORMS:
        problems.append(f"{where}.system: {json.dumps(section['system'])} has no GRUB EFI platform here "
                        f"(one of {', '.join(EFI_PLATFORMS)})")
    if not doc["installBootLoader"] or doc["onlyNixStore"]:
        return problems
    table = doc["partitionTableType"]
    t = rules.tables()[table]
    devices = [d for d in doc["bootLoader"]["grubDevices"] if d != "nodev"]
    if section["biosPackage"] is not None:
        if not devices:
            problems.append(f"{where}.biosPackage: given, but bootLoader.grubDevices names no disk")
        if table not in ("legacy", "legacy+gpt", "hybrid"):
            problems.append(f"{where}.biosPackage: GRUB for BIOS is installed without the VM only with "
                            f"partitionTableType \"legacy\", \"legacy+gpt\" or \"hybrid\", not {table!r}")
    if section["efiPackage"] is not None:
        if t.esp_mount_point != "/boot" or t.xbootldr_mount_point is not None:
            problems.append(f"{where}.efiPackage: GRUB for EFI is installed without the VM only with "
                            f"partitionTableType \"efi\" or \"hybrid\" (the ESP at /boot), not {table!r}")
        elif section["efiSysMountPoint"] != "/boot":
            problems.append(f"{where}.efiSysMountPoint: {json.dumps(section['efiSysMountPoint'])} is not where "
                            f"partitionTableType = {table!r} mounts the ESP (/boot)")
    if t.esp_mount_point is None and table in ("legacy", "legacy+gpt"):
        # /boot/grub lies on the root, written into it before mkfs: GRUB's core reads it with its ext2 module,
        # and grub.cfg names the root by the UUID it will have.
        if rules.fs_types()[doc["fsType"]].family != "ext":
            problems.append(f"{where}: fsType = {doc['fsType']!r} is not supported by the no-VM GRUB install with "
                            f"partitionTableType = {table!r} (/boot on the root: ext2, ext3 or ext4)")
        if doc.get("shareRootFilesystem", False):
            problems.append(f"{where}: shareRootFilesystem = true is not supported by the no-VM GRUB install with "
                            f"partitionTableType = {table!r} (/boot/grub is part of the root filesystem)")
        if not doc["deterministic"] or doc["rootFSUID"] is None:
            problems.append(f"{where}: the no-VM GRUB install with partitionTableType = {table!r} needs the root's "
                            "UUID before mkfs (deterministic = true and a rootFSUID)")
    if doc["bootLoader"].get("systemdBoot") is not None:
        problems.append(f"{where}: given together with bootLoader.systemdBoot (a system boots with one of them)")
    return problems
