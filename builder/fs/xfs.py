"""The root xfs: mkfs.xfs -p protofile into its own file; the protofile states every owner and mode.

mkfs.xfs has no offset and no directory import, but its prototype file lists each entry with type,
mode, uid, gid and source, read straight from the store (no namespace, no root). Limits of the format,
handled here: names are whitespace-separated tokens (names with whitespace are refused), only the
setuid/setgid bits and three octal digits fit (sticky bits are set afterwards with xfs_db), and there
are no hard links (each link becomes its own copy, counted in the size). Times come from the clock
(pinned by libfaketime when deterministic).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .. import rules
from ..errors import BuildError, UserError
from ..process import run
from ..sandbox.fakeroot import run_tool
from ..units import MiB, align_up
from .build import NoSpace, RootBuild

# xfsprogs >= 5.19 refuses smaller filesystems (builder/rules.json).
MIN_BYTES = rules.fs_types()["xfs"].min_bytes
TYPE_CHAR = {stat.S_IFREG: "-", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
             stat.S_IFIFO: "p"}


def needed_bytes(data_bytes: int, inodes: int, free: int) -> int:
    """A first guess of the xfs size: data (hard links counted per link), inodes, log and free space."""
    return max(MIN_BYTES, align_up(int(data_bytes * 1.05) + inodes * 1024 + free + 80 * MiB, MiB))


def _mode_token(mode: int) -> str:
    """The protofile's six-character mode: type, setuid, setgid, three octal digits."""
    kind = TYPE_CHAR.get(stat.S_IFMT(mode))
    if kind is None:
        raise UserError("fsType = \"xfs\" cannot hold sockets")
    suid = "u" if mode & stat.S_ISUID else "-"
    sgid = "g" if mode & stat.S_ISGID else "-"
    return f"{kind}{suid}{sgid}{mode & 0o777:03o}"


def _check_name(name: str, image_path: str) -> None:
    """Refuse names the protofile tokenizer would misread."""
    if not name or re.search(r"\s", name) or name == "$" or name.startswith(":"):
        raise UserError(f"fsType = \"xfs\" cannot hold {image_path!r}: mkfs.xfs prototype files cannot name "
                        "entries containing whitespace, starting with ':' or equal to '$'; use fsType = \"ext4\"")


def protofile(build: RootBuild) -> tuple[str, list[str], int]:
    """The prototype text, image paths of sticky directories and the data bytes (per link)."""
    owners = {f.image_path: (f.uid, f.gid) for f in build.owner_fixes}
    modes = {m.image_path: m.mode for m in build.mode_fixes}
    sticky: list[str] = []
    data = 0
    lines = ["mdi-root", "0 0"]

    def entry(staged: str, image_path: str, depth: int) -> None:
        nonlocal data
        real = build.real_path(staged)
        st = os.lstat(real)
        uid, gid = owners.get(image_path, (0, 0))
        mode = modes.get(image_path, st.st_mode)
        token = _mode_token(mode)
        if mode & stat.S_ISVTX:
            sticky.append(image_path)
        name = "" if depth == 0 else os.path.basename(image_path)
        head = ("  " * depth) + (f"{name} " if depth else "") + f"{token} {uid} {gid}"
        if stat.S_ISDIR(st.st_mode):
            lines.append(head)
            for child in sorted(os.listdir(real)):
                child_image = image_path.rstrip("/") + "/" + child
                _check_name(child, child_image)
                entry(os.path.join(staged, child), child_image, depth + 1)
            lines.append(("  " * depth) + "$")
        elif stat.S_ISREG(st.st_mode):
            data += align_up(st.st_size, 4096)
            lines.append(f"{head} {real}")
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(real)
            if re.search(r"\s", target) or not target:
                raise UserError(f"fsType = \"xfs\" cannot hold the symlink {image_path!r} -> {target!r}: prototype "
                                "files cannot express targets with whitespace; use fsType = \"ext4\"")
            lines.append(f"{head} {target}")
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            lines.append(f"{head} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
        else:
            lines.append(head)

    entry(str(build.root), "/", 0)
    return "\n".join(lines) + "\n", sticky, data


def make(build: RootBuild, fs_file: Path, size: int) -> None:
    """Create an xfs of size bytes in fs_file from the protofile, then restore sticky bits with xfs_db."""
    text, sticky, _ = protofile(build)
    proto = build.scratch / "xfs.proto"
    proto.write_text(text)
    fs_file.unlink(missing_ok=True)
    with open(fs_file, "wb") as f:
        f.truncate(size)
    argv = ["mkfs.xfs", "-q", "-f", "-L", build.label, "-p", str(proto), str(fs_file)]
    if build.uuid:
        argv[1:1] = ["-m", f"uuid={build.uuid}"]
    res = run_tool(argv, binds=(), scratch=build.scratch, epoch=build.epoch)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        if "No space left" in msg or "ENOSPC" in msg:
            raise NoSpace(msg)
        raise BuildError(f"mkfs.xfs -p failed: {msg}")
    for path in sticky:
        _set_sticky(fs_file, path)


def _set_sticky(fs_file: Path, image_path: str) -> None:
    """Add the sticky bit to a directory's mode with xfs_db (the protofile cannot express it)."""
    res = run(["xfs_db", "-r", "-c", f"path {image_path}", "-c", "inode", "-c", "print core.mode", str(fs_file)],
              ok=None)
    m = re.search(r"core\.mode = (\d+)", res.stdout)
    if res.returncode != 0 or not m:
        # xfs_db `path` needs the directory walk; fall back to the inode number from `ls`.
        raise BuildError(f"xfs_db could not read {image_path}: {res.stderr.strip() or res.stdout.strip()}")
    mode = int(m.group(1), 8) | stat.S_ISVTX
    run(["xfs_db", "-x", "-c", f"path {image_path}", "-c", "inode", "-c", f"write core.mode 0{mode:o}", str(fs_file)],
        f"xfs_db could not set the sticky bit of {image_path}")


def free_bytes(fs_file: Path) -> int:
    """Free bytes of the xfs (superblock fdblocks * blocksize)."""
    res = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print fdblocks blocksize", str(fs_file)], ok=None)
    fd = re.search(r"fdblocks = (\d+)", res.stdout)
    bs = re.search(r"blocksize = (\d+)", res.stdout)
    if res.returncode != 0 or not fd or not bs:
        raise BuildError(f"xfs_db could not read the superblock: {res.stderr.strip()}")
    return int(fd.group(1)) * int(bs.group(1))


def check(fs_file: Path) -> None:
    """xfs_repair -n must find the filesystem clean."""
    run(["xfs_repair", "-n", "-f", str(fs_file)], "xfs_repair -n found problems in the root filesystem")
