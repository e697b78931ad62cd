"""Measure what the root filesystem will hold and size it tightly: data counted once, metadata measured.

The estimate walks the staged root and, in forked workers (StoreMeasure), the store paths bound over
its placeholders, counting each inode once (hard links shared), 4 KiB blocks for file data, directory
blocks from their entries, long symlinks and extent blocks. The filesystem's own overhead (inode
tables, bitmaps, journal, reserved GDT) is measured by running mkfs on an empty sparse file of the
candidate size.

The store walk also checks each store file against what its NAR can express (nar_mode, store_file_problem):
Nix's store holds only regular files, directories and symlinks, with modes 0444/0555 and no extended
attributes; what differs is recorded (StoreFix) for the filesystem writer to canonicalise, what no NAR
can hold (FIFOs, sockets, devices) refuses the build.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError, UserError
from ..signals import TERMINATING, die_with_parent

BLOCK = 4096
DIR_TAIL = 12  # metadata_csum dirent tail per directory block
EXTENTS_PER_LEAF = 340
MAX_EXTENT_BLOCKS = 32768
FAST_SYMLINK_MAX = 59
DX_ROOT_LIMIT = (BLOCK - 32 - 8) // 8  # index slots in an htree root block (after . and .., dx_tail)
DX_NODE_LIMIT = (BLOCK - 8 - 8) // 8  # and in an interior index block
MAX_WORKERS = 4


# A store path's files as measured: (entries, bytes, the sum of their ctimes in ns). Growing, writing, replacing,
# adding or removing a file changes one of them (any change of a file sets its ctime to the present).
Fingerprint = tuple[int, int, int]


@dataclass(frozen=True)
class StoreFix:
    """A store file whose metadata is not what its NAR gives: the mode to set, the extended attributes to drop.

    labels are the attributes Nix leaves on store files (HOST_LABELS): not a forgery, but not the image's either.
    """

    path: str  # the real path under the store directory
    mode: int  # st_mode as the NAR gives it (nar_mode)
    xattrs: tuple[str, ...]
    labels: tuple[str, ...] = ()
    forged: bool = True  # Nix would not have left it so: a mode other than its NAR's, or a foreign attribute


class StoreRefused(Exception):
    """A store path holds a file no NAR can express (raised in a sizing worker, a UserError in the builder)."""


def nar_mode(mode: int) -> int:
    """st_mode as Nix gives a store file: dirs 0555, files 0555 when owner-executable else 0444, symlinks as they are.

    The NAR records only "executable" for a regular file (src/libutil/archive.cc); Nix's
    canonicalisePathMetaData (src/libstore/posix-fs-canonicalise.cc) chmods every non-symlink to
    0444 | (S_IXUSR or directory ? 0111 : 0), dropping setuid, setgid and sticky bits.
    """
    if stat.S_ISLNK(mode):
        return mode
    if stat.S_ISDIR(mode):
        return stat.S_IFDIR | 0o555
    return stat.S_IFMT(mode) | (0o555 if mode & stat.S_IXUSR else 0o444)


def store_file_problem(path: str, mode: int) -> str | None:
    """Why a store file cannot be in a Nix store (its type is none a NAR holds), or None."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a file of unknown type")
    return (f"store file {path!r} is {kind}: a Nix store path holds only regular files, directories and symlinks "
            "(what a NAR can express; Nix's archive.cc refuses other types), so this store is damaged or forged")


# The st_mode of every file Nix's store can hold (Linux symlinks are always 0777): all else is checked further.
_CANONICAL = frozenset({stat.S_IFREG | 0o444, stat.S_IFREG | 0o555, stat.S_IFDIR | 0o555, stat.S_IFLNK | 0o777})


def _xattrs(path: str) -> list[str]:
    """The extended attributes' names of a file itself (not a symlink's target); none where the filesystem has none."""
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.ENODATA):
            raise
        return []


# The attributes Nix's canonicalisePathMetaData leaves on store files (src/libstore/posix-fs-canonicalise.cc,
# ignoredAcls): an SELinux host labels every store file, an NFSv4 store carries ACLs. They belong to the build
# host, so the image is written without them, but they do not make a store file forged.
HOST_LABELS = frozenset({"security.selinux", "system.nfs4_acl", "security.csm"})


def _check_odd(path: str, mode: int, names: list[str], odd: list[StoreFix]) -> None:
    """Refuse a file no NAR holds; record one whose mode or extended attributes are not what Nix gives it."""
    why = store_file_problem(path, mode)
    if why:
        raise StoreRefused(why)
    foreign = tuple(n for n in names if n not in HOST_LABELS)
    if names or nar_mode(mode) != mode:
        odd.append(StoreFix(path, nar_mode(mode), foreign, tuple(n for n in names if n in HOST_LABELS),
                            bool(foreign) or nar_mode(mode) != mode))


@dataclass(frozen=True)
class Usage:
    """What a tree costs in an ext4 with 4 KiB blocks, metadata of the empty filesystem excluded."""

    inodes: int
    blocks: int
    file_bytes: int  # apparent bytes of unique regular files (the "closure size" of reports)
    store_fixes: tuple[StoreFix, ...] = ()  # store files whose metadata the image must canonicalise
    store_prints: Mapping[str, Fingerprint] = field(default_factory=dict)  # to tell a store that changed meanwhile


def _htree_blocks(entry_bytes: int) -> int:
    """Blocks of the hash-indexed directory e2fsck -D makes of entries taking entry_bytes (e2fsck/rehash.c).

    A root block (. and .. and the index), leaves closed once less than a fifth of a block is left
    (indexed_dir_slack_percentage 20), and index blocks when the root's 507 slots do not hold every leaf.
    """
    fill = (BLOCK - DIR_TAIL) * 4 // 5
    leaves = entry_bytes // fill + 1
    index = -(-leaves // DX_NODE_LIMIT) if leaves > DX_ROOT_LIMIT else 0
    return 1 + leaves + index


def _dir_blocks(names: list[str]) -> int:
    """Blocks of an ext4 directory holding these names (plus . and ..), with its extent block.

    mkfs writes it linear; of two blocks or more, e2fsck -fyD makes it indexed (builder/fs/ext.py).
    """
    usable = BLOCK - DIR_TAIL
    # An entry takes 8 bytes + the name's bytes, rounded up to 4 (store names are ASCII: no encoding needed).
    if "".join(names).isascii():
        recs = [(len(n) + 11) & ~3 for n in names]
    else:
        recs = [(len(os.fsencode(n)) + 11) & ~3 for n in names]
    if 24 + sum(recs) <= usable:  # most directories: one block
        return 1
    blocks, used = 1, 24
    for rec in recs:
        if used + rec > usable:
            blocks += 1
            used = rec
        else:
            used += rec
    if blocks > 1:
        blocks = max(blocks, _htree_blocks(sum(recs)))
    if blocks > 4:
        blocks += -(-blocks // EXTENTS_PER_LEAF)
    return blocks


def _file_blocks(size: int) -> int:
    """Blocks of a regular file's data, plus an extent leaf when it needs more than four extents."""
    data = -(-size // BLOCK)
    extents = -(-data // MAX_EXTENT_BLOCKS) + data // (4 * MAX_EXTENT_BLOCKS)
    return data + (1 if extents > 4 else 0)


@dataclass
class _Partial:
    """Usage of part of a tree; inodes with more than one link are kept apart so each is counted once."""

    inodes: int = 0
    blocks: int = 0
    file_bytes: int = 0
    links: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (dev, ino) -> (blocks, bytes)
    odd: list[StoreFix] = field(default_factory=list)  # store files only (_walk with check)
    prints: dict[str, Fingerprint] = field(default_factory=dict)  # store path -> its fingerprint (_walk with check)

    def add(self, st: os.stat_result) -> None:
        """Count one non-directory inode."""
        mode, size = st.st_mode, st.st_size
        if stat.S_ISREG(mode):
            blocks, data = _file_blocks(size), size
        else:
            blocks, data = (1 if stat.S_ISLNK(mode) and size > FAST_SYMLINK_MAX else 0), 0
        if st.st_nlink > 1:
            self.links[(st.st_dev, st.st_ino)] = (blocks, data)
        else:
            self.inodes += 1
            self.blocks += blocks
            self.file_bytes += data


def _walk(tops: Sequence[str], placeholders: Mapping[str, list[str]] | None = None, check: bool = False) -> _Partial:
    """Measure each top (a tree or a single file); placeholders (names by directory, on disk or not yet)
    count only as names in their directory: what is bound over them is measured apart.

    One scandir per directory: entry types come from the directory itself, so only non-directories are
    stat'ed, once each. check (store paths): every entry, directories too, is stat'ed and checked against
    its NAR, and each top's fingerprint kept (changed_store_paths).
    """
    part = _Partial()
    if check:
        for top in tops:
            part.prints[top] = _walk_store(part, top)
        return part
    dirs: list[str] = []
    for top in tops:
        st = os.lstat(top)
        if stat.S_ISDIR(st.st_mode):
            dirs.append(top)
        else:
            part.add(st)
    while dirs:
        directory = dirs.pop()
        part.inodes += 1
        names = list(placeholders.get(directory, ())) if placeholders else []
        listed = frozenset(names)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name in listed:
                    continue
                names.append(entry.name)
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path)
                else:
                    part.add(entry.stat(follow_symlinks=False))
        part.blocks += _dir_blocks(names)
    return part


def _walk_store(part: _Partial, top: str) -> Fingerprint:
    """_walk of one store path, each entry checked against its NAR (_check_odd); its fingerprint.

    The sizing walk is on the build's critical path: the common case (a canonical mode, no attribute) costs
    an lstat, a listxattr and a set lookup per entry.
    """
    odd = part.odd
    count = size = ctimes = 0
    st = os.lstat(top)
    xattrs = _xattrs(top)
    if xattrs or st.st_mode not in _CANONICAL:
        _check_odd(top, st.st_mode, xattrs, odd)
    count, size, ctimes = 1, st.st_size, st.st_ctime_ns
    if not stat.S_ISDIR(st.st_mode):
        part.add(st)
        return count, size, ctimes
    dirs = [top]
    while dirs:
        directory = dirs.pop()
        part.inodes += 1
        names = []
        with os.scandir(directory) as entries:
            for entry in entries:
                names.append(entry.name)
                path = entry.path
                st = entry.stat(follow_symlinks=False)
                xattrs = _xattrs(path)
                if xattrs or st.st_mode not in _CANONICAL:
                    _check_odd(path, st.st_mode, xattrs, odd)
                count += 1
                size += st.st_size
                ctimes += st.st_ctime_ns
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(path)
                else:
                    part.add(st)
        part.blocks += _dir_blocks(names)
    return count, size, ctimes


def changed_store_paths(prints: Mapping[str, Fingerprint]) -> list[str]:
    """The store paths whose files differ now (count, sizes, ctimes) from when they were measured."""
    changed = []
    for top, before in sorted(prints.items()):
        try:
            now = _walk([top], check=True).prints[top]
        except (OSError, StoreRefused):
            now = None
        if now != before:
            changed.append(top)
    return changed


def _combine(parts: Sequence[_Partial]) -> Usage:
    """Add partial usages up, each hard-linked inode once however many parts met it."""
    links: dict[tuple[int, int], tuple[int, int]] = {}
    for part in parts:
        links.update(part.links)
    return Usage(
        inodes=sum(p.inodes for p in parts) + len(links),
        blocks=sum(p.blocks for p in parts) + sum(b for b, _ in links.values()),
        file_bytes=sum(p.file_bytes for p in parts) + sum(n for _, n in links.values()),
        store_fixes=tuple(sorted((f for p in parts for f in p.odd), key=lambda f: f.path)),
        store_prints={top: fp for p in parts for top, fp in p.prints.items()},
    )


class StoreMeasure:
    """Store paths measured in forked worker processes, one per CPU (up to 4), from creation on.

    Reading the metadata of tens of thousands of inodes is mostly system-call time, which scales with
    cores; started before the root is staged, it also overlaps the staging. Store paths that are symlinks
    are skipped: the staging root holds them as copies, measured with it.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        tops = [p for p in paths if not os.path.islink(p)]
        self.paths = frozenset(tops)
        n = max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS, len(tops)))
        self._workers: list[tuple[int, int]] = []  # (pid, read end of its pipe)
        try:
            for i in range(n):
                self._workers.append(_fork_worker(tops[i::n]))
        except BaseException:
            self.close()
            raise

    def result(self) -> list[_Partial]:
        """Wait for every worker; a worker's failure (a vanished path, no permission) is a BuildError, a store
        file no NAR holds a UserError."""
        parts = []
        while self._workers:
            pid, fd = self._workers.pop()
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            kind, value = pickle.loads(data) if data else ("error", "a sizing worker died")
            if kind == "refuse":
                self.close()
                raise UserError(f"system.closureInfo: {value}")
            if kind != "ok" or not isinstance(value, _Partial):
                self.close()
                raise BuildError(f"measuring the closure failed: {value}")
            parts.append(value)
        return parts

    def close(self) -> None:
        """Stop workers not waited for yet (the build failed or was interrupted)."""
        while self._workers:
            pid, fd = self._workers.pop()
            os.close(fd)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def __enter__(self) -> StoreMeasure:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fork_worker(tops: list[str]) -> tuple[int, int]:
    """Fork a process that measures tops and writes ("ok", _Partial) or ("error", message) to a pipe."""
    read_end, write_end = os.pipe()
    # Termination signals stay blocked across the fork until the child has its own (default) handlers:
    # one arriving in between would run the builder's handler inside the child's at-fork hooks.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(write_end)
        return pid, read_end
    status = 0
    try:
        os.close(read_end)
        for sig in TERMINATING:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        die_with_parent()
        try:
            payload: tuple[str, object] = ("ok", _walk(tops, check=True))
        except StoreRefused as exc:
            payload = ("refuse", str(exc))
        except OSError as exc:
            payload = ("error", str(exc))
        with os.fdopen(write_end, "wb") as f:
            f.write(pickle.dumps(payload))
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def measure(root: Path, substitutes: dict[str, str], store: StoreMeasure | None = None) -> Usage:
    """Measure root, each path listed in substitutes (staged placeholder -> real path) read from its source.

    The placeholders need not exist yet (they may be made in mkfs's namespace). store, when given, is the
    measurement of the sources already under way (started for the same paths).
    """
    if store is not None and store.paths != frozenset(substitutes.values()):
        raise AssertionError("the running store measurement is for other paths than the staged placeholders")
    with store or StoreMeasure(list(substitutes.values())) as running:
        placeholders: dict[str, list[str]] = {}
        for dest in substitutes:
            parent, name = os.path.split(dest)
            placeholders.setdefault(parent, []).append(name)
        staged = _walk([str(root)], {d: sorted(n) for d, n in placeholders.items()})
        return _combine([staged, *running.result()])


def inode_count(fs_bytes: int, used_inodes: int, additional: int) -> int:
    """Inodes to create: mke2fs' default ratio (16 KiB), or enough for the tree plus headroom if more."""
    return max(fs_bytes // 16384, used_inodes + additional // 16384 + 64, 1024)
