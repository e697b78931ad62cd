"""`python -m bench.sdboot`: time an image of the fixture system with its bootloader, VM path vs no-VM path.

`--loader systemd-boot` (default): an `efi` image with systemd-boot; `--loader grub`: a `legacy` image with GRUB
(bootLoader.grub instead of bootLoader.systemdBoot below; the VM path runs the fixture's grub-install).

The harness in bench/cli.py times the root filesystem on synthetic closures without a bootloader; this
script times the whole `python -m builder build` of one bootable system instead, both ways:

- VM path: the spec without bootLoader.systemdBoot, so prepare, then the build VM (qemu TCG here: no
  KVM on this machine) runs the system's own switch-to-configuration, which installs systemd-boot with
  bootctl, then the after-VM check and settling, then convert;
- no-VM path: the same spec with bootLoader.systemdBoot, so prepare writes the ESP from the bootspec.

Runs alternate between the two (warm cache, the fixture system built beforehand); medians are printed
as a markdown row. The fixture system is made from Debian parts and is not NixOS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fixtures.system import grub_system_spec, sdboot_system_spec

REPO = Path(__file__).resolve().parent.parent


LOADERS = {"systemd-boot": ("efi", "systemdBoot"), "grub": ("legacy", "grub")}


def specs(work: Path, loader: str = "systemd-boot") -> dict[str, Path]:
    """The two specs of the same system and layout: with the bootloader's section (no VM) and without."""
    table, section = LOADERS[loader]
    make = sdboot_system_spec if loader == "systemd-boot" else grub_system_spec
    no_vm = make(work / "no-vm", "x86_64", table)
    doc = json.loads(no_vm.read_text())
    doc["bootLoader"][section] = None
    vm = work / "vm" / "spec.json"
    vm.parent.mkdir(parents=True, exist_ok=True)
    vm.write_text(json.dumps(doc, indent=2) + "\n")
    return {"vm": vm, "no-vm": no_vm}


def time_build(spec: Path, work: Path) -> float:
    """Wall seconds of one `python -m builder build` from an empty work and output directory."""
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(work / "out"),
                          "--work", str(work / "scratch")], cwd=REPO, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if res.returncode != 0:
        raise SystemExit(f"build of {spec} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Time both paths `--runs` times each, alternated; print the medians."""
    p = argparse.ArgumentParser(prog="python -m bench.sdboot", description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="runs per path (default 3)")
    p.add_argument("--loader", choices=sorted(LOADERS), default="systemd-boot", help="the bootloader")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mdi-bench-sdboot-") as tmp:
        work = Path(tmp)
        paths = specs(work, args.loader)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for run in range(args.runs):
            for name, spec in paths.items():
                times[name].append(time_build(spec, work / f"build-{name}"))
                print(f"run {run + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr)
    vm, no_vm = statistics.median(times["vm"]), statistics.median(times["no-vm"])
    print("| image | VM path s | no-VM path s | speed-up |")
    print("|---|---|---|---|")
    print(f"| fixture system, `{LOADERS[args.loader][0]}`, {args.loader} (median of {args.runs}) | {vm:.2f} | "
          f"{no_vm:.2f} | "
          f"{vm / no_vm:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
