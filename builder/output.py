"""The output directory (`--out OUT`): what one build puts there, written as one transaction.

The contract (docs/failure-behaviour.md):
- One build at a time: the builder holds an exclusive lock (flock) on OUT itself, so no lock file is left
  in it; a second build into the same OUT stops at once with "is in use by another build", changing nothing.
- Every file is first written under a fresh private directory inside OUT (`.make-disk-image-XXXXXXXX`),
  then renamed onto its name (`<baseName>.<ext>`, `efi-vars.fd`, `nix-support/hydra-build-products`):
  what was there is replaced, never written through (a symlink there is replaced, not followed).
- `nix-support/hydra-build-products` is written whole: this build's line, not appended to an older file.
- postVM runs after that, with the image at `$out/<file>` as in nixpkgs; then the path is printed.
- Until then any failure (a step, postVM, a signal, stdout full) puts OUT back as it was before the build:
  the files it installed are removed and those they replaced come back (kept as hard links meanwhile);
  `nix-support` and OUT itself are removed if the build made them. What postVM wrote elsewhere is its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BuildError, UserError

PRODUCTS = "nix-support/hydra-build-products"
STAGING_PREFIX = ".make-disk-image-"


@dataclass
class _Installed:
    """A file this build put into OUT: where (directory fd, name) and the backup of what it replaced."""

    dir_fd: int
    name: str
    backup: str | None  # name in the backup directory, None if nothing was there


@dataclass
class Output:
    """One build's transaction on OUT: stage files, install them, and undo it all unless it completes."""

    out: Path
    out_fd: int
    made_dirs: list[Path]  # OUT and the parents this build created, innermost first
    staging_dir: Path | None = None  # made when the first file is staged: a build killed before leaves none
    made_support: bool = False
    installed: list[_Installed] = field(default_factory=list)
    backup_fd: int | None = None  # the staging directory's "previous": what installed files replaced
    _fds: list[int] = field(default_factory=list)

    def stage(self, rel: str) -> Path:
        """Where to write the file that becomes OUT/rel: inside the private staging directory."""
        path = self.staging / "new" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def staging(self) -> Path:
        """The private directory inside OUT where files wait to be installed (made on first use)."""
        if self.staging_dir is None:
            self.staging_dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        return self.staging_dir

    def _support_fd(self) -> int:
        """OUT/nix-support opened as a directory, without following a symlink; made if missing."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open("nix-support", flags, dir_fd=self.out_fd)
        except FileNotFoundError:
            os.mkdir("nix-support", 0o755, dir_fd=self.out_fd)
            self.made_support = True
            fd = os.open("nix-support", flags, dir_fd=self.out_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise UserError(f"--out {str(self.out)!r}: {str(self.out / 'nix-support')!r} is not a directory "
                            "(a symlink or a file); the builder writes only into a real nix-support directory "
                            "inside the output directory") from None
        self._fds.append(fd)
        return fd

    def install(self) -> None:
        """Rename every staged file onto its name in OUT (the products file last), keeping what it replaces."""
        new = self.staging / "new"
        rels = sorted((str(p.relative_to(new)) for p in new.rglob("*") if not p.is_dir()),
                      key=lambda rel: (rel == PRODUCTS, rel))
        if self.backup_fd is None:
            backups = self.staging / "previous"
            backups.mkdir()
            self.backup_fd = os.open(backups, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._fds.append(self.backup_fd)
        for rel in rels:
            parent, _, name = rel.rpartition("/")
            if parent not in ("", "nix-support"):
                raise AssertionError(f"unexpected output file {rel!r}")
            dir_fd = self._support_fd() if parent else self.out_fd
            backup = self._keep_previous(dir_fd, name, rel, self.backup_fd, str(len(self.installed)))
            self.installed.append(_Installed(dir_fd, name, backup))
            os.replace(new / rel, name, dst_dir_fd=dir_fd)

    def _keep_previous(self, dir_fd: int, name: str, rel: str, backup_fd: int, backup: str) -> str | None:
        """Keep what is at name (a hard link, else moved aside) so a failed build can put it back; None if nothing."""
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"--out {str(self.out)!r}: {str(self.out / rel)!r} is a directory; the builder "
                            "replaces only files there")
        try:
            os.link(name, backup, src_dir_fd=dir_fd, dst_dir_fd=backup_fd, follow_symlinks=False)
        except OSError:  # e.g. protected_hardlinks for another user's file: moved aside instead
            os.rename(name, backup, src_dir_fd=dir_fd, dst_dir_fd=backup_fd)
        return backup

    def roll_back(self) -> None:
        """Put OUT back as it was: remove what this build installed, restore what it replaced, remove what it made."""
        for item in reversed(self.installed):
            try:
                os.unlink(item.name, dir_fd=item.dir_fd)
            except FileNotFoundError:
                pass  # postVM moved or removed it
            if item.backup is not None:
                os.rename(item.backup, item.name, src_dir_fd=self.backup_fd, dst_dir_fd=item.dir_fd)
        self.installed.clear()
        if self.made_support:
            try:
                os.rmdir("nix-support", dir_fd=self.out_fd)
            except OSError:
                pass  # postVM put something of its own there
        self._remove_staging()
        for made in self.made_dirs:
            try:
                made.rmdir()
            except OSError:
                break

    def _remove_staging(self) -> None:
        """Remove the staging directory, if one was made."""
        if self.staging_dir is not None:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            self.staging_dir = None

    def close(self) -> None:
        """Remove the staging directory (with the replaced files' backups) and release the lock."""
        self._remove_staging()
        for fd in self._fds:
            os.close(fd)
        os.close(self.out_fd)  # releases the flock


def _make_out(out: Path) -> list[Path]:
    """Create OUT (and missing parents); the directories made, innermost first. A non-directory is refused."""
    made: list[Path] = []
    for path in [out, *out.parents]:
        if os.path.lexists(path):
            break
        made.append(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--out {str(out)!r} is not a directory") from None
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is not a directory")
    return made


@contextmanager
def output_dir(out: Path) -> Iterator[Output]:
    """OUT locked for this build; leaving the block normally keeps what was installed, an exception undoes it."""
    out = out.absolute()
    made = _make_out(out)
    out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(out_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(out_fd)
        raise BuildError(f"--out {str(out)!r} is in use by another build (it holds the lock on that directory); "
                         "nothing was changed: wait for it to finish, or use another output directory") from None
    try:  # OUT must be writable: found out now, not after the whole build
        os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    except OSError as exc:
        os.close(out_fd)
        raise BuildError(f"--out {str(out)!r}: cannot write there ({exc.strerror})") from None
    output = Output(out, out_fd, made)
    try:
        yield output
    except BaseException:
        output.roll_back()
        raise
    finally:
        output.close()
