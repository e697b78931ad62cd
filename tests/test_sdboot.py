"""systemd-boot installed by prepare from the system's bootspec: no build VM, for x86_64 and aarch64 systems.

The fixture system (Debian parts, not NixOS) carries a boot.json; `python -m builder build` of a spec with
bootLoader.systemdBoot must not start a VM (a poisoned qemu on PATH proves it), must write what nixpkgs'
systemd-boot-builder.py writes on a first install (read back with mtools' mdir/mtype, not with our
model), must be bit-for-bit reproducible, and the images must boot: x86_64 under OVMF, aarch64 under
AAVMF, each reporting "loader": "systemd-boot".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.boot.bootspec import parse_bootspec
from builder.boot.systemd_boot import efi_file_name, entry_text, loader_conf
from builder.boot.systemd_boot_config import SystemdBootConfig
from builder.errors import SpecError, UserError
from builder.spec import load_spec, load_spec_document
from tests.fixtures.system import fixture_system_spec, sdboot_system_spec
from tests.support.imagecheck import e2fsck_clean, part_offset
from tests.support.qemu_boot import boot_facts

REPO = Path(__file__).resolve().parent.parent
STORE = "/nix/store"
MiB = 1 << 20


# ---------------------------------------------------------------- the bootspec and the files' text (fast)

def bootspec_doc(**main: Any) -> dict[str, Any]:
    """A boot.json document as NixOS's bootspec.nix writes it, fields overridden."""
    top = f"{STORE}/aaaa-nixos-system-test"
    return {
        "org.nixos.bootspec.v1": {
            "init": f"{top}/init", "initrd": f"{STORE}/bbbb-initrd-linux/initrd",
            "kernel": f"{STORE}/cccc-linux/bzImage",
            "kernelParams": ["console=ttyS0", "loglevel=4"], "label": "NixOS 25.11 (Linux 6.12.1)",
            "system": "x86_64-linux", "toplevel": top, **main,
        },
        "org.nixos.specialisation.v1": {},
        "org.nixos.systemd-boot": {"sortKey": "nixos"},
    }


def test_bootspec_is_read_as_systemd_boot_builder_reads_it() -> None:
    doc = bootspec_doc()
    doc["org.nixos.specialisation.v1"] = {"b": bootspec_doc(label="B"), "a": bootspec_doc(label="A")}
    del doc["org.nixos.systemd-boot"]
    boot = parse_bootspec(doc, "boot.json", STORE)
    assert boot.kernel_params == ("console=ttyS0", "loglevel=4")
    assert boot.sort_key == "nixos", "systemd-boot-builder.py's default sort key"
    assert [name for name, _ in boot.specialisations] == ["a", "b"]
    assert boot.initrd_secrets is None and boot.devicetree is None


@pytest.mark.parametrize(("change", "fragment"), [
    ({"kernel": None}, "kernel is missing"),
    ({"kernelParams": "quiet"}, "kernelParams"),
    ({"init": "/etc/init"}, "is not a path in /nix/store"),
    ({"toplevel": f"{STORE}/../etc"}, "is not a path in /nix/store"),
])
def test_bad_bootspecs_are_named(change: dict[str, Any], fragment: str) -> None:
    doc = bootspec_doc(**change)
    if change.get("kernel", "") is None:
        del doc["org.nixos.bootspec.v1"]["kernel"]
    with pytest.raises(UserError, match=fragment):
        parse_bootspec(doc, "boot.json", STORE)
    with pytest.raises(UserError, match="not an RFC 0125"):
        parse_bootspec({"v1": {}}, "boot.json", STORE)


def test_kernel_and_initrd_names_are_copy_from_files(tmp_path: Path) -> None:
    # systemd-boot-builder.py: resolved path; "<store path name>-<file name>.efi", or "<name>.efi" when the
    # store path is the file itself.
    store = tmp_path / "store"
    (store / "h1-linux-6.12").mkdir(parents=True)
    (store / "h1-linux-6.12" / "bzImage").write_bytes(b"MZ")
    (store / "h2-initrd").write_bytes(b"initrd")
    (store / "h3-toplevel").mkdir()
    (store / "h3-toplevel" / "kernel").symlink_to(store / "h1-linux-6.12" / "bzImage")
    assert efi_file_name(str(store / "h1-linux-6.12" / "bzImage"), str(store)) == "h1-linux-6.12-bzImage.efi"
    assert efi_file_name(str(store / "h2-initrd"), str(store)) == "h2-initrd.efi"
    assert efi_file_name(str(store / "h3-toplevel" / "kernel"), str(store)) == "h1-linux-6.12-bzImage.efi"


def test_an_empty_sort_key_is_written_as_systemd_boot_builder_writes_it() -> None:
    # boot.loader.systemd-boot.sortKey is a types.str (nixpkgs' systemd-boot.nix): "" is allowed, and
    # systemd-boot-builder.py's BOOT_ENTRY writes "sort-key {sort_key}" as it is.
    doc = bootspec_doc()
    doc["org.nixos.systemd-boot"] = {"sortKey": ""}
    boot = parse_bootspec(doc, "boot.json", STORE)
    assert boot.sort_key == ""
    text = entry_text(sd_config(), boot, None, "k", "i", None, "2023-11-14")
    assert "\nsort-key \n" in text


def sd_config(**options: Any) -> SystemdBootConfig:
    """systemd-boot options as the spec carries them, overridden."""
    values: dict[str, Any] = {
        "efi_binary": f"{STORE}/s-systemd/lib/systemd/boot/efi/systemd-bootx64.efi", "efi_sys_mount_point": "/boot",
        "xbootldr_mount_point": None, "distro_name": "NixOS", "timeout": 5, "editor": True,
        "console_mode": "keep", "reboot_for_bitlocker": False, "extra_files": (), "extra_entries": (),
    }
    return SystemdBootConfig(**{**values, **options})


def test_loader_conf_is_write_loader_confs() -> None:
    assert loader_conf(sd_config()) == "timeout 5\ndefault nixos-generation-1.conf\nconsole-mode keep\n"
    assert loader_conf(sd_config(timeout="menu-force", editor=False, reboot_for_bitlocker=True,
                                 console_mode="max")) == (
        "timeout menu-force\ndefault nixos-generation-1.conf\neditor 0\nreboot-for-bitlocker yes\nconsole-mode max\n")
    assert loader_conf(sd_config(timeout=-1)).startswith("timeout -1\n")


def test_entry_is_write_entrys() -> None:
    boot = parse_bootspec(bootspec_doc(), "boot.json", STORE)
    text = entry_text(sd_config(), boot, None, "EFI/nixos/k.efi", "EFI/nixos/i.efi", None, "2023-11-14")
    assert text == (
        "title NixOS\n"
        "sort-key nixos\n"
        "version Generation 1 NixOS 25.11 (Linux 6.12.1), built on 2023-11-14\n"
        "linux /EFI/nixos/k.efi\n"
        "initrd /EFI/nixos/i.efi\n"
        f"options init={STORE}/aaaa-nixos-system-test/init console=ttyS0 loglevel=4\n"
    )
    special = entry_text(sd_config(), boot, "rescue", "k", "i", "EFI/nixos/d.efi", "2023-11-14")
    assert special.startswith("title NixOS (rescue)\n") and special.endswith("devicetree /EFI/nixos/d.efi\n")


# ---------------------------------------------------------------- the spec: who needs the VM

@pytest.fixture(scope="module")
def sdboot_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The x86_64 fixture's no-VM spec document."""
    doc: dict[str, Any] = json.loads(sdboot_system_spec(tmp_path_factory.mktemp("sdboot-spec")).read_text())
    return doc


def test_systemd_boot_needs_no_vm_unless_something_else_does(sdboot_doc: dict[str, Any]) -> None:
    spec = load_spec_document(sdboot_doc)
    assert spec.installs_systemd_boot and not spec.needs_vm
    named = [{"source": "/etc/hostname", "target": "/srv/x", "mode": None, "user": "fixtureuser", "group": "root"}]
    for changed in ({"touchEFIVars": True}, {"contents": named}):
        spec = load_spec_document({**sdboot_doc, **changed})
        assert spec.needs_vm and not spec.installs_systemd_boot, changed  # the system's own bootctl runs there
    spec = load_spec_document({**sdboot_doc, "installBootLoader": False})
    assert not spec.needs_vm and not spec.installs_systemd_boot


def test_a_grub_system_still_uses_the_vm(tmp_path: Path) -> None:
    spec = load_spec(fixture_system_spec(tmp_path, "legacy"))
    assert spec.systemd_boot is None and spec.needs_vm


@pytest.mark.parametrize(("table", "section", "fragment"), [
    ("legacy", {}, "needs an EFI system partition"),
    ("efixbootldr", {}, "efiSysMountPoint"),
    ("efi", {"xbootldrMountPoint": "/boot"}, "xbootldrMountPoint"),
    ("efi", {"efiBinary": "/nix/store/x-systemd/grubx64.efi"}, "not a systemd-boot EFI binary"),
    ("efi", {"extraFiles": {"../escape": "/nix/store/x"}}, "extraFiles"),
    ("efi", {"extraFiles": {"EFI/nixos/.extra-files/x": "/nix/store/x"}}, "extraFiles"),
    ("efi", {"extraEntries": {"sub/x.conf": "title x\n"}}, "extraEntries"),
    ("efi", {"consoleMode": "huge"}, "consoleMode"),
])
def test_systemd_boot_sections_that_cannot_work_are_refused(sdboot_doc: dict[str, Any], table: str,
                                                             section: dict[str, Any], fragment: str) -> None:
    doc = json.loads(json.dumps(sdboot_doc))
    doc["partitionTableType"] = table
    doc["bootSize"] = "160M"
    doc["bootLoader"]["systemdBoot"].update(section)
    with pytest.raises(SpecError, match=fragment):
        load_spec_document(doc)


# ---------------------------------------------------------------- images built with `python -m builder build`

@dataclass(frozen=True)
class Built:
    """An image built without a VM: the file, its spec, the build log, and the fixture's bootspec."""

    image: Path
    spec: Path
    log: str
    bootspec: dict[str, Any]


def poisoned_qemu(directory: Path) -> tuple[dict[str, str], Path]:
    """An environment whose qemu-system-* record being started (and fail): a build that starts a VM shows."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "qemu-was-started"
    for name in ("qemu-system-x86_64", "qemu-system-aarch64"):
        tool = directory / name
        tool.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\nexit 1\n")
        tool.chmod(0o755)
    return dict(os.environ, PATH=f"{directory}:{os.environ['PATH']}"), marker


def build_no_vm(tmp: Path, arch: str, table: str, work: str = "work", **overrides: Any) -> Built:
    """Build the fixture's no-VM image; fail if it started a VM."""
    spec = sdboot_system_spec(tmp / "spec", arch, table, **overrides)
    env, marker = poisoned_qemu(tmp / "poison")
    out = tmp / f"out-{work}"
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(out),
                          "--work", str(tmp / work)], cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not marker.exists(), f"a VM was started: {marker.read_text()}"
    assert "finalize (VM)" not in res.stderr
    toplevel = json.loads(spec.read_text())["system"]["toplevel"]
    return Built(Path(res.stdout.strip()), spec, res.stderr, json.loads((Path(toplevel) / "boot.json").read_text()))


def mdir_tree(image: Path, offset: int) -> set[str]:
    """Every directory (with a trailing /) and file in the FAT filesystem at offset, as mtools lists them."""
    listing = subprocess.run(["mdir", "-/", "-b", "-i", f"{image}@@{offset}", "::/"], capture_output=True, text=True,
                             check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    return {line.removeprefix("::/") for line in listing.splitlines() if line.startswith("::/")}


def mtype(image: Path, offset: int, path: str) -> str:
    """A file's text from the FAT filesystem at offset."""
    return subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::/{path}"], capture_output=True, text=True,
                          check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


def nixos_name(path: str) -> str:
    """EFI/nixos/<store path name>-<file name>.efi, as systemd-boot-builder.py names a kernel or initrd."""
    store_path, file_name = path.removeprefix(STORE + "/").split("/", 1)
    return f"EFI/nixos/{store_path}-{file_name}.efi"


JOBS = {  # name -> (arch, table); booted two at a time
    "x86_64-efi": ("x86_64", "efi"),
    "aarch64-efi": ("aarch64", "efi"),
    "x86_64-efixbootldr": ("x86_64", "efixbootldr"),
    "aarch64-efixbootldr": ("aarch64", "efixbootldr"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Every (arch, table) image, built one after the other (builds are short; the boots are the long part)."""
    return {name: build_no_vm(tmp_path_factory.mktemp(name), arch, table) for name, (arch, table) in JOBS.items()}


@pytest.fixture(scope="module")
def booted(built: dict[str, Built], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Future[tuple[dict[str, Any], float]]]]:
    """Each image booted (x86_64 with OVMF, aarch64 with AAVMF), two at a time: the facts and the seconds taken."""
    def boot(name: str) -> tuple[dict[str, Any], float]:
        arch = JOBS[name][0]
        started = time.monotonic()
        facts = boot_facts(built[name].image, tmp_path_factory.mktemp(f"boot-{name}"), firmware="uefi", arch=arch)
        return facts, time.monotonic() - started

    pool = ThreadPoolExecutor(max_workers=2)
    yield {name: pool.submit(boot, name) for name in JOBS}
    pool.shutdown(wait=True, cancel_futures=True)


EFI_ARCH = {"x86_64": "x64", "aarch64": "aa64"}


def expected_files(bootspec: dict[str, Any], arch: str) -> tuple[set[str], set[str]]:
    """What nixpkgs' systemd-boot-builder.py leaves after `bootctl install` on a first install: (ESP, $BOOT).

    bootctl: EFI, EFI/systemd, EFI/BOOT, loader, loader/keys on the ESP; loader, loader/entries, EFI,
    EFI/Linux and loader/entries.srel on $BOOT; the binary twice. The builder: EFI/nixos with the kernel
    and initrd, EFI/nixos/.extra-files, the generation's entry, loader.conf on the ESP.
    """
    main = bootspec["org.nixos.bootspec.v1"]
    efi = EFI_ARCH[arch]
    esp = {"EFI/", "EFI/systemd/", "EFI/BOOT/", "loader/", "loader/keys/", f"EFI/systemd/systemd-boot{efi}.efi",
           f"EFI/BOOT/BOOT{efi.upper()}.EFI", "loader/loader.conf"}
    boot = {"loader/", "loader/entries/", "EFI/", "EFI/Linux/", "EFI/nixos/", "EFI/nixos/.extra-files/",
            "loader/entries.srel", "loader/entries/nixos-generation-1.conf", nixos_name(main["kernel"]),
            nixos_name(main["initrd"])}
    return esp, boot


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x86_64-efi", "aarch64-efi"])
def test_esp_holds_what_a_first_nixos_install_writes(built: dict[str, Built], name: str) -> None:
    b, arch = built[name], JOBS[name][0]
    esp, boot = expected_files(b.bootspec, arch)
    assert mdir_tree(b.image, part_offset(b.image, 1)) == esp | boot
    main = b.bootspec["org.nixos.bootspec.v1"]
    offset = part_offset(b.image, 1)
    entry = mtype(b.image, offset, "loader/entries/nixos-generation-1.conf")
    assert entry.splitlines() == [
        "title Fixture system",
        "sort-key nixos",
        f"version Generation 1 {main['label']}, built on 2023-11-14",
        f"linux /{nixos_name(main['kernel'])}",
        f"initrd /{nixos_name(main['initrd'])}",
        f"options init={main['init']} {' '.join(main['kernelParams'])}",
    ]
    assert "fixture.loader=systemd-boot" in main["kernelParams"]
    assert mtype(b.image, offset, "loader/loader.conf") == ("timeout 0\ndefault nixos-generation-1.conf\n"
                                                            "console-mode keep\n")
    assert mtype(b.image, offset, "loader/entries.srel") == "type1\n"
    # Byte for byte the system's own files: the systemd-boot binary (twice) and the kernel.
    systemd = json.loads(b.spec.read_text())["bootLoader"]["systemdBoot"]["efiBinary"]
    for path, source in ((f"EFI/BOOT/BOOT{EFI_ARCH[arch].upper()}.EFI", systemd),
                         (nixos_name(main["kernel"]), main["kernel"])):
        copy = subprocess.run(["mtype", "-i", f"{b.image}@@{offset}", f"::/{path}"], capture_output=True,
                              check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
        assert hashlib.sha256(copy).digest() == hashlib.sha256(Path(source).read_bytes()).digest(), path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x86_64-efixbootldr", "aarch64-efixbootldr"])
def test_xbootldr_holds_the_entries_and_kernels(built: dict[str, Built], name: str) -> None:
    b, arch = built[name], JOBS[name][0]
    esp, boot = expected_files(b.bootspec, arch)
    assert mdir_tree(b.image, part_offset(b.image, 1)) == esp
    assert mdir_tree(b.image, part_offset(b.image, 2)) == boot
    # The root has the mount points the layout's system mounts them at.
    root = part_offset(b.image, 3)
    assert e2fsck_clean(b.image, root).returncode == 0
    listing = subprocess.run(["debugfs", "-R", "ls -l /", f"{b.image}?offset={root}"], capture_output=True,
                             text=True, check=True).stdout
    assert " efi" in listing and " boot" in listing


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_no_vm_image_is_bit_for_bit_reproducible(tmp_path: Path, arch: str) -> None:
    first = build_no_vm(tmp_path, arch, "efi", work="work-1")
    time.sleep(1.1)
    second = build_no_vm(tmp_path, arch, "efi", work="work-2")
    digests = [hashlib.sha256(b.image.read_bytes()).hexdigest() for b in (first, second)]
    print(f"{arch} efi no-VM image sha256: {digests[0]}")
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_too_small_a_boot_partition_is_named(tmp_path: Path) -> None:
    spec = sdboot_system_spec(tmp_path / "spec", "aarch64", "efi", bootSize="24M")
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "cannot hold systemd-boot's files" in res.stderr and "bootSize" in res.stderr
    assert not (tmp_path / "out" / "fixture.img").exists()


@pytest.mark.slow
@pytest.mark.boot
@pytest.mark.parametrize("name", list(JOBS))
def test_images_built_without_a_vm_boot(booted: dict[str, Future[tuple[dict[str, Any], float]]], name: str) -> None:
    facts, seconds = booted[name].result()
    arch, table = JOBS[name]
    print(f"{name}: booted to the fixture's facts in {seconds:.1f} s")
    assert facts["machine"] == arch
    assert (facts["loader"], facts["efi"], facts["root_label"]) == ("systemd-boot", True, "nixos")
    if table == "efi":
        assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"}}
    else:
        assert facts["mounts"]["/efi"]["label"] == "ESP" and facts["mounts"]["/boot"]["label"] == "BOOT"
