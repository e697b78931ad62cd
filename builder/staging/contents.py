"""Stage `contents` entries into the image root, as nixpkgs' rsync -a --chmod does, without leaving the root."""

from __future__ import annotations

import errno
import glob
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..chmod import ChmodRules
from ..disk.sparse import clone_range
from ..errors import UserError
from ..inputfile import host_only_problem, host_view_devices, host_view_problem
from ..spec import Content, Spec


@dataclass(frozen=True)
class OwnerFix:
    """A path inside the image that gets a numeric owner once the filesystem exists."""

    image_path: str
    uid: int
    gid: int


@dataclass(frozen=True)
class ModeFix:
    """A path whose mode in the image (st_mode, type included) is not its staged copy's.

    rsync -a [--chmod] gives modes the build user cannot read or write through (--chmod=0644 or "=" on
    a directory, "=" on a file, a 0555 directory from the store); rsync itself sets a directory's mode
    after filling it. The staged copy keeps its owner's access, so later steps and mkfs (even without a
    user namespace) can read and write it, and each filesystem writer gives the image this mode.
    """

    image_path: str
    mode: int


def _safe_parent(root: Path, target: str, index: int) -> Path:
    """Create the target's parent directories (0755) under root, refusing to pass through symlinks."""
    current = root
    for part in target.strip("/").split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            os.chmod(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"contents[{index}].target {target!r}: {str(current.relative_to(root))!r} is a symlink "
                            "in the image; a target must not reach through a symlink")
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"contents[{index}].target {target!r}: {str(current.relative_to(root))!r} is not a "
                            "directory in the image")
    return current


def _check_source_tree(source: Path, index: int) -> None:
    """Refuse sources holding device nodes, sockets or FIFOs, which cannot be copied unprivileged, or a mount
    of proc, sysfs and the like (inputfile.HOST_VIEWS) anywhere in them."""
    views = host_view_devices()

    def bad(p: Path, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
            raise UserError(f"contents[{index}].source: {str(p)!r} is a device node, socket or FIFO; "
                            "only regular files, directories and symlinks can be placed in the image")
        why = host_view_problem(p, st, views) if not stat.S_ISLNK(mode) else None
        if why:
            raise UserError(f"contents[{index}].source: {why}")

    st = os.lstat(source)
    bad(source, st)
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(source):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                bad(p, os.lstat(p))


def _copy(source: Path, dest: Path, index: int, target: str) -> None:
    """Copy a file, symlink or directory tree to dest, keeping symlinks, modes and mtimes."""
    if os.path.lexists(dest):
        raise UserError(f"contents[{index}].target {target!r}: {dest.name!r} already exists in the image "
                        "(duplicate target)")
    why = host_only_problem(source)
    if why:
        raise UserError(f"contents[{index}].source: {why}")
    _check_source_tree(source, index)
    if source.is_symlink() or not source.is_dir():
        _copy2(source, dest, follow_symlinks=False)
    else:
        shutil.copytree(source, dest, symlinks=True, copy_function=_copy2)



def _copy2(source: str | Path, dest: str | Path, *, follow_symlinks: bool = True) -> None:
    """shutil.copy2, with the new file sharing the source's blocks where the filesystem can (XFS with reflink,
    btrfs), so that mkfs' data library shares them on into the image (builder/sandbox/e2fsdata.c)."""
    if (not follow_symlinks and os.path.islink(source)) or not os.path.isfile(source):
        shutil.copy2(source, dest, follow_symlinks=follow_symlinks)
        return
    try:
        with open(source, "rb") as src, open(dest, "wb") as dst:
            cloned = clone_range(src.fileno(), dst.fileno(), 0, 0)
    except OSError:
        cloned = False
    if not cloned:  # another filesystem, or one that does not share blocks: copied as before
        shutil.copy2(source, dest, follow_symlinks=follow_symlinks)
        return
    shutil.copystat(source, dest, follow_symlinks=follow_symlinks)


def _staged_mode(mode: int) -> int:
    """The mode a staged copy gets: its image mode plus the owner access the build needs (rwx dirs, r files)."""
    return mode | (0o700 if stat.S_ISDIR(mode) else 0o400)


def _apply_modes(path: Path, root: Path, rules: ChmodRules | None, index: int) -> list[ModeFix]:
    """Give path and everything below it, symlinks excepted, the mode rsync -a [--chmod] gives; return the fixes.

    The mode starts from the copy's (the source's) bits; a directory is opened up before it is entered.
    """
    fixes: list[ModeFix] = []

    def one(p: str) -> None:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return
        final = st.st_mode if rules is None else rules.apply(st.st_mode)
        staged = _staged_mode(final)
        if staged != st.st_mode:
            os.chmod(p, stat.S_IMODE(staged))
        if os.lstat(p).st_mode != final:  # also when the kernel dropped a bit the build user may not set
            image_path = "/" + os.path.relpath(p, root)
            if "\n" in image_path:
                raise UserError(f"contents[{index}].target: {image_path!r} holds a newline and needs mode "
                                f"{stat.S_IMODE(final):04o}, which cannot be set on it in the image")
            fixes.append(ModeFix(image_path, final))

    one(str(path))
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                one(os.path.join(dirpath, name))
    return fixes


def _tree_paths(path: Path, root: Path) -> list[str]:
    """Every image path at and below a staged path (for chown -R semantics)."""
    out = ["/" + str(path.relative_to(root))]
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in sorted(dirnames + filenames):
                out.append("/" + str((Path(dirpath) / name).relative_to(root)))
    return out


def _stage_entry(root: Path, entry: Content, index: int, store_dir: str) -> list[Path]:
    """Copy one entry; return the staged top-level paths it created."""
    if entry.target == store_dir or entry.target.startswith(store_dir.rstrip("/") + "/"):
        raise UserError(f"contents[{index}].target {entry.target!r} is inside {store_dir}, which holds the "
                        "closure; use additionalPaths for store paths")
    parent = _safe_parent(root, entry.target, index)
    dest = parent / entry.target.rstrip("/").rsplit("/", 1)[-1]
    if entry.is_glob:
        matches = sorted(glob.glob(entry.source))
        if not matches:
            raise UserError(f"contents[{index}].source {entry.source!r} matches nothing")
        if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()):
            raise UserError(f"contents[{index}].target {entry.target!r} exists and is not a directory")
        if not os.path.lexists(dest):
            os.mkdir(dest, 0o755)
            os.chmod(dest, 0o755)
        created = []
        for match in matches:
            item = dest / os.path.basename(match)
            _copy(Path(match), item, index, entry.target)
            created.append(item)
        return created
    source = Path(entry.source)
    if not os.path.lexists(source):
        raise UserError(f"contents[{index}].source {entry.source!r} does not exist")
    _copy(source, dest, index, entry.target)
    return [dest]


def builder_paths(spec: Spec) -> list[str]:
    """Image paths the builder writes itself after the contents, on the host: the store and nixos-install's state,
    and GRUB's directories on /boot when prepare installs GRUB (builder/boot/grub.py)."""
    paths = [spec.store_dir, "/nix/var/nix", "/etc/NIXOS"]
    if spec.channel:
        paths.append("/root/.nix-defexpr")
    if spec.installs_grub:
        paths += ["/boot/grub", "/boot/kernels"]
    return paths


def _entry_for(spec: Spec, image_path: str) -> str:
    """'contents[i]' of the entry that created image_path (at, above or below it)."""
    for i, c in enumerate(spec.contents):
        if c.target == image_path or c.target.startswith(image_path + "/") or image_path.startswith(c.target + "/"):
            return f"contents[{i}]"
    return "contents"


def _no_symlink_on_the_way(root: Path, spec: Spec, reserved: str) -> list[tuple[str, os.stat_result]]:
    """The staged components of reserved that exist, as (image path, lstat); refuse a symlink among them."""
    parts = reserved.strip("/").split("/")
    found = []
    current = root
    for depth, part in enumerate(parts, 1):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        here = "/" + "/".join(parts[:depth])
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"{_entry_for(spec, here)}: {here!r} is a symlink in the image, but the builder "
                            f"writes {reserved} itself and must not follow it; place the link elsewhere")
        found.append((here, st))
        if not stat.S_ISDIR(st.st_mode):
            break
    return found


def check_builder_paths(root: Path, spec: Spec) -> None:
    """Refuse staged contents that sit where the builder writes next, or put a symlink on the way there.

    A symlink at /nix, /etc, /nix/var/nix/db or /boot from contents would otherwise redirect the builder's own
    writes (store placeholders, Nix database, /etc/NIXOS, GRUB's files) to wherever it points on the build host.
    """
    for reserved in builder_paths(spec):
        found = _no_symlink_on_the_way(root, spec, reserved)
        if found and (found[-1][0] == reserved or not stat.S_ISDIR(found[-1][1].st_mode)):
            here = found[-1][0]
            raise UserError(f"{_entry_for(spec, here)}: {here!r} is written by the builder (the store, the "
                            "Nix state nixos-install leaves, the bootloader's files); choose a target outside it")
    for reserved in spec.bootloader_dirs:  # entries at or above them are refused by builder/spec.py
        found = _no_symlink_on_the_way(root, spec, reserved)
        if found and not stat.S_ISDIR(found[-1][1].st_mode):
            here = found[-1][0]
            raise UserError(f"{_entry_for(spec, here)}: {here!r} is not a directory, but the builder makes "
                            f"{reserved} for the bootloader it installs; choose a target outside it")


CONFIG_DIR = "/etc/nixos"
CONFIG_FILE = "/etc/nixos/configuration.nix"
# nixpkgs' VM script copies configFile with a plain `cp` as root: the new file's mode is the source's
# without what the umask (022) takes away.
VM_UMASK = 0o022


def place_config_file(spec: Spec, root: Path) -> None:
    """Make /etc/nixos and copy configFile to /etc/nixos/configuration.nix, as nixpkgs' VM script does.

    nixpkgs' make-disk-image.nix runs `mkdir -p /mnt/etc/nixos` and `cp $configFile
    /mnt/etc/nixos/configuration.nix` for every image but onlyNixStore ones, after the contents are in
    place (so it overwrites a contents file of that name). Nothing here needs root or the VM.
    """
    parent = _safe_parent(root, CONFIG_FILE, _entry_index(spec, CONFIG_FILE))
    if spec.config_file is None:
        return
    dest = parent / "configuration.nix"
    why = host_only_problem(spec.config_file)
    if why:
        raise UserError(f"configFile: {why}")
    try:
        source_mode = os.stat(spec.config_file).st_mode
    except OSError as exc:
        raise UserError(f"configFile {spec.config_file!r}: {exc.strerror}") from None
    if not stat.S_ISREG(source_mode):  # /dev/zero would be copied until the disk is full; a FIFO would block
        raise UserError(f"configFile {spec.config_file!r}: not a regular file")
    if os.path.islink(dest) or os.path.isdir(dest):
        raise UserError(f"configFile: {CONFIG_FILE} is a {'symlink' if os.path.islink(dest) else 'directory'} "
                        f"placed by {_entry_for(spec, CONFIG_FILE)}; the configuration file cannot go there")
    mode = os.stat(dest).st_mode & 0o7777 if dest.exists() else source_mode & 0o777 & ~VM_UMASK
    try:
        shutil.copyfile(spec.config_file, dest)
    except OSError as exc:
        raise UserError(f"configFile {spec.config_file!r}: {exc.strerror}") from None
    os.chmod(dest, mode)


def _entry_index(spec: Spec, image_path: str) -> int:
    """The index of the contents entry that placed image_path or one of its parents (-1 when none did)."""
    for i, c in enumerate(spec.contents):
        if image_path == c.target or image_path.startswith(c.target + "/"):
            return i
    return -1


@dataclass(frozen=True)
class StagedContents:
    """What staging the contents produced: the copies (which keep their sources' times), owners and modes to set."""

    copies: tuple[Path, ...]
    owner_fixes: tuple[OwnerFix, ...]
    mode_fixes: tuple[ModeFix, ...]


def stage_contents(spec: Spec, root: Path) -> StagedContents:
    """Place every contents entry under root; return the copies made and the numeric owners and modes to apply."""
    fixes: list[OwnerFix] = []
    mode_fixes: list[ModeFix] = []
    copies: list[Path] = []
    for index, entry in enumerate(spec.contents):
        try:
            created = _stage_entry(root, entry, index, spec.store_dir)
            for path in created:
                mode_fixes += _apply_modes(path, root, entry.mode, index)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # the build's limits, not the entry's fault
                raise
            raise UserError(f"contents[{index}] ({entry.source!r} -> {entry.target!r}): {exc}") from None
        copies += created
        for path in created:
            owner = entry.numeric_owner
            if owner is not None:
                for image_path in _tree_paths(path, root):
                    if "\n" in image_path:
                        raise UserError(f"contents[{index}].target: {image_path!r} holds a newline, which cannot "
                                        "be given a numeric owner")
                    fixes.append(OwnerFix(image_path, owner[0], owner[1]))
    check_builder_paths(root, spec)
    return StagedContents(tuple(copies), tuple(fixes), tuple(mode_fixes))
