"""Reading input files the user names (the spec, closureInfo's registration) with a bound on their size, and
which host files a spec may name at all (docs/trust.md)."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

CHUNK = 1 << 20


def read_at_most(f: BinaryIO, limit: int) -> bytearray:
    """The file's bytes, or its first limit + 1 bytes when it is longer (the caller refuses those).

    Read in 1 MiB pieces into one growing buffer: `f.read(limit + 1)` would allocate the whole bound up
    front (512 MiB for a registration), which a build machine without overcommit, or under a memory limit,
    refuses; a list of pieces joined at the end would need twice what was read.
    """
    data = bytearray()
    while len(data) <= limit:
        chunk = f.read(min(CHUNK, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def open_regular(path: str | os.PathLike[str], allow_pipe: bool = False) -> BinaryIO:
    """Open a file the user names for reading, refusing (OSError, "not a regular file") anything else first.

    Opened without blocking, so a FIFO nobody writes is refused (or with allow_pipe, read as empty: a pipe
    whose writer is there, `<(...)`, reads as usual) rather than waited on, and checked before a byte is read,
    so /dev/zero or a device is not read up to the size bound.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (allow_pipe and stat.S_ISFIFO(mode))):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise OSError(f"{kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# The kernel's and devices' views of the build host: never a file to put in an image (/proc/self/environ
# holds the builder's own environment). Checked after resolving symlinks.
HOST_ONLY = ("/proc", "/sys", "/dev")


def host_only_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a host file named by the spec is refused (it resolves under /proc, /sys or /dev), or None.

    A symlink source is resolved up to its parent only: it is copied as the link itself, not followed.
    """
    path = os.fspath(path)
    resolved = (os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
                if os.path.islink(path) else os.path.realpath(path))
    for top in HOST_ONLY:
        if resolved == top or resolved.startswith(top + "/"):
            shown = "" if resolved == path else f" (it resolves to {resolved!r})"
            return (f"{path!r} is under {top}{shown}: files of {', '.join(HOST_ONLY)} describe the build host, "
                    "not an image, and are refused (docs/trust.md)")
    return None


# Filesystems that are views of the running kernel, wherever they are mounted (a chroot's proc, say).
HOST_VIEWS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "debugfs", "securityfs", "efivarfs", "tracefs",
                        "cgroup", "cgroup2", "configfs", "pstore", "bpf", "fusectl"})


def host_view_devices(mountinfo: str = "/proc/self/mountinfo") -> dict[int, str]:
    """st_dev -> filesystem type of every mount of a HOST_VIEWS filesystem (proc(5) mountinfo fields)."""
    found: dict[int, str] = {}
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        fstype = fields[fields.index("-", 6) + 1]
        if fstype in HOST_VIEWS:
            major, minor = fields[2].split(":")
            found[os.makedev(int(major), int(minor))] = fstype
    return found


def host_view_problem(path: str | os.PathLike[str], st: os.stat_result, devices: dict[int, str]) -> str | None:
    """Why a directory met in a source tree is refused (a mount of proc, sysfs... in it, see HOST_VIEWS), or None."""
    fstype = devices.get(st.st_dev)
    if fstype is None:
        return None
    return (f"{os.fspath(path)!r} is on a {fstype} mount: such filesystems describe the build host, not an image, "
            "and are refused wherever they are mounted (docs/trust.md)")
