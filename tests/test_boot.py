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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.system import GROUPS, ROOT_GUID, SOURCE_DATE_EPOCH, USERS
from tests.support.fixture_images import CONFIG_TEXT, HOSTILE, RECIPES, Built, FixtureImages
from tests.support.imagecheck import debugfs, e2fsck_clean, inode_facts, part_offset, superblock
from tests.support.qemu_boot import boot_facts

pytestmark = [pytest.mark.boot, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Booted:
    """A built image and the facts it reported when booted with SeaBIOS ("bios") and/or OVMF ("uefi")."""

    built: Built
    facts: dict[str, dict[str, Any]]


def root_offset(image: Path, table: str) -> int:
    """Byte offset of the root filesystem according to sfdisk."""
    return part_offset(image, {"legacy": 1, "legacy+boot": 2, "legacy+gpt": 2, "efi": 2,
                               "efixbootldr": 3, "hybrid": 3}[table])


# ---------------------------------------------------------------- the images, built and booted in parallel

def boot_job(images: FixtureImages, name: str) -> Booted:
    """Boot one recipe's image with the firmware its layout is for: SeaBIOS, OVMF or (hybrid) both."""
    built = images.get(name)
    tmp = built.scratch
    if name in ("legacy", "legacy+boot"):
        return Booted(built, {"bios": boot_facts(built.image, tmp)})
    if name == "legacy+gpt":
        return Booted(built, {"bios": boot_facts(built.image, tmp, fmt="qcow2")})
    if name == "efi":
        vars_file = built.out / "efi-vars.fd"
        facts = boot_facts(built.image, tmp, firmware="uefi", efi_vars=vars_file) if vars_file.exists() else {}
        return Booted(built, {"uefi": facts})
    if name == "efixbootldr":
        return Booted(built, {"uefi": boot_facts(built.image, tmp, firmware="uefi")})
    return Booted(built, {"bios": boot_facts(built.image, tmp), "uefi": boot_facts(built.image, tmp, firmware="uefi")})


@pytest.fixture(scope="module")
def images(fixture_images: FixtureImages) -> Iterator[dict[str, Future[Booted]]]:
    """Every recipe built (shared with test_reproducible) and booted, two at a time."""
    pool = ThreadPoolExecutor(max_workers=2)
    for name in RECIPES:
        fixture_images.start(name)
    futures = {name: pool.submit(boot_job, fixture_images, name) for name in RECIPES}
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
