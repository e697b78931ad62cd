"""Measure what the root filesystem will hold and size it tightly: data counted once, metadata measured.

The estimate walks the staged root and, in forked workers (StoreMeasure), the store paths bound over
its placeholders, counting each inode once (hard links shared), 4 KiB blocks for file data, directory
blocks from their entries, long symlinks and extent blocks. The filesystem's own overhead (inode
tables, bitmaps, journal, reserved GDT) is measured by running mkfs on an empty sparse file of the
candidate size.
"""

from __future__ import annotations

import os
import pickle
import signal
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from ..signals import TERMINATING, die_with_parent

BLOCK = 4096
DIR_TAIL = 12  # metadata_csum dirent tail per directory block
EXTENTS_PER_LEAF = 340
MAX_EXTENT_BLOCKS = 32768
FAST_SYMLINK_MAX = 59
DX_ROOT_LIMIT = (BLOCK - 32 - 8) // 8  # index slots in an htree root block (after . and .., dx_tail)
DX_NODE_LIMIT = (BLOCK - 8 - 8) // 8  # and in an interior index block
MAX_WORKERS = 4


@dataclass(frozen=True)
class Usage:
    """What a tree costs in an ext4 with 4 KiB blocks, metadata of the empty filesystem excluded."""

    inodes: int
    blocks: int
    file_bytes: int  # apparent bytes of unique regular files (the "closure size" of reports)


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


def _walk(tops: Sequence[str], placeholders: Mapping[str, list[str]] | None = None) -> _Partial:
    """Measure each top (a tree or a single file); placeholders (names by directory, on disk or not yet)
    count only as names in their directory: what is bound over them is measured apart.

    One scandir per directory: entry types come from the directory itself, so only non-directories are
    stat'ed, once each.
    """
    part = _Partial()
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


def _combine(parts: Sequence[_Partial]) -> Usage:
    """Add partial usages up, each hard-linked inode once however many parts met it."""
    links: dict[tuple[int, int], tuple[int, int]] = {}
    for part in parts:
        links.update(part.links)
    return Usage(
        inodes=sum(p.inodes for p in parts) + len(links),
        blocks=sum(p.blocks for p in parts) + sum(b for b, _ in links.values()),
        file_bytes=sum(p.file_bytes for p in parts) + sum(n for _, n in links.values()),
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
        """Wait for every worker; a worker's failure (a vanished path, no permission) is a BuildError."""
        parts = []
        while self._workers:
            pid, fd = self._workers.pop()
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            kind, value = pickle.loads(data) if data else ("error", "a sizing worker died")
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
            payload: tuple[str, object] = ("ok", _walk(tops))
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
