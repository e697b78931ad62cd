"""Boot an image under qemu (TCG: SeaBIOS or OVMF on x86_64, AAVMF on aarch64) and read the fixture's facts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pexpect

from tests.fixtures.system import AAVMF_CODE, AAVMF_VARS, BOOT_MARKER, FACTS_PREFIX, OVMF_CODE, OVMF_VARS

BOOT_TIMEOUT = 150


def boot_command(image: Path, fmt: str, firmware: str, vars_file: Path | None, arch: str = "x86_64") -> list[str]:
    """qemu command line: the image as virtio disk (snapshot, never written), serial console on stdio.

    aarch64 (always UEFI): the `virt` machine with a Cortex-A57 and AAVMF; no network card, or the firmware
    tries to boot from the network first.
    """
    if arch == "aarch64":
        assert vars_file is not None
        return ["qemu-system-aarch64", "-accel", "tcg", "-machine", "virt", "-cpu", "cortex-a57", "-m", "512",
                "-smp", "1", "-nic", "none", "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-no-reboot", "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
                "-drive", f"file={image},if=virtio,format={fmt},snapshot=on"]
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1",
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-drive", f"file={image},if=virtio,format={fmt},snapshot=on",
    ]
    if firmware == "uefi":
        assert vars_file is not None
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"]
    return cmd


def boot_facts(image: Path, scratch: Path, *, fmt: str = "raw", firmware: str = "bios",
               efi_vars: Path | None = None, arch: str = "x86_64") -> dict[str, Any]:
    """Boot the image and return the facts the fixture system printed; fail if it does not boot.

    firmware is "bios" (SeaBIOS) or "uefi" (OVMF with a copy of efi_vars, or of empty OVMF variables);
    arch "aarch64" boots AAVMF with a copy of its empty variables.
    """
    vars_copy = None
    if firmware == "uefi" or arch == "aarch64":
        vars_copy = scratch / f"boot-vars-{image.name}-{arch}.fd"
        shutil.copyfile(efi_vars or (AAVMF_VARS if arch == "aarch64" else OVMF_VARS), vars_copy)
    cmd = boot_command(image, fmt, firmware, vars_copy, arch)
    log = scratch / f"console-{image.name}-{firmware}.log"
    with log.open("w") as log_file:
        child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", codec_errors="replace", timeout=BOOT_TIMEOUT,
                              logfile=log_file)
        try:
            index = child.expect([BOOT_MARKER, "FIXTURE-SYSTEM-FAILED", pexpect.EOF, pexpect.TIMEOUT])
            if index != 0:
                raise AssertionError(f"{image} did not boot ({firmware}); console tail:\n"
                                     + log.read_text(errors="replace")[-3000:])
            child.expect(FACTS_PREFIX + r"(\{.*\})\r*\n")
            facts: dict[str, Any] = json.loads(child.match.group(1))
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
    return facts
