"""Directories and files written into the staged root without following any symlink on the way.

Defence in depth for the builder's own writes (GRUB's /boot, the ESP's mount points): contents are checked
first (staging/contents.py check_builder_paths), and here a symlink met anyway fails the build instead of
redirecting the write to the build host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import BuildError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def open_dir(root: Path, rel: str, mode: int = 0o755) -> Iterator[int]:
    """An fd of root/rel, each missing component made with mode, none followed if it is a symlink."""
    fd = os.open(root, _DIR)
    try:
        for part in [p for p in rel.split("/") if p]:
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR, dir_fd=fd)
            except OSError as exc:  # ELOOP for a symlink, ENOTDIR for anything else
                raise BuildError(f"{root}/{rel}: {part!r} is not a directory the builder made ({exc.strerror}); "
                                 "refusing to write through it") from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def make_dir(root: Path, rel: str, mode: int | None, epoch: int | None = None) -> None:
    """mkdir -p root/rel, then chmod the last component to mode and its mtime to epoch (each when given),
    without following symlinks."""
    with open_dir(root, rel) as fd:
        if mode is not None:
            os.fchmod(fd, mode)
        if epoch is not None:
            os.utime(fd, (epoch, epoch))


def write_file(root: Path, rel: str, data: bytes, mode: int, epoch: int) -> None:
    """Write root/rel (its directory exists) with mode and mtime epoch; a symlink there fails the build."""
    parent, _, name = rel.rpartition("/")
    with open_dir(root, parent) as dfd:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         mode, dir_fd=dfd)
        except OSError as exc:
            raise BuildError(f"{root}/{rel}: cannot be written without following a link ({exc.strerror})") from None
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fchmod(fd, mode)
            os.utime(fd, (epoch, epoch))
        finally:
            os.close(fd)
