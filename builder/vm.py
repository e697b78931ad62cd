"""A stand-in for nixpkgs' vmTools.runInLinuxVM: run a command as root in a qemu (TCG) VM with the image as /dev/vda.

The guest boots the host's Debian kernel with a small busybox initramfs (builder/initramfs.py), mounts the
host's root READ-ONLY over 9p as its own root, gets fresh /dev, /proc, /sys and /run, and the exchange
directory `xchg` (read-write 9p) at /run/xchg. `run_in_vm` writes the command to xchg/command.sh, the
guest runs it as root and writes its status to xchg/exit-code; the VM's whole console is kept in
xchg/console.log. As with vmTools, the command's exit status is the result; a VM that produced no status
(crash, timeout) is a BuildError showing the tail of the console. qemu is killed on timeout, SIGINT and
SIGTERM, so no process outlives the call.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from .errors import BuildError
from .initramfs import host_kernel, vm_initramfs
from .log import info, step
from .signals import die_with_parent, handle_termination
from .spec import Spec

QEMU = "qemu-system-x86_64"
CONSOLE_TAIL_LINES = 40
FINALIZE_TIMEOUT = 1800.0
# The guest sees the host's root, so the builder package is importable from the same place.
REPO_ROOT = Path(__file__).resolve().parent.parent
GUEST_XCHG = "/run/xchg"
# Terminal control sequences the firmware writes to the serial console (cleared from logs).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def qemu_command(disk: Path, xchg: Path, *, mem_mib: int, kernel: Path, initrd: Path,
                 efi: tuple[Path, Path] | None) -> list[str]:
    """The qemu command line: TCG, serial console on stdout, host root (ro) and xchg over 9p, disk as vda."""
    cmd = [
        QEMU, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", "1", "-m", str(mem_mib),
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-device", "virtio-rng-pci",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={xchg},mount_tag=xchg,security_model=none",
        "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe,werror=report",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=1 loglevel=4 rdinit=/init mitigations=off no_timer_check 8250.nr_uarts=1",
    ]
    if efi is not None:
        code, variables = efi
        cmd += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
        ]
    return cmd


def _write_command(xchg: Path, command: list[str], env: dict[str, str], cwd: str) -> None:
    """Write the guest's command.sh: environment, working directory and the command, all shell-quoted."""
    lines = ["set -e", f"export PATH={shlex.quote(GUEST_PATH)}", "export HOME=/run/tmp TMPDIR=/run/tmp"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += [f"cd {shlex.quote(cwd)}", "exec " + shlex.join(command), ""]
    (xchg / "command.sh").write_text("\n".join(lines))


def _pump(stream: IO[bytes], log: Path, tail: collections.deque[str], echo: bool) -> None:
    """Copy the VM's console to the log file, the tail buffer and (when echo) stderr."""
    with log.open("w", encoding="utf-8", errors="replace") as out:
        for raw in iter(stream.readline, b""):
            line = ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace").replace("\r", ""))
            out.write(line)
            out.flush()
            tail.append(line.rstrip("\n"))
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()


def run_in_vm(command: list[str], disk: Path, *, mem_mib: int, xchg: Path,
              efi: tuple[Path, Path] | None = None, timeout: float = FINALIZE_TIMEOUT,
              env: dict[str, str] | None = None, cwd: str = "/", echo: bool = True) -> int:
    """Run command as root in the VM with disk as /dev/vda; return its exit status.

    xchg is the exchange directory (created if needed, shared read-write at /run/xchg); efi is
    (firmware code, writable variables store) for UEFI pflash, None for SeaBIOS. Raises BuildError when
    the VM produced no exit status (crash, kernel panic, timeout).
    """
    if shutil.which(QEMU) is None:
        raise BuildError(f"{QEMU} is not on PATH: install qemu-system-x86")
    kernel = host_kernel()
    initrd = vm_initramfs(kernel)
    xchg.mkdir(parents=True, exist_ok=True)
    status_file = xchg / "exit-code"
    status_file.unlink(missing_ok=True)
    _write_command(xchg, command, env or {}, cwd)
    cmd = qemu_command(disk, xchg, mem_mib=mem_mib, kernel=kernel.image, initrd=initrd, efi=efi)
    tail: collections.deque[str] = collections.deque(maxlen=CONSOLE_TAIL_LINES)
    console_log = xchg / "console.log"

    # SIGINT/SIGTERM/SIGHUP raise Interrupted (signal handlers can only be set from the main thread).
    in_main = threading.current_thread() is threading.main_thread()
    signals = handle_termination() if in_main else contextlib.nullcontext()
    # die_with_parent: qemu gets SIGKILL if the builder dies (even by SIGKILL), so no VM outlives a build.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)
    pump = threading.Thread(target=_pump, args=(proc.stdout, console_log, tail, echo), daemon=True)
    pump.start()
    started = time.monotonic()
    try:
        with signals:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"the build VM did not finish within {timeout:.0f}s; last console lines:\n"
                         + "\n".join(tail)) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pump.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    info(f"build VM ran {time.monotonic() - started:.1f}s (qemu exit status {proc.returncode})")
    if not status_file.exists():
        raise BuildError("the build VM produced no exit status (qemu exit status "
                         f"{proc.returncode}); last console lines:\n" + "\n".join(tail))
    return int(status_file.read_text().strip() or "255")


def console_tail(xchg: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last lines of the VM console kept in xchg/console.log."""
    log = xchg / "console.log"
    if not log.exists():
        return "(no console log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_finalize(spec: Spec, raw_image: Path, work: Path) -> None:
    """Run `python -m builder finalize` in the VM on raw_image; with touchEFIVars leave efi-vars.fd beside it.

    The spec goes to work/vm-xchg/spec.json (seen in the guest as /run/xchg/spec.json). With
    touchEFIVars the VM boots OVMF from spec.efi_firmware with a copy of spec.efi_variables as its
    writable variables store; afterwards that store is copied to raw_image.parent / "efi-vars.fd",
    from where the pipeline moves it to $out. A non-zero status is a BuildError with the console tail.
    """
    xchg = work / "vm-xchg"
    if xchg.exists():
        shutil.rmtree(xchg)
    xchg.mkdir(parents=True)
    (xchg / "spec.json").write_text(json.dumps(spec.raw, indent=2, sort_keys=True))
    efi: tuple[Path, Path] | None = None
    vars_copy = work / "efi-vars.work.fd"
    if spec.touch_efi_vars:
        assert spec.efi_firmware is not None and spec.efi_variables is not None
        shutil.copyfile(spec.efi_variables, vars_copy)
        os.chmod(vars_copy, 0o644)
        efi = (Path(spec.efi_firmware), vars_copy)
    command = [sys.executable, "-m", "builder", "finalize", f"{GUEST_XCHG}/spec.json", "--device", "/dev/vda"]
    env = {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
           "PYTHONUNBUFFERED": "1", "SOURCE_DATE_EPOCH": str(spec.source_date_epoch)}
    with step("finalize in the build VM"):
        status = run_in_vm(command, raw_image, mem_mib=spec.mem_size, xchg=xchg, efi=efi, env=env,
                           cwd=str(REPO_ROOT))
    if status != 0:
        raise BuildError(f"finalize failed in the build VM (exit status {status}); last console lines:\n"
                         + console_tail(xchg))
    if spec.touch_efi_vars:
        shutil.copyfile(vars_copy, raw_image.parent / "efi-vars.fd")
        vars_copy.unlink()
