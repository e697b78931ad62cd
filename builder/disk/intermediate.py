"""Where the raw image is written before convert, so that no format costs an extra write to disk.

raw: straight into the output transaction's private directory inside OUT (builder/output.py), where
convert leaves it to be renamed into place, even when the build directory is on another filesystem. qcow2, vdi, vpc, vmdk, qcow2-compressed:
the raw image is only an intermediate, read once by the converter, so it goes to memory (/dev/shm) when
the memory can hold it; else, or when MDI_INTERMEDIATE=disk, to the scratch directory on disk as before.
Either way it is removed when the build ends, done or failed.

"Can hold it": the closure's NAR size plus the contents, with the allocation overhead of small files and
ext4's metadata (x1.3 + 64 MiB), plus the VM's memSize when a VM runs beside it, must fit in three
places at once: /dev/shm's free space (the Nix sandbox's own tmpfs, sandbox-shm-size, 50% of RAM by
default), MemAvailable, and the memory cgroup's headroom (memory.max - memory.current; tmpfs pages are
charged to it), with 512 MiB to spare.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..log import info
from ..output import Output
from ..spec import Spec
from ..staging import store
from ..units import MiB, human

# MDI_INTERMEDIATE=auto (default), memory or disk: where a converted format's raw intermediate goes.
CHOICE_ENV = "MDI_INTERMEDIATE"
# The memory-backed directory (default /dev/shm), for hosts whose tmpfs is elsewhere and for the tests.
MEMORY_DIR_ENV = "MDI_MEMORY_DIR"
SPARE = 512 * MiB


def estimated_bytes(spec: Spec) -> int:
    """An upper estimate of the bytes the raw image allocates: closure and contents, inflated for metadata."""
    nar = sum(r.nar_size for r in store.read_closure(spec))
    contents = 0
    for entry in spec.contents:
        for source in glob.glob(entry.source) if entry.is_glob else [entry.source]:
            if os.path.isdir(source):
                for dirpath, _dirs, files in os.walk(source):
                    contents += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
            elif os.path.lexists(source):
                contents += os.lstat(source).st_size
    return int((nar + contents) * 1.3) + 64 * MiB + spec.boot_size


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
    """memory.max - memory.current of this process's cgroup (v2), or None when it has no limit."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), None)
        if path is None:
            return None
        base = Path("/sys/fs/cgroup") / path.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


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


def intermediate_parent(spec: Spec, scratch: Path) -> Path:
    """The directory to hold a converted format's raw image (see the module docstring): memory or scratch."""
    choice = _choice()
    if choice == "disk":
        return scratch
    need = estimated_bytes(spec) + (spec.mem_size * MiB if spec.needs_vm else 0) + SPARE
    room = memory_room()
    if choice == "memory" or room >= need:
        info(f"raw intermediate in memory ({memory_dir()}): needs about {human(need)}, {human(room)} free")
        return memory_dir()
    info(f"raw intermediate on disk ({scratch}): it needs about {human(need)} of memory, {human(room)} free")
    return scratch


@contextmanager
def raw_intermediate(spec: Spec, scratch: Path, output: Output) -> Iterator[Path]:
    """A path for the raw image: staged in output for raw without a VM stage; else in a temporary directory
    (memory or scratch) removed on exit, with the image if convert left it there."""
    if spec.format == "raw" and not spec.needs_vm:
        yield output.stage(spec.image_file_name)  # the transaction removes it if the build fails
        return
    parent = intermediate_parent(spec, scratch)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mdi-raw-", dir=parent))
    try:
        yield tmp / "nixos.raw"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
