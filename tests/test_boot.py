"""Images of the fixture system built with `python -m builder build` really boot (SeaBIOS and OVMF under qemu TCG).

Each layout is built once per module; the booted system reports what it sees (root label, mounted boot
partitions, owners and modes, configuration.nix) on the serial console, read with pexpect. Owners, the
superblock and the EFI variables are also read with debugfs, dumpe2fs and virt-fw-vars.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
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


# ---------------------------------------------------------------- legacy: owners, configFile, tune2fs

@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("legacy")
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
    return build_layout(tmp, "legacy", contents=contents, configFile=str(src / "configuration.nix"))


@pytest.fixture(scope="module")
def legacy_facts(legacy: Built) -> dict[str, Any]:
    return boot_facts(legacy.image, legacy.scratch)


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

def test_legacy_gpt_qcow2_boots_as_qcow2(tmp_path_factory: pytest.TempPathFactory) -> None:
    built = build_layout(tmp_path_factory.mktemp("legacy-gpt"), "legacy+gpt", format="qcow2")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(built.image)], capture_output=True, text=True)
    assert '"format": "qcow2"' in info.stdout
    facts = boot_facts(built.image, built.scratch, fmt="qcow2")
    assert (facts["loader"], facts["root_device"], facts["efi"]) == ("grub-bios", "/dev/vda2", False)


def test_legacy_boot_boots_with_seabios_and_mounts_boot(tmp_path_factory: pytest.TempPathFactory) -> None:
    built = build_layout(tmp_path_factory.mktemp("legacy-boot"), "legacy+boot")
    facts = boot_facts(built.image, built.scratch)
    assert (facts["loader"], facts["root_device"]) == ("grub-bios", "/dev/vda2")
    assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "BOOT"}}


# ---------------------------------------------------------------- UEFI layouts

def test_efi_boots_with_ovmf_from_its_own_variables(tmp_path_factory: pytest.TempPathFactory) -> None:
    built = build_layout(tmp_path_factory.mktemp("efi"), "efi", touchEFIVars=True)
    vars_file = built.out / "efi-vars.fd"
    assert vars_file.is_file()
    printed = subprocess.run(["virt-fw-vars", "--input", str(vars_file), "--print"], capture_output=True, text=True,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert printed.returncode == 0, printed.stderr
    entry = [line for line in printed.stdout.splitlines() if 'title="Linux Boot Manager"' in line]
    assert entry and "systemd-bootx64.efi" in entry[0]
    facts = boot_facts(built.image, built.scratch, firmware="uefi", efi_vars=vars_file)
    assert (facts["loader"], facts["efi"], facts["root_device"]) == ("systemd-boot", True, "/dev/vda2")
    assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"}}


def test_efixbootldr_boots_with_ovmf(tmp_path_factory: pytest.TempPathFactory) -> None:
    built = build_layout(tmp_path_factory.mktemp("efixbootldr"), "efixbootldr")
    assert not (built.out / "efi-vars.fd").exists()
    facts = boot_facts(built.image, built.scratch, firmware="uefi")  # empty variables: the removable path
    assert (facts["loader"], facts["efi"], facts["root_device"]) == ("systemd-boot", True, "/dev/vda3")
    assert facts["mounts"] == {
        "/boot": {"device": "/dev/vda2", "type": "vfat", "label": "BOOT"},
        "/efi": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"},
    }


def test_hybrid_boots_with_seabios_and_with_ovmf(tmp_path_factory: pytest.TempPathFactory) -> None:
    # GRUB's configured device is not /dev/vda: finalize links it to the disk, as nixpkgs does.
    built = build_layout(tmp_path_factory.mktemp("hybrid"), "hybrid", grub_devices="/dev/disk/by-id/fixture-disk")
    bios = boot_facts(built.image, built.scratch)
    uefi = boot_facts(built.image, built.scratch, firmware="uefi")
    assert (bios["loader"], bios["efi"]) == ("grub-bios", False)
    assert (uefi["loader"], uefi["efi"]) == ("systemd-boot", True)
    for facts in (bios, uefi):
        assert facts["root_device"] == "/dev/vda3"
        assert facts["mounts"] == {"/boot": {"device": "/dev/vda1", "type": "vfat", "label": "ESP"}}
    offset = root_offset(built.image, "hybrid")
    assert e2fsck_clean(built.image, offset).returncode == 0
