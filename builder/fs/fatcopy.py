"""Write directories and files into a FAT partition of the image with mtools, unprivileged and reproducibly.

FAT cannot be mounted on the build host (DESIGN §5), and prepare runs without root anyway, so files go
in with mtools at the partition's offset (`image@@offset`). Every directory and file is created in
sorted order, one mtools call each, with SOURCE_DATE_EPOCH as mtools' clock: the same input gives the
same bytes. (`mcopy -m` is not used: it would keep the store's mtime of 1970, which FAT cannot hold and
mtools 4.0.32 wraps to 2098.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..disk.layout import Partition
from ..errors import BuildError, UserError
from ..process import output_tail, run


def mtools_env(epoch: int) -> dict[str, str]:
    """mtools' environment: the epoch as its clock, UTC, no drive-geometry check against the image file."""
    return dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), TZ="UTC", MTOOLS_SKIP_CHECK="1")


def _mtools(argv: list[str], epoch: int, what: str) -> None:
    """Run one mtools command; BuildError naming `what`, with a hint when the partition is full."""
    res = run(argv, ok=None, env=mtools_env(epoch))
    if res.returncode != 0:
        message = output_tail(res)
        if "full" in message.lower():
            message += " (the partition is too small for these files: give a larger bootSize)"
        raise BuildError(f"{what} failed (exit {res.returncode}): {message}")


def free_bytes(image: Path, partition: Partition) -> int:
    """Free bytes of the FAT filesystem, as `mdir` counts them."""
    res = run(["mdir", "-i", f"{image}@@{partition.start}", "::/"], ok=None, env=mtools_env(0))
    for line in res.stdout.splitlines():
        if line.strip().endswith("bytes free"):
            return int("".join(c for c in line if c.isdigit()))
    raise BuildError(f"cannot read the free space of the {partition.label} FAT partition: {res.stderr.strip()}")


def write_files(image: Path, partition: Partition, directories: list[str], files: list[tuple[str, Path]],
                epoch: int) -> None:
    """Create `directories` (relative paths) and copy `files` (relative destination, local source) into the FAT.

    Parents are created before children; a directory already created under another letter case is not
    created again (FAT names are case-insensitive).
    """
    drive = f"{image}@@{partition.start}"
    made: set[str] = set()
    wanted = set(directories) | {str(Path(dest).parent) for dest, _ in files}
    for directory in sorted(wanted):
        parts = [p for p in directory.split("/") if p and p != "."]
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path.lower() in made:
                continue
            _mtools(["mmd", "-i", drive, f"::/{path}"], epoch, f"mmd ::/{path} on {partition.label}")
            made.add(path.lower())
    for dest, source in sorted(files):
        _mtools(["mcopy", "-i", drive, str(source), f"::/{dest}"], epoch, f"mcopy to ::/{dest} on {partition.label}")


def data_file(scratch: Path, data: bytes) -> Path:
    """A scratch file holding `data`, for mcopy to read."""
    fd, name = tempfile.mkstemp(prefix="fat-", dir=scratch)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


class LoaderFile(Protocol):
    """A bootloader's file: its path in the partition, and a source file or its bytes."""

    @property
    def path(self) -> str:
        """Its path in the partition."""

    @property
    def source(self) -> str | None:
        """The file to copy, or None for data."""

    @property
    def data(self) -> bytes | None:
        """Its bytes when there is no source."""


def install_files(image: Path, partition: Partition, directories: list[str], files: Iterable[LoaderFile],
                  scratch: Path, epoch: int, loader: str, bulk: str) -> None:
    """Copy a bootloader's files into a FAT partition, refused before any write when they do not fit.

    loader names it and bulk says what takes the room, for the message that asks for a larger bootSize.
    """
    sources = [(f.path, Path(f.source) if f.source is not None else data_file(scratch, f.data or b""))
               for f in files]
    need = sum(os.path.getsize(src) for _, src in sources)
    free = free_bytes(image, partition)
    if need > free:
        raise UserError(f"the {partition.label} partition ({partition.size // (1 << 20)} MiB, {free} bytes free) "
                        f"cannot hold {loader}'s files ({need} bytes: {bulk}); give a larger bootSize")
    write_files(image, partition, directories, sources, epoch)
