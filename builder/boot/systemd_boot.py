"""systemd-boot installed by prepare from the system's bootspec: the files a first NixOS install writes, no VM.

What NixOS does on `switch-to-configuration boot` with NIXOS_INSTALL_BOOTLOADER=1 is nixpkgs'
nixos/modules/system/boot/loader/systemd-boot/systemd-boot-builder.py (read at NixOS/nixpkgs
0137840114d1, with its module systemd-boot.nix at 01e499cec163): it runs `bootctl install`, then writes
one entry per generation from the generation's bootspec and the loader.conf, then copies extraFiles and
extraEntries. On the fresh image there is exactly one generation (system-1-link), no profiles, no
machine-id and no older files, so the result is fixed by the bootspec and the options, and this module
writes it directly into the FAT partitions (builder/fs/fatcopy.py):

- `bootctl install` (systemd src/bootctl/bootctl-install.c, verb_install): the directories EFI,
  EFI/systemd, EFI/BOOT, loader, loader/keys on the ESP and loader, loader/entries, EFI, EFI/Linux on
  $BOOT (XBOOTLDR if there is one, else the ESP); `EFI/systemd/systemd-boot<arch>.efi` and its removable
  path copy `EFI/BOOT/BOOT<ARCH>.EFI` from the system's systemd; `loader/entries.srel` ("type1") on
  $BOOT. Its random seed is not written (one seed in every copy of an image is no seed; systemd-boot
  makes one on first boot, and the VM path removes it too); nor its entry-token directory, which only
  kernel-install uses.
- the builder: `EFI/nixos/` on $BOOT with each kernel/initrd (and devicetree) under the name
  copy_from_file gives it, `loader/entries/nixos-generation-1[-specialisation-<name>].conf` (title,
  sort-key, version, linux, initrd, options "init=<init> <kernelParams>"), `loader/loader.conf` on the
  ESP (timeout, default, editor, reboot-for-bitlocker, console-mode), `EFI/nixos/.extra-files/`.
- copy-extra-files (systemd-boot.nix): each extraFiles file at $BOOT/<name>, each extraEntries entry at
  $BOOT/loader/entries/<name>, each with an empty marker under EFI/nixos/.extra-files/ so that the next
  install removes what it placed.

The profile links (`/nix/var/nix/profiles/system-1-link`) are on the root already (builder/staging/store.py).
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..disk.layout import Layout
from ..errors import BuildError, UserError
from ..fs import fat, fatcopy
from ..inputfile import host_only_problem
from ..spec import Spec
from .bootspec import BootSpec, read_bootspec
from .systemd_boot_config import EFI_ARCH_MACHINES, SystemdBootConfig

NIXOS_DIR = "EFI/nixos"  # systemd-boot.nix: nixosDir = "/EFI/nixos", relative to $BOOT
EXTRA_FILES_DIR = f"{NIXOS_DIR}/.extra-files"
ESP_DIRS = ("EFI", "EFI/systemd", "EFI/BOOT", "loader", "loader/keys")  # bootctl's esp_subdirs
BOOT_DIRS = ("loader", "loader/entries", "EFI", "EFI/Linux")  # bootctl's dollar_boot_subdirs
# nixpkgs' system/boot/loader.nix architecture names -> bootctl's EFI architecture names.
SYSTEM_EFI_ARCH = {
    "x86_64-linux": "x64", "i686-linux": "ia32", "aarch64-linux": "aa64", "armv7l-linux": "arm",
    "armv6l-linux": "arm", "riscv64-linux": "riscv64", "loongarch64-linux": "loongarch64",
}
GENERATION = 1  # the image's only generation: /nix/var/nix/profiles/system-1-link


@dataclass(frozen=True)
class BootFile:
    """One file of the install: its partition ("esp" or "xbootldr"), its path there, a source file or bytes."""

    partition: str
    path: str
    source: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class InstallPlan:
    """Everything systemd-boot's first install leaves on the FAT partitions."""

    files: tuple[BootFile, ...]
    directories: tuple[tuple[str, str], ...]  # (partition, path), made even when empty

    def on(self, partition: str) -> tuple[list[str], list[BootFile]]:
        """The directories and files of one partition."""
        return ([d for p, d in self.directories if p == partition],
                [f for f in self.files if f.partition == partition])


def pe_machine(path: str) -> int | None:
    """The PE/COFF machine type of an EFI image (kernel with EFI stub, systemd-boot), or None if not PE."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise UserError(f"cannot read {path!r}: {exc}") from None
    if len(head) < 0x40 or head[:2] != b"MZ":
        return None
    offset = struct.unpack_from("<I", head, 0x3C)[0]
    if offset + 6 > len(head) or head[offset:offset + 4] != b"PE\0\0":
        return None
    machine: int = struct.unpack_from("<H", head, offset + 4)[0]
    return machine


def efi_file_name(path: str, store_dir: str) -> str:
    """The name systemd-boot-builder.py's copy_from_file gives a store file under EFI/nixos.

    The path is resolved; its last component is kept, prefixed with the store path's name when it is a
    file inside one: /nix/store/<h>-linux-6.12/bzImage -> <h>-linux-6.12-bzImage.efi; a store path that
    is itself the file keeps its own name: /nix/store/<h>-x -> <h>-x.efi.
    """
    real = os.path.realpath(path)
    prefix = store_dir.rstrip("/") + "/"
    if not real.startswith(prefix):
        raise UserError(f"{path!r} resolves to {real!r}, outside {store_dir}")
    store_subdir = real[len(prefix):].split("/", 1)[0]
    suffix = os.path.basename(real)
    return f"{suffix}.efi" if suffix == store_subdir else f"{store_subdir}-{suffix}.efi"


def entry_file_name(specialisation: str | None) -> str:
    """generation_conf_filename for the default profile's first generation."""
    return f"nixos-generation-{GENERATION}" + (f"-specialisation-{specialisation}" if specialisation else "") + ".conf"


def build_date(spec: Spec, toplevel: str) -> str:
    """The entry's "built on" date: nixpkgs takes the generation's ctime; a deterministic image the epoch's.

    The ctime of a store path is when this machine realised it, so it would make rebuilds differ; the
    next `nixos-rebuild` in the booted system rewrites the entry with its own date anyway.
    """
    stamp = spec.source_date_epoch if spec.deterministic else int(os.stat(toplevel).st_ctime)
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d")


def entry_text(sd: SystemdBootConfig, boot: BootSpec, specialisation: str | None, kernel: str, initrd: str,
               devicetree: str | None, date: str) -> str:
    """A boot entry as write_entry writes it (BOOT_ENTRY, then devicetree; no machine-id: the image has none)."""
    title = sd.distro_name + (f" ({specialisation})" if specialisation else "")
    options = f"init={boot.init} " + " ".join(boot.kernel_params)
    text = (f"title {title}\n"
            f"sort-key {boot.sort_key}\n"
            f"version Generation {GENERATION} {boot.label}, built on {date}\n"
            f"linux /{kernel}\n"
            f"initrd /{initrd}\n"
            f"options {options}\n")
    if devicetree is not None:
        text += f"devicetree /{devicetree}\n"
    return text


def loader_conf(sd: SystemdBootConfig) -> str:
    """loader/loader.conf as write_loader_conf writes it for the default generation."""
    text = f"timeout {sd.timeout}\ndefault {entry_file_name(None)}\n"
    if not sd.editor:
        text += "editor 0\n"
    if sd.reboot_for_bitlocker:
        text += "reboot-for-bitlocker yes\n"
    return text + f"console-mode {sd.console_mode}\n"


def _check_efi_image(path: str, what: str, arch: str) -> None:
    """Refuse an EFI image that systemd-boot or the firmware of this architecture cannot start."""
    machine = pe_machine(path)
    if machine is None:
        raise UserError(f"{what} {path!r} is not an EFI (PE/COFF) image: systemd-boot can only start kernels "
                        "built with the EFI stub (NixOS requires CONFIG_EFI_STUB for systemd-boot)")
    if machine not in EFI_ARCH_MACHINES[arch]:
        raise UserError(f"{what} {path!r} is built for PE machine type {machine:#06x}, not for {arch} "
                        f"({', '.join(f'{m:#06x}' for m in EFI_ARCH_MACHINES[arch])})")


def _entry_files(spec: Spec, sd: SystemdBootConfig, boot: BootSpec, specialisation: str | None, arch: str,
                 boot_part: str) -> list[BootFile]:
    """The kernel, initrd, devicetree and entry file of one generation (or of one of its specialisations)."""
    where = f"the bootspec{f' of specialisation {specialisation!r}' if specialisation else ''}"
    if boot.initrd is None:
        raise UserError(f"{where} names no initrd; systemd-boot-builder.py (and so this install) needs one")
    if boot.initrd_secrets is not None:
        raise UserError(f"{where} names initrdSecrets (boot.initrd.secrets): appending secrets runs the system's "
                        "own tools, so it needs the build VM (the Nix side chooses the VM for such systems)")
    _check_efi_image(boot.kernel, "the kernel", arch)
    kernel = f"{NIXOS_DIR}/{efi_file_name(boot.kernel, spec.store_dir)}"
    initrd = f"{NIXOS_DIR}/{efi_file_name(boot.initrd, spec.store_dir)}"
    files = [BootFile(boot_part, kernel, source=boot.kernel), BootFile(boot_part, initrd, source=boot.initrd)]
    devicetree = None
    if boot.devicetree is not None:
        devicetree = f"{NIXOS_DIR}/{efi_file_name(boot.devicetree, spec.store_dir)}"
        files.append(BootFile(boot_part, devicetree, source=boot.devicetree))
    # nixpkgs dates the entry by system-1-link[/specialisation/<name>], which resolves to this toplevel.
    text = entry_text(sd, boot, specialisation, kernel, initrd, devicetree, build_date(spec, boot.toplevel))
    files.append(BootFile(boot_part, f"loader/entries/{entry_file_name(specialisation)}", data=text.encode()))
    return files


def plan_install(spec: Spec, boot: BootSpec) -> InstallPlan:
    """The files and directories of a first install of this system with these options."""
    sd = spec.systemd_boot
    assert sd is not None
    arch = sd.efi_arch
    _check_efi_image(sd.efi_binary, "the systemd-boot binary", arch)
    wanted = SYSTEM_EFI_ARCH.get(boot.system)
    if wanted is not None and wanted != arch:
        raise UserError(f"the bootspec says system = {boot.system!r} ({wanted}), but the systemd-boot binary "
                        f"{sd.efi_binary!r} is for {arch}")
    boot_part = "esp" if sd.xbootldr_mount_point is None else "xbootldr"
    binary = os.path.basename(sd.efi_binary)
    files = [
        BootFile("esp", f"EFI/systemd/{binary}", source=sd.efi_binary),
        BootFile("esp", f"EFI/BOOT/BOOT{arch.upper()}.EFI", source=sd.efi_binary),
        BootFile("esp", "loader/loader.conf", data=loader_conf(sd).encode()),
        BootFile(boot_part, "loader/entries.srel", data=b"type1\n"),
    ]
    files += _entry_files(spec, sd, boot, None, arch, boot_part)
    for name, child in boot.specialisations:
        files += _entry_files(spec, sd, child, name, arch, boot_part)
    # copy-extra-files runs last: what it places replaces a file of the same (case-insensitive) name.
    for name, source in sd.extra_files:
        _check_regular(source, f"bootLoader.systemdBoot.extraFiles[{json.dumps(name)}]")
        files += [BootFile(boot_part, name, source=source), BootFile(boot_part, f"{EXTRA_FILES_DIR}/{name}", data=b"")]
    for name, text in sd.extra_entries:
        files += [BootFile(boot_part, f"loader/entries/{name}", data=text.encode()),
                  BootFile(boot_part, f"{EXTRA_FILES_DIR}/loader/entries/{name}", data=b"")]
    last: dict[tuple[str, str], BootFile] = {}
    for f in files:
        last[(f.partition, f.path.lower())] = f
    directories = [("esp", d) for d in ESP_DIRS] + [(boot_part, d) for d in (*BOOT_DIRS, NIXOS_DIR, EXTRA_FILES_DIR)]
    return InstallPlan(tuple(sorted(last.values(), key=lambda f: (f.partition, f.path))),
                       tuple(sorted(set(directories))))


def _check_regular(path: str, field: str) -> None:
    """A file to copy into the ESP must be a regular file (/dev/zero would fill it; a FIFO would block mcopy), and
    not one of /proc, /sys or /dev's."""
    why = host_only_problem(path)
    if why:
        raise UserError(f"{field}: {why}")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"{field} {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{field} {path!r}: not a regular file")


def load_plan(spec: Spec) -> InstallPlan:
    """Read the system's bootspec and plan the install (before anything is written, so errors come early)."""
    return plan_install(spec, read_bootspec(spec.toplevel, spec.store_dir))


def write_install(spec: Spec, install: InstallPlan, image: Path, layout: Layout, scratch: Path) -> None:
    """Write the planned files into the image's ESP (and XBOOTLDR), then check each FAT filesystem."""
    for role in ("esp", "xbootldr"):
        directories, files = install.on(role)
        if not directories and not files:
            continue
        partition = layout.by_role(role)
        if partition is None:
            raise BuildError(f"the layout has no {role} partition for systemd-boot's files")
        fatcopy.install_files(image, partition, directories, files, scratch, spec.source_date_epoch, "systemd-boot",
                              "the kernel and initrd are the bulk")
        fat.check(image, partition)
