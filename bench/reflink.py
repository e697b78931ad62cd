"""`python -m bench --reflink`: an XFS filesystem with reflink, made in a file and loop-mounted, holding the closure
and every method's output, so a method that can share blocks with the store (copy_file_range, FICLONERANGE)
may do so (issue 25). Set up and torn down here, on every exit path."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .closure import Closure, _rewrite_prefix, remove_tree

LABEL = "reflink-xfs"
GiB = 1 << 30
BACKING = "reflink-xfs.img"  # in --work, on the host's disk: a sparse file
MOUNT = "reflink-xfs"  # in --work: the mount point


class ReflinkUnavailable(Exception):
    """The XFS could not be made or mounted here; the message says why (printed as the skip reason)."""


@dataclass(frozen=True)
class Xfs:
    """A mounted XFS: where it is, its loop device, and how it was made (for the results)."""

    mount: Path
    device: str
    facts: dict[str, str]


def preflight() -> str | None:
    """Why the reflink run cannot happen on this machine at all (not root, no loop devices, no mkfs.xfs), or None."""
    if os.geteuid() != 0:
        return "needs root (loop device and mount)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices: /dev/loop-control is missing (a container without them?)"
    for tool in ("mkfs.xfs", "losetup", "mount", "umount", "filefrag"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH" + (" (Debian: xfsprogs)" if tool == "mkfs.xfs" else "")
    return None


def _run(argv: list[str], what: str) -> str:
    """Run a setup command; its failure becomes ReflinkUnavailable naming the command and its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as exc:
        raise ReflinkUnavailable(f"{what}: {exc}") from exc
    if done.returncode != 0:
        raise ReflinkUnavailable(f"{what}: `{' '.join(argv)}` exited {done.returncode}: "
                                 f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def _is_mounted(path: Path) -> bool:
    """Whether path is a mount point in this namespace."""
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def _loops_on(backing: Path) -> list[str]:
    """Loop devices whose backing file is `backing`."""
    out = subprocess.run(["losetup", "-nO", "NAME", "-j", str(backing)], capture_output=True, text=True).stdout
    return out.split()


def _detach(device: str) -> None:
    """losetup -d, recreating the node first if something (systemd-repart 252) deleted it."""
    m = re.fullmatch(r"/dev/loop(\d+)", device)
    if m and not Path(device).exists():
        os.mknod(device, 0o660 | stat.S_IFBLK, os.makedev(7, int(m[1])))
    subprocess.run(["losetup", "-d", device], capture_output=True)


def teardown(work: Path) -> list[str]:
    """Unmount the XFS, detach its loop devices and delete the backing file and mount point. Returns notes on
    what could not be undone at once (empty when everything went)."""
    notes: list[str] = []
    mnt, backing = work / MOUNT, work / BACKING
    if mnt.is_dir() and _is_mounted(mnt):
        for attempt in range(8):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25 * (attempt + 1))  # a killed method's processes still closing their files
        else:
            subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)
            notes.append(f"{mnt} stayed busy for 9 s (a process of the run still held files there): "
                         "unmounted lazily, the filesystem goes when that process exits")
    if backing.exists():
        for device in _loops_on(backing):
            _detach(device)
        deadline = time.monotonic() + 5
        while (busy := _loops_on(backing)) and time.monotonic() < deadline:
            time.sleep(0.1)  # right after umount the kernel may still hold the device: losetup -d left autoclear
        if busy:
            notes.append(f"{', '.join(busy)} on {backing} still in use: set to detach itself when released")
        backing.unlink()
    if mnt.is_dir() and not _is_mounted(mnt):
        try:
            mnt.rmdir()
        except OSError as exc:
            notes.append(f"mount point {mnt} not removed: {exc}")
    return notes


_pending: list[int] = []  # a signal that came while the XFS was being torn down, raised once it is
_tearing_down = False


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP as an exception, so the finally clauses stop the running method and unmount and detach
    before the bench exits (a signal during the XFS's teardown is raised once it is done)."""
    if _tearing_down:
        _pending.append(signum)
        return
    raise SystemExit(128 + signum)


@contextmanager
def mounted_xfs(work: Path, size: int) -> Iterator[Xfs]:
    """Make an XFS with reflink of `size` bytes in a sparse file in work, loop-mount it (direct I/O when the loop
    driver takes it, so the page cache holds its data once) and yield it; unmount and detach on every exit
    path. Raises ReflinkUnavailable with the reason when it cannot be made or mounted."""
    global _tearing_down
    for note in teardown(work):  # what a killed earlier run left
        print(f"note: earlier reflink run: {note}", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    mnt, backing = work / MOUNT, work / BACKING
    try:
        t0 = time.monotonic()
        with open(backing, "wb") as f:
            f.truncate(size)
        _run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-L", "mdibench", str(backing)], "mkfs.xfs")
        direct_io = "on"
        try:
            device = _run(["losetup", "--find", "--show", "--direct-io=on", str(backing)], "losetup").strip()
        except ReflinkUnavailable:
            direct_io = "off (the loop driver refused it)"
            device = _run(["losetup", "--find", "--show", str(backing)], "losetup").strip()
        mnt.mkdir()
        _run(["mount", "-t", "xfs", device, str(mnt)], "mount")
        info = _run(["xfs_info", str(mnt)], "xfs_info") if shutil.which("xfs_info") else ""
        if "reflink=1" not in info.replace(" ", ""):
            raise ReflinkUnavailable(f"the XFS on {device} has no reflink: {info.strip()[:300]}")
        facts = {"backing file": f"{backing} ({size / GiB:.1f} GiB sparse)", "loop device": device,
                 "loop direct I/O": direct_io, "made and mounted in": f"{time.monotonic() - t0:.2f}s"}
        yield Xfs(mnt, device, facts)
    finally:
        _tearing_down = True
        try:
            notes = teardown(work)
        finally:
            _tearing_down = False
            for s, handler in previous.items():
                signal.signal(s, handler)
        for note in notes:
            print(f"warning: reflink XFS: {note}", file=sys.stderr, flush=True)
        if _pending:
            raise SystemExit(128 + _pending.pop())


def copy_closure(closure: Closure, dest: Path) -> Closure:
    """Copy the cached closure onto the XFS (`cp -a`: modes, times and hard links kept; data really copied, so
    the store's blocks are the XFS's own) and write it out, with its closureInfo rewritten for the new place."""
    target = dest / closure.directory.name
    remove_tree(target)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=never", str(closure.directory), str(target)], check=True)
    subprocess.run(["sync", "-f", str(target)], check=True)  # written out now, not during the first timed run
    for info in ("closure-info", "closure-info-nix"):
        _rewrite_prefix(target / info, str(closure.directory), str(target))
    return Closure(target, closure.manifest)


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem holding path (statvfs: blocks - free blocks, as df's Used)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


_EXTENT = re.compile(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+\d+\.\.\s*\d+:\s+(?P<length>\d+):.*?(?P<flags>\S*)$")


def shared_bytes(image: Path) -> int:
    """Bytes of the file in extents the filesystem flags `shared` (FIEMAP, read with e2fsprogs' filefrag -v)."""
    out = subprocess.run(["filefrag", "-v", "-b4096", str(image)], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        m = _EXTENT.match(line)
        if m and "shared" in m["flags"].split(","):
            total += int(m["length"]) * 4096
    return total
