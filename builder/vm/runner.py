"""A stand-in for nixpkgs' vmTools.runInLinuxVM: run a command as root in a qemu (TCG) VM with the image as /dev/vda.

The guest is as bare as vmTools' (pkgs/build-support/vm/default.nix, nixpkgs 25.11; see VM_INIT in
builder/vm/initramfs.py for its stage 1 and 2 step by step): a fresh tmpfs root with /dev, /proc, /sys,
/tmp (the command's working directory and TMPDIR), /run, /var/run, a three-line /etc, the Nix store
shared read-only, and /bin/sh -> bash. What a derivation would have on PATH from its inputs comes from
the host here: the directories `host_paths` names (/usr, the Python environment running the builder),
bound read-only at their own paths. Nothing else of the host is visible (no /mnt, /home, /srv, /media,
host /tmp), so a command that relies on more fails here as it fails under Nix.

`run_in_vm` writes the command to xchg/command.sh; the exchange directory `xchg` is shared read-write at
/tmp/xchg, as in vmTools; the guest writes the command's status to xchg/in-vm-exit and the VM's console
is kept in xchg/console.log. As with vmTools, the command's exit status is the result; a VM that produced
no status (crash, timeout) is a BuildError showing the tail of the console. qemu is killed on timeout,
SIGINT and SIGTERM and dies with the builder, so no process outlives the call.
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

from ..errors import BuildError
from ..log import info, step
from ..signals import die_with_parent, handle_termination
from ..spec import Spec
from .initramfs import host_kernel, vm_initramfs

QEMU = "qemu-system-x86_64"
CONSOLE_TAIL_LINES = 40
FINALIZE_TIMEOUT = 1800.0
# Where this package is imported from: bound into the guest, so `python -m builder` runs there too.
REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_XCHG = "/tmp/xchg"
GUEST_TMP = "/tmp"
# Terminal control sequences the firmware writes to the serial console (cleared from logs).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")
GUEST_PATH = "/usr/sbin:/usr/bin"
# Host directories that stand for a derivation's inputs (the tools on PATH); more come from host_paths().
HOST_TOOL_DIRS = ("/usr",)


def qemu_command(disk: Path, xchg: Path, *, mem_mib: int, kernel: Path, initrd: Path,
                 efi: tuple[Path, Path] | None, extra: tuple[str, ...] = (), cpus: int = 1) -> list[str]:
    """The qemu command line: TCG, serial console on stdout, host root (ro) and xchg over 9p, disk as vda.

    extra is appended last, as vmTools appends the derivation's QEMU_OPTS.
    """
    cmd = [
        QEMU, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", str(cpus), "-m", str(mem_mib),
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
    return cmd + list(extra)


def host_paths(store_dir: str) -> list[str]:
    """Host directories the guest gets read-only at their own paths: tools, the Python running the builder.

    Directories inside another one listed, or inside the store, are left out (they come with it).
    """
    wanted = {*HOST_TOOL_DIRS, sys.prefix, sys.base_prefix, str(REPO_ROOT)}
    real = sorted({os.path.realpath(p) for p in wanted if os.path.isdir(p)})
    kept: list[str] = []
    for path in real:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in [*kept, store_dir]):
            kept.append(path)
    return kept


def host_links() -> list[tuple[str, str]]:
    """Links the guest's root gets: the dynamic loader's directories as on the host, and /bin/sh -> bash."""
    links = [(d, os.readlink(d)) for d in ("/lib", "/lib64") if os.path.islink(d)]
    bash = shutil.which("bash", path=GUEST_PATH) or "/usr/bin/bash"
    return [*links, ("/bin/sh", bash)]


def _write_command(xchg: Path, command: list[str], env: dict[str, str], cwd: str, store_dir: str) -> None:
    """Write what the guest's init reads: the command (environment, directory, argv, all quoted) and the binds."""
    lines = ["set -e", f"export PATH={shlex.quote(GUEST_PATH)}",
             f"export HOME=/homeless-shelter TMPDIR={GUEST_TMP} NIX_BUILD_TOP={GUEST_TMP}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += [f"cd {shlex.quote(cwd)}", "exec " + shlex.join(command), ""]
    (xchg / "command.sh").write_text("\n".join(lines))
    (xchg / "store-dir").write_text(store_dir + "\n")
    (xchg / "host-paths").write_text("".join(f"{p}\n" for p in host_paths(store_dir)))
    (xchg / "host-links").write_text("".join(f"{link} {target}\n" for link, target in host_links()))


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
              env: dict[str, str] | None = None, cwd: str = GUEST_TMP, echo: bool = True,
              store_dir: str = "/nix/store", extra_qemu_args: tuple[str, ...] = (), cpus: int = 1) -> int:
    """Run command as root in the VM with disk as /dev/vda; return its exit status.

    xchg is the exchange directory (created if needed, shared read-write at /tmp/xchg); efi is
    (firmware code, writable variables store) for UEFI pflash, None for SeaBIOS; extra_qemu_args come
    last on qemu's command line (vmTools' QEMU_OPTS). Raises BuildError when the VM produced no exit
    status (crash, kernel panic, timeout).
    """
    if shutil.which(QEMU) is None:
        raise BuildError(f"{QEMU} is not on PATH: install qemu-system-x86")
    kernel = host_kernel()
    initrd = vm_initramfs(kernel)
    xchg.mkdir(parents=True, exist_ok=True)
    status_file = xchg / "in-vm-exit"
    status_file.unlink(missing_ok=True)
    _write_command(xchg, command, env or {}, cwd, store_dir)
    cmd = qemu_command(disk, xchg, mem_mib=mem_mib, kernel=kernel.image, initrd=initrd, efi=efi,
                       extra=extra_qemu_args, cpus=cpus)
    tail: collections.deque[str] = collections.deque(maxlen=CONSOLE_TAIL_LINES)
    console_log = xchg / "console.log"

    # Terminating signals raise Interrupted (signal handlers can only be set from the main thread).
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

    The spec goes to work/vm-xchg/spec.json (seen in the guest as /tmp/xchg/spec.json). With
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
                           store_dir=spec.store_dir)
    if status != 0:
        raise BuildError(f"finalize failed in the build VM (exit status {status}); last console lines:\n"
                         + console_tail(xchg))
    if spec.touch_efi_vars:
        shutil.copyfile(vars_copy, raw_image.parent / "efi-vars.fd")
        vars_copy.unlink()
