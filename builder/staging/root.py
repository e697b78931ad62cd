"""The staging root: contents, Nix state and a placeholder for every store path, as the image's tree.

Nothing of the closure is copied: each store path is bound over its placeholder when mkfs reads the
tree (builder/sandbox/namespace.py), or copied in when user namespaces are not allowed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..log import info
from ..process import run
from ..sandbox.namespace import userns_available
from ..spec import Spec
from . import store
from .contents import ModeFix, OwnerFix, place_config_file, stage_contents
from .nofollow import make_dir


@dataclass(frozen=True)
class StagedRoot:
    """The staged root: a directory of everything but the store, and where each store path goes in it."""

    root: Path
    store_binds: tuple[tuple[str, str], ...]  # (store path, placeholder in root)
    owner_fixes: tuple[OwnerFix, ...]
    mode_fixes: tuple[ModeFix, ...]  # contents whose image mode differs from the staged copy's (staging/contents.py)
    # The staged store directory when its placeholders are made on a tmpfs inside mkfs's namespace
    # (builder/sandbox/namespace.py) rather than on disk; None when they are on disk.
    lazy_store: str | None = None


def _set_times(root: Path, epoch: int, keep: set[str]) -> None:
    """Give every staged entry the epoch as mtime, except contents copies (they keep their sources' times).

    Kept directories are not entered (a set lookup per entry: the store placeholders are all kept).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in keep]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p not in keep:
                os.utime(p, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def _placeholders(regs: list[store.Registration], store_root: Path, create: bool) -> list[tuple[str, str]]:
    """The binds of store paths over placeholders, with the placeholders created when `create`; symlinks copied.

    Without `create` the namespace helper makes them on a tmpfs (a mkdir per store path on the build
    host's disk cost more than the rest of the staging).
    """
    store_root.mkdir(parents=True, exist_ok=True)
    binds = []
    for r in regs:
        dest = store_root / os.path.basename(r.path)
        if os.path.islink(r.path):
            os.symlink(os.readlink(r.path), dest)
        elif not create:
            binds.append((r.path, str(dest)))
        elif os.path.isdir(r.path):
            dest.mkdir()
            binds.append((r.path, str(dest)))
        else:
            dest.touch()
            binds.append((r.path, str(dest)))
    return binds


def _boot_mount_points(spec: Spec, root: Path) -> None:
    """The ESP's (and XBOOTLDR's) mount points in the staged root, which the build VM would have made."""
    sd = spec.systemd_boot
    assert sd is not None
    for mount_point in (sd.efi_sys_mount_point, sd.xbootldr_mount_point):
        if mount_point is not None:
            make_dir(root, mount_point, 0o755)  # no symlink followed (staging/nofollow.py)


def stage_root(spec: Spec, regs: list[store.Registration], root: Path, lazy_store: bool = False) -> StagedRoot:
    """Build the staging root: contents, Nix state and store placeholders (or the store alone with onlyNixStore).

    lazy_store leaves the placeholders to mkfs's namespace (see StagedRoot.lazy_store).
    """
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    fixes: list[OwnerFix] = []
    mode_fixes: list[ModeFix] = []
    keep: set[str] = set()
    if spec.only_nix_store:
        store_root = root
        binds = _placeholders(regs, root, not lazy_store)
    else:
        staged_contents = stage_contents(spec, root)
        fixes = list(staged_contents.owner_fixes)
        mode_fixes = list(staged_contents.mode_fixes)
        keep = {str(p) for p in staged_contents.copies}
        store.write_nix_state(spec, root, regs)
        place_config_file(spec, root)
        if spec.installs_systemd_boot:  # systemd-boot written by prepare (builder/boot/systemd_boot.py)
            _boot_mount_points(spec, root)
        if spec.installs_grub:  # /boot/grub on the root (legacy, legacy+gpt), written by prepare (builder/boot/grub.py)
            from ..boot.grub import stage_on_root

            stage_on_root(spec, root)
        store_root = root / spec.store_dir.lstrip("/")
        binds = _placeholders(regs, store_root, not lazy_store)
        os.chmod(store_root, 0o1775)
    keep |= {dest for _, dest in binds}
    _set_times(root, spec.source_date_epoch, keep)
    return StagedRoot(root, tuple(binds), tuple(fixes), tuple(mode_fixes), str(store_root) if lazy_store else None)


def closure_binds(staged: StagedRoot, epoch: int) -> list[tuple[str, str]]:
    """Store binds for mkfs, or [] after copying the store into the staging root when namespaces are unavailable."""
    if userns_available():
        return list(staged.store_binds)
    info("user namespaces unavailable: copying the closure into the staging root")
    by_parent: dict[str, list[str]] = {}
    for src, dest in staged.store_binds:
        if os.path.isdir(dest):
            os.rmdir(dest)
        else:
            os.unlink(dest)
        by_parent.setdefault(os.path.dirname(dest), []).append(src)
    for parent, sources in by_parent.items():
        # One cp for all paths keeps hard links between store paths (auto-optimise-store) as links.
        run(["cp", "-a", "--reflink=auto", "-t", parent, *sources], "copying the closure failed")
    for parent in {os.path.dirname(dest) for _, dest in staged.store_binds}:
        os.utime(parent, (epoch, epoch))
    return []


def remove_tree(path: Path) -> None:
    """Remove a staging tree even where modes forbid writing (read-only dirs copied from the store)."""
    if not path.exists():
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    os.chmod(path, 0o755)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        _remove_by_path(str(path))  # rmtree holds two descriptors per level: a low ulimit -n runs out


def _remove_by_path(path: str) -> None:
    """Remove a tree holding at most one descriptor at a time (each directory listed, then closed, then entered)."""
    for name in os.listdir(path):
        child = os.path.join(path, name)
        if stat.S_ISDIR(os.lstat(child).st_mode):
            _remove_by_path(child)
        else:
            os.unlink(child)
    os.rmdir(path)


def remove_tree_quietly(path: Path) -> None:
    """remove_tree for a background thread: a failure is left for the pipeline's own removal to report."""
    try:
        remove_tree(path)
    except OSError:
        pass
