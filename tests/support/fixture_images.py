"""The fixture system's images, built once per test session with `python -m builder build` through the VM.

test_boot boots them; test_reproducible rebuilds two of them from their specs and compares the bytes, so
the slowest builds are made once. Built lazily, at most two at a time (TCG uses one core per VM).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fixtures.system import REPORT_FILE, fixture_system_spec

REPO = Path(__file__).resolve().parent.parent.parent
# A contents target that would create files in the image root (/mnt in the VM) if the shell ran it.
HOSTILE = "/srv/odd name 'q' \"dq\" $(touch /mnt/canary-dollar) `touch /mnt/canary-tick`\nsecond line"
REPORTED = ["/srv/owned-file", "/srv/owned-dir", "/srv/owned-dir/inner/file.txt"]
CONFIG_TEXT = "{ ... }: { fixture = \"configuration.nix written by makeDiskImage tests\"; }\n"
# legacy+boot exists for Limine: nixpkgs links boot.loader.limine.biosDevice to the build VM's disk. The
# fixture system installs its BIOS loader (GRUB, standing in for `limine bios-install`) on that device
# only, so the build fails unless finalize made it name the disk.
LIMINE_DEVICE = "/dev/disk/by-id/virtio-limine-bios"


@dataclass(frozen=True)
class Built:
    """A built image: its file, output dir, scratch dir, qemu format and the spec it was built from."""

    image: Path
    out: Path
    scratch: Path
    fmt: str
    spec: Path


def build(spec: Path, out: Path, work: Path | None = None) -> tuple[Path, str]:
    """Run `python -m builder build`; the image it reports and its log (stderr)."""
    cmd = [sys.executable, "-m", "builder", "build", str(spec), "--out", str(out)]
    if work is not None:
        cmd += ["--work", str(work)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(res.stdout.strip()), res.stderr


def build_layout(tmp: Path, table: str, grub_devices: str | None = None, **overrides: Any) -> Built:
    """Build the fixture system's image for a layout (spec keys overridden)."""
    spec = fixture_system_spec(tmp, table, grub_devices, **overrides)
    image, _ = build(spec, tmp / "out")
    return Built(image, tmp / "out", tmp, "qcow2" if image.suffix == ".qcow2" else "raw", spec)


def legacy(tmp: Path) -> Built:
    """legacy with named owners (one of them a hostile name), a report file and configFile."""
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


def legacy_gpt(tmp: Path) -> Built:
    """legacy+gpt written as qcow2."""
    return build_layout(tmp, "legacy+gpt", format="qcow2")


def legacy_boot(tmp: Path) -> Built:
    """legacy+boot (FAT /boot on an MBR disk) with its BIOS loader on Limine's device."""
    return build_layout(tmp, "legacy+boot", grub_devices=LIMINE_DEVICE,
                        bootLoader={"grubDevices": [], "limineBiosDevice": LIMINE_DEVICE})


def efi(tmp: Path) -> Built:
    """efi with touchEFIVars (bootctl registers its entry in the variables the build VM's OVMF writes)."""
    return build_layout(tmp, "efi", touchEFIVars=True)


def efixbootldr(tmp: Path) -> Built:
    """efixbootldr without EFI variables (OVMF boots systemd-boot from the removable path)."""
    return build_layout(tmp, "efixbootldr")


def hybrid(tmp: Path) -> Built:
    """hybrid whose GRUB device is not /dev/vda (finalize links it to the disk)."""
    return build_layout(tmp, "hybrid", grub_devices="/dev/disk/by-id/fixture-disk")


# Slowest first, so two workers finish together.
RECIPES: dict[str, Callable[[Path], Built]] = {
    "hybrid": hybrid, "efi": efi, "efixbootldr": efixbootldr,
    "legacy": legacy, "legacy+gpt": legacy_gpt, "legacy+boot": legacy_boot,
}


class FixtureImages:
    """The session's images: each recipe built at most once, on first request, two builds at a time."""

    def __init__(self, scratch: Path) -> None:
        self._scratch = scratch
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._futures: dict[str, Future[Built]] = {}
        self._lock = threading.Lock()

    def start(self, name: str) -> Future[Built]:
        """The build of a recipe, started now unless it already was."""
        with self._lock:
            if name not in self._futures:
                tmp = self._scratch / name.replace("+", "-")
                tmp.mkdir(parents=True, exist_ok=True)
                self._futures[name] = self._pool.submit(RECIPES[name], tmp)
            return self._futures[name]

    def get(self, name: str) -> Built:
        """A recipe's image, built if needed (waits for it)."""
        return self.start(name).result()

    def close(self) -> None:
        """Wait for running builds; drop the ones not started."""
        self._pool.shutdown(wait=True, cancel_futures=True)
