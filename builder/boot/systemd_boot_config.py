"""The spec's `bootLoader.systemdBoot` section: systemd-boot's options, as the Nix side reads them from the system.

Kept apart from builder/boot/systemd_boot.py (which writes the files) so that builder/spec.py can load and check the
section without importing the layout and FAT code. The options are those nixpkgs' systemd-boot.nix hands
its builder (systemd-boot-builder.py): `boot.loader.timeout` (null is `menu-force`), `editor`,
`consoleMode`, `rebootForBitlocker`, `extraFiles`, `extraEntries`, `boot.loader.efi.efiSysMountPoint`,
`xbootldrMountPoint`, `config.system.nixos.distroName`; and the systemd-boot EFI binary of the system's
own systemd package (`lib/systemd/boot/efi/systemd-boot<efiArch>.efi`), which `bootctl install` copies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .. import rules

# bootctl's names for the EFI architectures (get_efi_arch), with the PE machine types of their binaries.
EFI_ARCH_MACHINES = {
    "x64": (0x8664,), "ia32": (0x14C,), "aa64": (0xAA64,), "arm": (0x1C2, 0x1C4), "riscv64": (0x5064,),
    "loongarch64": (0x6264,),
}
EFI_BINARY_NAME = re.compile(r"systemd-boot(" + "|".join(EFI_ARCH_MACHINES) + r")\.efi")


@dataclass(frozen=True)
class SystemdBootConfig:
    """systemd-boot's options for an install by prepare (no build VM)."""

    efi_binary: str  # .../lib/systemd/boot/efi/systemd-boot<arch>.efi of the system's systemd
    efi_sys_mount_point: str
    xbootldr_mount_point: str | None
    distro_name: str
    timeout: int | str  # seconds, or "menu-force" (boot.loader.timeout = null)
    editor: bool
    console_mode: str
    reboot_for_bitlocker: bool
    extra_files: tuple[tuple[str, str], ...]  # ($BOOT-relative name, source), sorted
    extra_entries: tuple[tuple[str, str], ...]  # (file name in $BOOT/loader/entries, text), sorted

    @property
    def efi_arch(self) -> str:
        """The EFI architecture name the binary's file name carries (x64, aa64, ...)."""
        match = EFI_BINARY_NAME.fullmatch(self.efi_binary.rsplit("/", 1)[-1])
        assert match is not None, "checked by systemd_boot_problems"
        return match.group(1)


def parse_systemd_boot(section: dict[str, Any] | None) -> SystemdBootConfig | None:
    """The section (already checked by the schema and systemd_boot_problems) as a typed value."""
    if section is None:
        return None
    return SystemdBootConfig(
        efi_binary=section["efiBinary"],
        efi_sys_mount_point=section["efiSysMountPoint"],
        xbootldr_mount_point=section["xbootldrMountPoint"],
        distro_name=section["distroName"],
        timeout=section["timeout"],
        editor=section["editor"],
        console_mode=section["consoleMode"],
        reboot_for_bitlocker=section["rebootForBitlocker"],
        extra_files=tuple(sorted(section["extraFiles"].items())),
        extra_entries=tuple(sorted(section["extraEntries"].items())),
    )


def systemd_boot_problems(doc: dict[str, Any]) -> list[str]:
    """What the schema cannot say about bootLoader.systemdBoot: the layout's mount points, file names.

    The extraFiles and extraEntries rules are the assertions of nixpkgs' systemd-boot.nix.
    """
    section = doc["bootLoader"].get("systemdBoot")
    if section is None:
        return []
    where = "$.bootLoader.systemdBoot"
    problems: list[str] = []
    name = section["efiBinary"].rsplit("/", 1)[-1]
    if not EFI_BINARY_NAME.fullmatch(name):
        problems.append(f"{where}.efiBinary: {json.dumps(section['efiBinary'])} is not a systemd-boot EFI binary "
                        f"(its name must be systemd-boot<arch>.efi, arch one of {', '.join(EFI_ARCH_MACHINES)})")
    table = doc["partitionTableType"]
    # Where each layout mounts its FAT partitions in nixpkgs' make-disk-image.nix (builder/rules.json).
    with_esp = [name for name, t in rules.tables().items() if t.esp_mount_point is not None]
    if doc["installBootLoader"] and not doc["onlyNixStore"]:
        esp, xbootldr = rules.tables()[table].esp_mount_point, rules.tables()[table].xbootldr_mount_point
        if esp is None:
            problems.append(f"{where}: systemd-boot needs an EFI system partition, which partitionTableType = "
                            f"{table!r} does not have (use one of {', '.join(with_esp)})")
        else:
            if section["efiSysMountPoint"] != esp:
                problems.append(f"{where}.efiSysMountPoint: {json.dumps(section['efiSysMountPoint'])} is not where "
                                f"partitionTableType = {table!r} mounts the ESP ({esp}; set "
                                f"boot.loader.efi.efiSysMountPoint = \"{esp}\")")
            if section["xbootldrMountPoint"] != xbootldr:
                want = "null" if xbootldr is None else f'"{xbootldr}"'
                problems.append(f"{where}.xbootldrMountPoint: {json.dumps(section['xbootldrMountPoint'])} does not "
                                f"match partitionTableType = {table!r} (boot.loader.systemd-boot.xbootldrMountPoint "
                                f"must be {want})")
    for target in section["extraFiles"]:
        parts = target.split("/")
        if target.startswith("/") or ".." in parts or "nixos/.extra-files" in target.lower() or "" in parts:
            problems.append(f"{where}.extraFiles: {json.dumps(target)} is not allowed (a relative path inside $BOOT, "
                            "no '..', not under EFI/nixos/.extra-files)")
    for entry in section["extraEntries"]:
        if "/" in entry or not entry.endswith(".conf") or entry.startswith("."):
            problems.append(f"{where}.extraEntries: {json.dumps(entry)} is not allowed (a file name ending in .conf, "
                            "no '/')")
    return problems
