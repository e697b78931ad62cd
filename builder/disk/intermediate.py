"""Where the raw image is written before convert, so that no format costs an extra write to disk.

raw (no VM stage): straight into the output transaction's private directory inside OUT
(builder/output.py), from where it is renamed into place, even when the build directory is on another
filesystem. qcow2, vdi, vpc, vmdk, qcow2-compressed: the raw image is only an intermediate, read once by
the converter. Where OUT is on the store's filesystem and that filesystem shares blocks (a Nix build's
$out on an XFS or btrfs store), it goes to that same private directory: the file data then shares the
store's blocks (builder/sandbox/e2fsdata.c) and costs neither a copy nor memory. Otherwise it goes to
memory (/dev/shm) when the memory can hold it; else, or when MDI_INTERMEDIATE=disk, to the scratch
directory on disk as before. With a VM stage (`build` only; the Nix
derivation keeps it in its build directory) the VM's memSize counts against that memory too.
It is removed when the build ends, done or failed; after a SIGKILL, by a janitor process (below).

"Can hold it": the closure's NAR size plus the contents, with the allocation overhead of small files and
ext4's metadata (x1.3 + 64 MiB), plus the VM's memSize when a VM runs beside it, must fit in three
places at once: /dev/shm's free space (the Nix sandbox's own tmpfs, sandbox-shm-size, 50% of RAM by
default), MemAvailable, and the memory cgroup's headroom (memory.max - memory.current over the build's
cgroup and its parents; tmpfs pages are charged to it), with 512 MiB to spare.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutOfHostSpace, UserError
from ..log import info
from ..output import Output
from ..signals import TERMINATING
from ..spec import Spec
from ..units import MiB, human
from .sparse import clones

# MDI_INTERMEDIATE=auto (default), memory or disk: where a converted format's raw intermediate goes.
CHOICE_ENV = "MDI_INTERMEDIATE"
# The memory-backed directory (default /dev/shm), for hosts whose tmpfs is elsewhere and for the tests.
MEMORY_DIR_ENV = "MDI_MEMORY_DIR"
SPARE = 512 * MiB


def estimated_bytes(spec: Spec) -> int | None:
    """An upper estimate of the bytes the raw image allocates: closure and contents, inflated for metadata.

    The closure's size is closureInfo's total-nar-size (nixpkgs' closure-info.nix writes it); None when it
    cannot be read (the registration itself is read once, by the build).
    """
    path = os.path.join(spec.closure_info, "total-nar-size")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            nar = int(os.read(fd, 64).decode().strip())
        finally:
            os.close(fd)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    contents = 0
    for entry in spec.contents:
        for source in glob.glob(entry.source) if entry.is_glob else [entry.source]:
            if os.path.isdir(source):
                for dirpath, _dirs, files in os.walk(source):
                    contents += sum(_size(os.path.join(dirpath, f)) for f in files)
            else:
                contents += _size(source)
    return int((nar + contents) * 1.3) + 64 * MiB + spec.boot_partition_end


def _size(path: str) -> int:
    """A file's size, 0 when it cannot be read: an estimate must not pre-empt staging's own error message."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_headroom() -> int | None:
    """The least memory.max - memory.current over this process's cgroup (v2) and every parent visible from it,
    or None when none has a limit: a limit is often set on a parent (nix-daemon.service's MemoryMax=)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    root = Path("/sys/fs/cgroup")
    base = root / path.lstrip("/")
    least: int | None = None
    for level in [base, *base.parents]:
        try:
            limit = (level / "memory.max").read_text().strip()
            if limit != "max":
                headroom = int(limit) - int((level / "memory.current").read_text())
                least = headroom if least is None else min(least, headroom)
        except (OSError, ValueError):
            pass
        if level == root:
            break
    return least


def memory_dir() -> Path:
    """The memory-backed directory the raw intermediate may go to."""
    return Path(os.environ.get(MEMORY_DIR_ENV) or "/dev/shm")


def memory_room() -> int:
    """Bytes a file in memory_dir() may take now: the least of its free space, MemAvailable, cgroup headroom."""
    try:
        st = os.statvfs(memory_dir())
    except OSError:
        return 0
    room = min(st.f_bavail * st.f_frsize, _mem_available())
    headroom = _cgroup_headroom()
    return room if headroom is None else min(room, headroom)


def _choice() -> str:
    """The MDI_INTERMEDIATE setting, checked."""
    choice = os.environ.get(CHOICE_ENV, "auto")
    if choice not in ("auto", "memory", "disk"):
        raise UserError(f"{CHOICE_ENV}={choice!r}: expected 'auto', 'memory' or 'disk'")
    return choice


def shares_store_blocks(spec: Spec, directory: Path) -> bool:
    """Whether a file in directory can share blocks with the store's files: the same filesystem, one that clones."""
    try:
        same = os.stat(directory).st_dev == os.stat(spec.store_dir).st_dev
    except OSError:
        return False
    return same and clones(directory)


def intermediate_parent(spec: Spec, scratch: Path, output: Output | None = None) -> Path:
    """The directory to hold a converted format's raw image (see the module docstring): beside the output when
    OUT shares blocks with the store (no VM stage), else memory or scratch."""
    choice = _choice()
    if choice == "disk":
        return scratch
    if choice == "auto" and output is not None and not spec.needs_vm and shares_store_blocks(spec, output.out):
        beside = output.staging  # made only now: a build that does not use it leaves none, even when killed
        info(f"raw intermediate beside the output ({beside}): its filesystem is the store's and shares blocks, "
             "so the image's file data shares the store's instead of being copied")
        return beside
    estimate = estimated_bytes(spec)
    if estimate is None and choice == "auto":
        info(f"raw intermediate on disk ({scratch}): closureInfo has no readable total-nar-size to size it by")
        return scratch
    need = (estimate or 0) + (spec.mem_size * MiB if spec.needs_vm else 0) + SPARE
    room = memory_room()
    if choice == "memory" or room >= need:
        info(f"raw intermediate in memory ({memory_dir()}): needs about {human(need)}, {human(room)} free")
        return memory_dir()
    info(f"raw intermediate on disk ({scratch}): it needs about {human(need)} of memory, {human(room)} free")
    return scratch


def _janitor(directory: Path) -> tuple[int, int]:
    """Fork a process that removes directory once this one has ended, however (a SIGKILL too): (pid, pipe fd).

    It waits for end-of-file on a pipe whose write end only the builder holds (and its forks: closed when
    they end), so memory is not left holding an image after a killed build, as a file in /dev/shm would.
    It ignores the signals that stop a build and leaves the terminal's session, so it outlives the builder.
    """
    read_end, write_end = _pipe_above_stdio()
    # Termination signals stay blocked across the fork until the child ignores them: one arriving in between
    # would run the builder's handler (and its cleanup) inside the janitor.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # the janitor: only system calls and a tree removal, then _exit
        try:
            os.setsid()
            for sig in TERMINATING:
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, read_end)
            os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
            while os.read(read_end, 1):
                pass
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    os.close(read_end)
    return pid, write_end


def _pipe_above_stdio() -> tuple[int, int]:
    """os.pipe() with both ends at fd 3 or above: when the builder runs with stdin, stdout or stderr closed,
    a plain pipe may get fd 0-2, which the janitor points at /dev/null (it would see EOF and remove at once)."""
    ends = os.pipe()
    try:
        return (fcntl.fcntl(ends[0], fcntl.F_DUPFD_CLOEXEC, 3), fcntl.fcntl(ends[1], fcntl.F_DUPFD_CLOEXEC, 3))
    finally:
        os.close(ends[0])
        os.close(ends[1])


def _reap(pid: int, timeout: float = 2.0) -> None:
    """Collect the janitor once it has seen the pipe close (it exits at once); do not wait on it for long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] != 0:
            return
        time.sleep(0.005)


@contextmanager
def raw_intermediate(spec: Spec, scratch: Path, output: Output) -> Iterator[Path]:
    """A path for the raw image: staged in output for raw without a VM stage; else in a temporary directory
    (memory or scratch) removed on exit, with the image if convert left it there."""
    if spec.format == "raw" and not spec.needs_vm:
        yield output.stage(spec.image_file_name)  # the transaction removes it if the build fails
        return
    parent = intermediate_parent(spec, scratch, output)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mdi-raw-", dir=parent))
    janitor = None
    try:
        if parent != scratch:  # scratch is removed by its owner; elsewhere a janitor removes it, even after SIGKILL
            janitor = _janitor(tmp)
        yield tmp / "nixos.raw"
    except OutOfHostSpace as exc:
        if parent != memory_dir():
            raise
        raise OutOfHostSpace(f"{exc}\n(the raw image was kept in memory; {CHOICE_ENV}=disk writes it to the "
                             "build directory instead)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if janitor is not None:
            os.close(janitor[1])
            _reap(janitor[0])
