"""The runInLinuxVM stand-in: root in a TCG VM, disk as /dev/vda, status returned, qemu never outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.vm.runner import host_paths, run_in_vm
from tests.fixtures.system import fixture_system_spec
from tests.support.specs import SpecFactory

pytestmark = [pytest.mark.boot, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
MARK = b"MDI-VM-WROTE-THIS"


def qemu_processes_using(path: Path) -> list[int]:
    """Pids of running processes whose command line names path."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and b"qemu" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_command_runs_as_root_on_the_disk_and_returns_its_status(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    xchg = tmp_path / "xchg"
    script = (
        "id -u > /tmp/xchg/uid; pwd > /tmp/xchg/pwd; "
        f"printf {MARK.decode()} | dd of=/dev/vda bs=512 seek=1 conv=notrunc 2>/dev/null; "
        "exit 7"
    )
    status = run_in_vm(["/bin/sh", "-c", script], disk, mem_mib=512, xchg=xchg, timeout=300, echo=False)
    assert status == 7
    assert (xchg / "uid").read_text() == "0\n"
    assert (xchg / "pwd").read_text() == "/tmp\n", "vmTools runs the builder in /tmp"
    assert disk.read_bytes()[512:512 + len(MARK)] == MARK
    assert "vm-init: command exited with status 7" in (xchg / "console.log").read_text()
    assert (xchg / "in-vm-exit").read_text() == "7\n"
    assert qemu_processes_using(disk) == []


def test_guest_is_as_bare_as_vmtools(tmp_path: Path) -> None:
    """nixpkgs' vmTools gives the builder a tmpfs root with only what its stage 1 makes (DESIGN §5a).

    Host directories that stand for the derivation's inputs (/usr, the Python running the builder) are
    there read-only at their own paths; /mnt, /home, /srv, /media and the host's /tmp are not.
    """
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    xchg = tmp_path / "xchg"
    probe = tmp_path / "host-tmp-probe"
    probe.write_text("on the host\n")
    script = (
        "cd /tmp/xchg; ls -A / > root; ls -A /etc > etc; ls -A /tmp > tmp; ls -A /bin > bin; "
        "readlink /bin/sh > sh; readlink /etc/mtab > mtab; readlink /var/run > varrun; echo \"$PATH\" > path; "
        f"test -e {probe} && echo visible > probe || echo absent > probe; "
        "for d in /nix/store /usr /tmp /run /dev/shm; do "
        "  if touch \"$d/.mdi-write-probe\" 2>/dev/null; then echo \"$d rw\"; else echo \"$d ro\"; fi; "
        "done > writable; stat -c %a /tmp > tmpmode; grep -c '^root:x:0:0:' /etc/passwd > passwd"
    )
    status = run_in_vm(["/bin/sh", "-c", script], disk, mem_mib=512, xchg=xchg, timeout=300, echo=False)
    assert status == 0

    def read(name: str) -> list[str]:
        return (xchg / name).read_text().split()

    top = set(read("root"))
    expected = {"bin", "dev", "etc", "nix", "proc", "run", "sys", "tmp", "usr", "var", "lib", "lib64"}
    extra = top - expected
    # The only other entries are the first components of the Python environment and this checkout.
    allowed = {Path(p).parts[1] for p in (sys.prefix, sys.base_prefix, str(REPO))}
    assert extra <= allowed, f"the guest's root has {sorted(extra - allowed)} of the host"
    for absent in ("mnt", "home", "srv", "media", "opt" if "opt" not in allowed else "mnt", "boot"):
        assert absent not in top, f"/{absent} of the host is visible in the guest"
    assert set(read("etc")) == {"mtab", "hosts", "passwd"}
    assert read("mtab") == ["/proc/mounts"] and read("varrun") == ["/run"]
    assert read("passwd") == ["1"]
    # Inputs are bound at their own paths: a checkout or venv that lives under the host's /tmp (a CI clone
    # made with mktemp -d) shows its first component there, as it shows one in / otherwise. Nothing else.
    inputs_in_tmp = {Path(p).parts[2] for p in host_paths("/nix/store")
                     if Path(p).parts[1:2] == ("tmp",) and len(Path(p).parts) > 2}
    assert set(read("tmp")) == {"xchg"} | inputs_in_tmp, \
        "the guest's /tmp is a fresh tmpfs holding only the exchange directory (and inputs bound under it)"
    assert read("probe") == ["absent"]
    assert read("tmpmode") == ["1777"]
    assert read("bin") == ["sh"] and read("sh") == ["/usr/bin/bash"], "stage 2 links /bin/sh to bash, nothing else"
    assert read("path") == ["/usr/sbin:/usr/bin"]
    writable = dict(line.split() for line in (xchg / "writable").read_text().splitlines())
    assert writable == {"/nix/store": "ro", "/usr": "ro", "/tmp": "rw", "/run": "rw", "/dev/shm": "rw"}
    assert qemu_processes_using(disk) == []


def test_timeout_kills_the_vm_and_reports_the_console(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    with pytest.raises(BuildError, match="did not finish within 4s"):
        run_in_vm(["sleep", "600"], disk, mem_mib=512, xchg=tmp_path / "xchg", timeout=4, echo=False)
    assert qemu_processes_using(disk) == []


def test_failed_finalize_shows_the_console_tail(make_spec: SpecFactory, tmp_path: Path) -> None:
    # The fixture closure has no switch-to-configuration: installing the bootloader must fail.
    spec = make_spec(installBootLoader=True)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(out),
                          "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1
    message = res.stderr[res.stderr.index("build failed:"):]
    assert "finalize failed in the build VM (exit status" in message
    assert "last console lines:" in message and "switch-to-configuration" in message
    assert "finalize: failed" in message
    assert not list(out.glob("*.img"))
    assert qemu_processes_using(tmp_path / "work") == []  # the raw image is in a scratch directory inside


def test_image_that_needs_no_vm_is_built_without_starting_one(tmp_path: Path) -> None:
    # A qemu that leaves a mark: if the build started a VM, the mark appears (and the build fails).
    fake = tmp_path / "bin"
    fake.mkdir()
    mark = tmp_path / "qemu-was-started"
    (fake / "qemu-system-x86_64").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (fake / "qemu-system-x86_64").chmod(0o755)
    spec = fixture_system_spec(tmp_path / "system", "legacy", installBootLoader=False)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(tmp_path / "out")],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not mark.exists()
    assert Path(res.stdout.strip()).is_file()


def test_sigterm_stops_the_vm(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    code = ("import sys; from pathlib import Path; from builder.vm.runner import run_in_vm; "
            "run_in_vm(['sleep', '600'], Path(sys.argv[1]), mem_mib=256, xchg=Path(sys.argv[2]), timeout=600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(disk), str(tmp_path / "xchg")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not qemu_processes_using(disk) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_processes_using(disk), "qemu did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "Interrupted" in err
    assert qemu_processes_using(disk) == []
