"""Images of the fixture system built with `python -m builder build` really boot (SeaBIOS and OVMF under qemu TCG).

Each layout is built and booted once per module, two at a time (TCG uses one core per VM); the booted
system reports what it sees (root label, mounted boot partitions, owners and modes, configuration.nix)
on the serial console, read with pexpect. Owners, the superblock and the EFI variables are also read with
debugfs, dumpe2fs and virt-fw-vars.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.system import GROUPS, REPORT_FILE, ROOT_GUID, SOURCE_DATE_EPOCH, USERS, fixture_system_spec
from tests.imagecheck import debugfs, e2fsck_clean, inode_facts, part_offset, superblock
from tests.qemu_boot import boot_facts

pytestmark = [pytest.mark.boot, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# A contents target that would create files in the image root (/mnt in the VM) if the shell ran it.
HOSTILE = "/srv/odd name 'q' \"dq\" $(touch /mnt/canary-dollar) `touch /mnt/canary-tick`\nsecond line"
REPORTED = ["/srv/owned-file", "/srv/owned-dir", "/srv/owned-dir/inner/file.txt"]
CONFIG_TEXT = "{ ... }: { fixture = \"configuration.nix written by makeDiskImage tests\"; }\n"


@dataclass(frozen=True)
class Built:
    """A built image: its file, output dir, scratch dir and qemu format."""

    image: Path
    out: Path
    scratch: Path
    fmt: str


@dataclass(frozen=True)
class Booted:
    """A built image and the facts it reported when booted with SeaBIOS ("bios") and/or OVMF ("uefi")."""

    built: Built
    facts: dict[str, dict[str, Any]]


def build(spec: Path, out: Path) -> Path:
    """Run `python -m builder build` and return the image it reports."""
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(res.stdout.strip())


def build_layout(tmp: Path, table: str, grub_devices: str | None = None, **overrides: Any) -> Built:
    """Build the fixture system's image for a layout (spec keys overridden)."""
    image = build(fixture_system_spec(tmp, table, grub_devices, **overrides), tmp / "out")
    return Built(image, tmp / "out", tmp, "qcow2" if image.suffix == ".qcow2" else "raw")


def root_offset(image: Path, table: str) -> int:
    """Byte offset of the root filesystem according to sfdisk."""
    return part_offset(image, {"legacy": 1, "legacy+boot": 2, "legacy+gpt": 2, "efi": 2,
                               "efixbootldr": 3, "hybrid": 3}[table])


# ---------------------------------------------------------------- the images, built and booted in parallel

def legacy_job(tmp: Path) -> Booted:
    """legacy with named owners (one of them a hostile name), a report file and configFile; SeaBIOS."""
    src = tmp / "src"
    (src / "owned-dir" / "inner").mkdir(parents=True)
    (src / "owned-file").write_text("owned by fixtureuser:fixturegroup\n")
    (src / "owned-dir" / "inner" / "file.txt").write_text("owned by fixtureuser:fixtureaux\n")
    (src / "hostile").write_text("a file with a hostile name\n")
    (src / "report").write_text("".join(f"{p}\n" for p in REPORTED))
    (src / "configuration.nix").write_text(CONFIG_TEXT)
    contents = [
        {"source": str(src / "owned-file"), "target": "/srv/owned-file", "mode": "0640",
         "user": "fixtureuser", "group": "fixturegroup"},
        {"source": str(src / "owned-dir"), "target": "/srv/owned-dir", "mode": None,
         "user": "fixtureuser", "group": "fixtureaux"},
        {"source": str(src / "hostile"), "target": HOSTILE, "mode": None, "user": "fixtureuser", "group": "nogroup"},
        {"source": str(src / "report"), "target": REPORT_FILE, "mode": None, "user": None, "group": None},
    ]
    built = build_layout(tmp, "legacy", contents=contents, configFile=str(src / "configuration.nix"))
    return Booted(built, {"bios": boot_facts(built.image, tmp)})


def legacy_gpt_job(tmp: Path) -> Booted:
    """legacy+gpt written as qcow2, booted as qcow2 with SeaBIOS."""
    built = build_layout(tmp, "legacy+gpt", format="qcow2")
    return Booted(built, {"bios": boot_facts(built.image, tmp, fmt="qcow2")})


# legacy+boot exists for Limine: nixpkgs links boot.loader.limine.biosDevice to the build VM's disk. The
# fixture system installs its BIOS loader (GRUB, standing in for `limine bios-install`) on that device
# only, so the build fails unless finalize made it name the disk.
LIMINE_DEVICE = "/dev/disk/by-id/virtio-limine-bios"


def legacy_boot_job(tmp: Path) -> Booted:
    """legacy+boot (FAT /boot on an MBR disk) with its BIOS loader on Limine's device, SeaBIOS."""
    built = build_layout(tmp, "legacy+boot", grub_devices=LIMINE_DEVICE,
                         bootLoader={"grubDevices": [], "limineBiosDevice": LIMINE_DEVICE})
    return Booted(built, {"bios": boot_facts(built.image, tmp)})


def efi_job(tmp: Path) -> Booted:
    """efi with touchEFIVars, booted by OVMF with the efi-vars.fd the build wrote."""
    built = build_layout(tmp, "efi", touchEFIVars=True)
    vars_file = built.out / "efi-vars.fd"
    facts = boot_facts(built.image, tmp, firmware="uefi", efi_vars=vars_file) if vars_file.exists() else {}
    return Booted(built, {"uefi": facts})


def efixbootldr_job(tmp: Path) -> Booted:
    """efixbootldr without EFI variables: OVMF boots systemd-boot from the removable path."""
    built = build_layout(tmp, "efixbootldr")
    return Booted(built, {"uefi": boot_facts(built.image, tmp, firmware="uefi")})


def hybrid_job(tmp: Path) -> Booted:
    """hybrid whose GRUB device is not /dev/vda (finalize links it to the disk), booted by SeaBIOS and OVMF."""
    built = build_layout(tmp, "hybrid", grub_devices="/dev/disk/by-id/fixture-disk")
    return Booted(built, {"bios": boot_facts(built.image, tmp), "uefi": boot_facts(built.image, tmp, firmware="uefi")})


# Slowest first, so two workers finish together.
JOBS: dict[str, Callable[[Path], Booted]] = {
    "hybrid": hybrid_job, "efi": efi_job, "efixbootldr": efixbootldr_job,
    "legacy": legacy_job, "legacy+gpt": legacy_gpt_job, "legacy+boot": legacy_boot_job,
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Booted]]]:
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(job, tmp_path_factory.mktemp(name.replace("+", "-"))) for name, job in JOBS.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def legacy(images: dict[str, Future[Booted]]) -> Built:
    return images["legacy"].result().built


@pytest.fixture(scope="module")
def legacy_facts(images: dict[str, Future[Booted]]) -> dict[str, Any]:
    return images["legacy"].result().facts["bios"]


def image_ids(image: Path, offset: int) -> tuple[dict[str, int], dict[str, int]]:
    """User and group ids by name from the image's own /etc/passwd and /etc/group (read with debugfs)."""
    passwd = debugfs(image, offset, "cat /etc/passwd")
    group = debugfs(image, offset, "cat /etc/group")
    users = {f[0]: int(f[2]) for f in (line.split(":") for line in passwd.splitlines()) if len(f) > 3}
    groups = {f[0]: int(f[2]) for f in (line.split(":") for line in group.splitlines()) if len(f) > 2}
    return users, groups


def test_legacy_boots_with_seabios(legacy_facts: dict[str, Any]) -> None:
    assert legacy_facts["loader"] == "grub-bios"
    assert legacy_facts["efi"] is False
    assert (legacy_facts["root_device"], legacy_facts["root_label"]) == ("/dev/vda1", "nixos")
    assert legacy_facts["mounts"] == {}


def test_named_owners_carry_the_image_ids(legacy: Built, legacy_facts: dict[str, Any]) -> None:
    offset = root_offset(legacy.image, "legacy")
    users, groups = image_ids(legacy.image, offset)
    assert users["fixtureuser"] == USERS["fixtureuser"] and groups["fixtureaux"] == GROUPS["fixtureaux"]
    want = {
        "/srv/owned-file": (users["fixtureuser"], groups["fixturegroup"]),
        "/srv/owned-dir": (users["fixtureuser"], groups["fixtureaux"]),
        "/srv/owned-dir/inner/file.txt": (users["fixtureuser"], groups["fixtureaux"]),
    }
    for path, (uid, gid) in want.items():
        seen = legacy_facts["paths"][path]
        assert (seen["uid"], seen["gid"]) == (uid, gid), path
        facts = inode_facts(legacy.image, offset, path)
        assert (facts["uid"], facts["gid"]) == (uid, gid), path
    assert legacy_facts["paths"]["/srv/owned-file"]["mode"] == "640"


def test_hostile_target_is_chowned_as_data(legacy: Built, tmp_path: Path) -> None:
    offset = root_offset(legacy.image, "legacy")
    listing = debugfs(legacy.image, offset, "ls -l /")
    assert "canary" not in listing
    dump = tmp_path / "srv"
    res = subprocess.run(["debugfs", "-R", f"rdump /srv {tmp_path}", f"{legacy.image}?offset={offset}"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    st = os.lstat(dump / HOSTILE.removeprefix("/srv/"))
    assert (st.st_uid, st.st_gid) == (USERS["fixtureuser"], GROUPS["nogroup"])


def test_config_file_lands_in_etc_nixos(legacy: Built, legacy_facts: dict[str, Any]) -> None:
    assert legacy_facts["config_file"] is True
    assert legacy_facts["config_sha256"] == hashlib.sha256(CONFIG_TEXT.encode()).hexdigest()
    offset = root_offset(legacy.image, "legacy")
    assert debugfs(legacy.image, offset, "cat /etc/nixos/configuration.nix") == CONFIG_TEXT


def test_machine_id_the_activation_wrote_is_removed(legacy: Built) -> None:
    # The fixture's activation writes /etc/machine-id, as NixOS's does; nixpkgs removes it after the
    # bootloader install so that machines made from one image do not share an id. Activation did run
    # (its /etc/passwd is there), so a missing id means it was removed.
    offset = root_offset(legacy.image, "legacy")
    assert "fixtureuser:x:4242" in debugfs(legacy.image, offset, "cat /etc/passwd")
    looked = subprocess.run(["debugfs", "-R", "stat /etc/machine-id", f"{legacy.image}?offset={offset}"],
                            capture_output=True, text=True)
    assert "File not found" in looked.stderr, looked.stdout


def test_superblock_has_no_fsck_schedule_and_pinned_state(legacy: Built) -> None:
    offset = root_offset(legacy.image, "legacy")
    assert e2fsck_clean(legacy.image, offset).returncode == 0
    os.environ["TZ"] = "UTC"
    time.tzset()
    sb = superblock(legacy.image, offset)
    assert sb["Maximum mount count"] == "-1"
    assert sb["Check interval"].startswith("0 ")
    assert sb["Filesystem UUID"] == ROOT_GUID.lower()
    assert sb["Mount count"] == "0"
    assert sb["Last mount time"] == "n/a"
    assert sb["Last mounted on"] == "<not available>"
    assert sb["Last checked"] == time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(SOURCE_DATE_EPOCH))


# ---------------------------------------------------------------- the other BIOS layouts

def test_legacy_gpt_qcow2_boots_as_qcow2(images: dict[str, Future[Booted]]) -> None:
    booted = images["legacy+gpt"].result()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(booted.built.image)], capture_output=True,
                          text=True)
    assert '"format": "qcow2"' in info.stdout
    facts = booted.facts["bios"]
    assert (facts["loader"], facts["root_device"], facts["efi"]) == ("grub-bios", "/dev/vda2", False)


def test_legacy_boot_boots_with_seabios_and_mounts_boot(images: dict[str, Future[Booted]]) -> None:
    facts = images["legacy+boot"].result().facts["bios"]
    assert (facts["loader"], facts["root_device"]) == ("grub-bios", "/dev/vda2")
    assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "BOOT"}}


# ---------------------------------------------------------------- UEFI layouts

def test_efi_vars_hold_the_systemd_boot_entry(images: dict[str, Future[Booted]]) -> None:
    vars_file = images["efi"].result().built.out / "efi-vars.fd"
    assert vars_file.is_file()
    printed = subprocess.run(["virt-fw-vars", "--input", str(vars_file), "--print"], capture_output=True, text=True,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert printed.returncode == 0, printed.stderr
    entry = [line for line in printed.stdout.splitlines() if 'title="Linux Boot Manager"' in line]
    assert entry and "systemd-bootx64.efi" in entry[0]


def test_efi_boots_with_ovmf_from_its_own_variables(images: dict[str, Future[Booted]]) -> None:
    facts = images["efi"].result().facts["uefi"]
    assert (facts["loader"], facts["efi"], facts["root_device"]) == ("systemd-boot", True, "/dev/vda2")
    assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"}}


def test_efixbootldr_boots_with_ovmf(images: dict[str, Future[Booted]]) -> None:
    booted = images["efixbootldr"].result()
    assert not (booted.built.out / "efi-vars.fd").exists()
    facts = booted.facts["uefi"]
    assert (facts["loader"], facts["efi"], facts["root_device"]) == ("systemd-boot", True, "/dev/vda3")
    assert facts["mounts"] == {
        "/boot": {"device": "/dev/vda2", "type": "vfat", "label": "BOOT"},
        "/efi": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"},
    }


def test_hybrid_boots_with_seabios_and_with_ovmf(images: dict[str, Future[Booted]]) -> None:
    booted = images["hybrid"].result()
    bios, uefi = booted.facts["bios"], booted.facts["uefi"]
    assert (bios["loader"], bios["efi"]) == ("grub-bios", False)
    assert (uefi["loader"], uefi["efi"]) == ("systemd-boot", True)
    for facts in (bios, uefi):
        assert facts["root_device"] == "/dev/vda3"
        assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"}}
    assert e2fsck_clean(booted.built.image, root_offset(booted.built.image, "hybrid")).returncode == 0
