"""btrfs and xfs roots of the fixture system boot: bootloader installed in the VM, root mounted by stage 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.system import fixture_system_spec
from tests.support.fscheck import checker, cut, root_range
from tests.support.qemu_boot import boot_facts

pytestmark = [pytest.mark.boot, pytest.mark.slow]
REPO = Path(__file__).parent.parent


@pytest.mark.parametrize(("fs", "table", "firmware"), [("btrfs", "efi", "uefi"), ("xfs", "legacy", "bios")])
def test_root_boots(fs: str, table: str, firmware: str, tmp_path: Path) -> None:
    """btrfs under systemd-boot (kernel on the ESP) and xfs under GRUB (kernel read from the xfs /boot)."""
    spec = fixture_system_spec(tmp_path / "spec", table, fsType=fs)
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    image = Path(res.stdout.strip())
    offset, size = root_range(image, 2 if table == "efi" else 1)
    check = checker(fs, cut(image, offset, size, tmp_path / "root.part"))
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    facts = boot_facts(image, tmp_path, firmware=firmware)
    assert facts["root_fstype"] == fs
    assert facts["root_device"] == ("/dev/vda2" if table == "efi" else "/dev/vda1")
