"""The build pipeline as plain functions called in order: prepare (unprivileged), finalize (VM), convert."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import ext4, fat, layout, sizing, store, table
from .contents import ModeFix, OwnerFix, place_config_file, stage_contents
from .errors import BuildError, UserError
from .fstypes import EXT_FAMILY
from .log import info, step
from .namespace import userns_available
from .sizes import MiB, align_up, human
from .spec import Spec


@dataclass(frozen=True)
class StagedRoot:
    """The staged root: a directory of everything but the store, and where each store path goes in it."""

    root: Path
    store_binds: tuple[tuple[str, str], ...]  # (store path, placeholder in root)
    owner_fixes: tuple[OwnerFix, ...]
    mode_fixes: tuple[ModeFix, ...]  # contents whose image mode is not their staged copy's (builder/contents.py)
    # The staged store directory when its placeholders are made on a tmpfs inside mkfs's namespace
    # (builder/namespace.py) rather than on disk; None when they are on disk.
    lazy_store: str | None = None


@contextmanager
def scratch_dir(work: Path | None) -> Iterator[Path]:
    """A scratch directory: the given one (kept), or a temporary one removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="mdi-") as tmp:
        yield Path(tmp)


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
        if spec.installs_systemd_boot:  # systemd-boot written by prepare (builder/sdboot.py)
            from .sdboot import make_mount_points

            make_mount_points(spec, root)
        store_root = root / spec.store_dir.lstrip("/")
        binds = _placeholders(regs, store_root, not lazy_store)
        os.chmod(store_root, 0o1775)
    keep |= {dest for _, dest in binds}
    _set_times(root, spec.source_date_epoch, keep)
    return StagedRoot(root, tuple(binds), tuple(fixes), tuple(mode_fixes), str(store_root) if lazy_store else None)


@dataclass(frozen=True)
class Sizing:
    """The chosen disk and root filesystem sizes and how they were reached."""

    disk_size: int
    fs_size: int
    inodes: int
    usage: sizing.Usage


def _fs_bytes_for(disk_size: int, spec: Spec) -> int:
    """The root filesystem size a disk of disk_size leaves (partition size floored to 4 KiB)."""
    start, end = layout.root_start(spec), layout.root_end(spec, disk_size)
    return (end - start) // sizing.BLOCK * sizing.BLOCK


def _ext4_params(spec: Spec, inodes: int) -> ext4.Ext4Params:
    """ext4 creation parameters from the spec."""
    det = spec.deterministic
    return ext4.Ext4Params(
        label=spec.label, uuid=spec.root_fsuid, hash_seed=spec.root_fsuid if det else None,
        inodes=inodes, fake_time=spec.source_date_epoch if det else None, fs_type=spec.fs_type,
    )


def _needed_fs_bytes(spec: Spec, usage: sizing.Usage, free: int, scratch: Path) -> tuple[int, int]:
    """Smallest ext4 size (and inode count) holding usage with at least `free` bytes left, by measuring mkfs."""
    want = usage.blocks * sizing.BLOCK + free
    size = align_up(int(want * 1.05) + 8 * MiB, sizing.BLOCK)
    for _ in range(6):
        inodes = sizing.inode_count(size, usage.inodes, free)
        over = ext4.overhead_blocks(size, _ext4_params(spec, inodes), scratch)
        new = align_up(want + over * sizing.BLOCK, sizing.BLOCK)
        if new == size:
            break
        size = new
    return size, sizing.inode_count(size, usage.inodes, free)


def choose_size(spec: Spec, staged: StagedRoot, scratch: Path, store_usage: sizing.StoreMeasure) -> Sizing:
    """diskSize: auto from the measured tree + additionalSpace + table space, or the fixed size if it fits."""
    subs = {dest: src for src, dest in staged.store_binds}
    usage = sizing.measure(staged.root, subs, store_usage)
    if spec.disk_size is None:
        fs_size, inodes = _needed_fs_bytes(spec, usage, spec.additional_space, scratch)
        disk = layout.smallest_disk(spec, fs_size)
    else:
        disk = spec.disk_size
        need, _ = _needed_fs_bytes(spec, usage, 0, scratch)
        if _fs_bytes_for(disk, spec) < need:
            minimum = layout.smallest_disk(spec, need) // MiB
            raise UserError(
                f"diskSize = {disk // MiB} MiB is too small: the root filesystem needs {human(need)} "
                f"({human(usage.blocks * sizing.BLOCK)} of files and directories in {usage.inodes} inodes, plus "
                f"ext4 metadata); use diskSize >= {minimum} or \"auto\""
            )
        fs_size = _fs_bytes_for(disk, spec)
        inodes = sizing.inode_count(fs_size, usage.inodes, 0)
    fs_size = _fs_bytes_for(disk, spec)
    info(f"content: {usage.inodes} inodes, {human(usage.file_bytes)} of file data, "
         f"{human(usage.blocks * sizing.BLOCK)} in 4 KiB blocks")
    info(f"root filesystem {human(fs_size)} ({inodes} inodes); disk {human(disk)} "
         f"({'auto, additionalSpace ' + human(spec.additional_space) if spec.disk_size is None else 'fixed'})")
    return Sizing(disk, fs_size, inodes, usage)


def _populate_binds(staged: StagedRoot, epoch: int) -> list[tuple[str, str]]:
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
        res = subprocess.run(["cp", "-a", "--reflink=auto", "-t", parent, *sources], capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(f"copying the closure failed: {res.stderr.strip()}")
    for parent in {os.path.dirname(dest) for _, dest in staged.store_binds}:
        os.utime(parent, (epoch, epoch))
    return []


def write_image(spec: Spec, staged: StagedRoot, size: Sizing, image: Path, scratch: Path) -> layout.Layout:
    """Create the sparse image, its table, the root ext4 (populated) and empty FAT partitions; check them."""
    plan = layout.plan(spec, size.disk_size)
    with open(image, "wb") as f:
        f.truncate(size.disk_size)
    with step("partition table"):
        table.write_table(image, plan)
    root = plan.root
    params = _ext4_params(spec, size.inodes)
    epoch = spec.source_date_epoch
    with step("root filesystem (mkfs.ext4 -d)"):
        binds = _populate_binds(staged, epoch)
        stamped = ext4.populate(image, root.start, size.fs_size, staged.root, params, binds, scratch, epoch,
                                staged.lazy_store)
    # The staging tree is read; removing it (a syscall per entry) overlaps the checks below on the other core.
    remover = threading.Thread(target=_remove_tree_quietly, args=(staged.root,), name="remove staging", daemon=True)
    remover.start()
    try:
        _finish_root_and_boot(spec, staged, image, plan, params, stamped, scratch)
    finally:
        remover.join()
    sb = ext4.superblock(f"{image}?offset={root.start}")
    free = int(sb["Free blocks"]) * sizing.BLOCK
    info(f"root filesystem free: {human(free)}")
    if spec.disk_size is None and free < spec.additional_space:
        raise BuildError(f"auto sizing left {human(free)} free, less than additionalSpace "
                         f"{human(spec.additional_space)} (estimate too low; please report)")
    return plan


def _finish_root_and_boot(spec: Spec, staged: StagedRoot, image: Path, plan: layout.Layout,
                          params: ext4.Ext4Params, stamped: bool, scratch: Path) -> None:
    """After mkfs: owners and times still to set, the empty FAT partitions, then every filesystem checked."""
    root, epoch = plan.root, spec.source_date_epoch
    with step("owners and times (debugfs)" if not stamped else "contents owners (debugfs)"):
        ext4.normalize(image, root.start, staged.owner_fixes, epoch, scratch, params, every_inode=not stamped,
                       modes=staged.mode_fixes)
    with step("boot filesystems"):
        for p in plan.partitions:
            if p.fs == "vfat":
                fat.make(image, p, spec.deterministic)
    with step("check filesystems"):
        ext4.check(image, root.start)
        for p in plan.partitions:
            if p.fs == "vfat":
                fat.check(image, p)


def prepare_image(spec: Spec, image: Path, work: Path | None = None) -> layout.Layout:
    """Unprivileged part: stage, size, partition, create and populate every filesystem into a raw image."""
    partial = image.with_name(image.name + ".partial")
    with scratch_dir(work) as scratch:
        try:
            with step("read closure"):
                regs = store.read_closure(spec)
            boot_install = None
            if spec.installs_systemd_boot:  # no VM: systemd-boot from the system's bootspec (builder/sdboot.py)
                from .sdboot import load_plan

                with step("read bootspec"):
                    boot_install = load_plan(spec)
            if spec.fs_type in EXT_FAMILY:
                # Sizing the store starts now, in worker processes, and overlaps the staging.
                with sizing.StoreMeasure([r.path for r in regs]) as store_usage:
                    with step("stage root"):
                        staged = stage_root(spec, regs, scratch / "root", lazy_store=userns_available())
                    with step("size"):
                        size = choose_size(spec, staged, scratch, store_usage)
                plan = write_image(spec, staged, size, partial, scratch)
            else:  # btrfs, xfs, erofs, squashfs: built as their own file and placed (builder/rootfs.py)
                from .rootfs import prepare_root

                with step("stage root"):
                    staged = stage_root(spec, regs, scratch / "root")
                plan = prepare_root(spec, staged, partial, scratch)
            if boot_install is not None:
                from .sdboot import write_install

                with step("systemd-boot from the bootspec"):
                    write_install(spec, boot_install, partial, plan, scratch)
            with step("check partition table"):
                table.check(partial, plan)
            os.replace(partial, image)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            _remove_tree(scratch / "root")
    return plan


def _remove_tree(path: Path) -> None:
    """Remove a staging tree even where modes forbid writing (read-only dirs copied from the store)."""
    if not path.exists():
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    os.chmod(path, 0o755)
    shutil.rmtree(path)


def _remove_tree_quietly(path: Path) -> None:
    """_remove_tree for a background thread: a failure is left for prepare_image's own removal to report."""
    try:
        _remove_tree(path)
    except OSError:
        pass


def post_vm_env_script() -> Path:
    """The shell file postVM runs after: the functions nixpkgs' make-disk-image.nix defines before it."""
    return Path(__file__).resolve().parent / "templates" / "post-vm-env.sh"


def run_post_vm(spec: Spec, image: Path) -> None:
    """Run the user's postVM as nixpkgs does: $diskImage and $out set, nixpkgs' shell functions defined.

    (Under Nix the derivation runs postVM itself, after sourcing the same file, with PATH set to the
    tools nixpkgs gives it; here PATH is the host's.)
    """
    if not spec.post_vm.strip():
        return
    out = image.parent
    env = dict(os.environ, diskImage=str(image), out=str(out))
    if spec.touch_efi_vars:
        env["efiVars"] = str(out / "efi-vars.fd")
    script = f"source {shlex.quote(str(post_vm_env_script()))}\n{spec.post_vm}"
    # Its own process group, killed whole if the build is stopped: no command of the user's outlives it.
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=out,
                            start_new_session=True)
    try:
        status = proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if status != 0:
        raise BuildError(f"postVM exited with status {status}")


def check_finalized(spec: Spec, image: Path, plan: layout.Layout) -> None:
    """The VM wrote to the image (bootloader, owners, tune2fs): the table and filesystems must still be clean."""
    table.check(image, plan)
    if spec.fs_type in EXT_FAMILY:  # other root filesystems are checked as their own file in prepare (rootfs.py)
        ext4.check(image, plan.root.start)
    for p in plan.partitions:
        if p.fs == "vfat":
            fat.check(image, p)


def after_vm(spec: Spec, image: Path) -> None:
    """After the VM stage, on the host: check what the VM wrote, then settle it (deterministic builds).

    The same step for `build` and for the Nix derivation's postVM, deterministic or not.
    """
    plan = layout.plan(spec, image.stat().st_size)
    with step("check after finalize"):
        check_finalized(spec, image, plan)
    if spec.deterministic:
        from .vmpin import pin_image

        pin_image(spec, image)
        with step("check after settling"):
            check_finalized(spec, image, plan)


def build(spec: Spec, out: Path, work: Path | None = None) -> Path:
    """The whole pipeline outside Nix: prepare, finalize in a VM when needed, convert, postVM."""
    from .convert import convert

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []  # what this build put into out, removed again if it fails
    try:
        with scratch_dir(work) as scratch:
            raw = scratch / "nixos.raw"
            prepare_image(spec, raw, scratch)
            if spec.needs_vm:
                with step("finalize (VM)"):
                    from .vm import run_finalize

                    run_finalize(spec, raw, scratch)
                after_vm(spec, raw)
                vars_file = scratch / "efi-vars.fd"
                if spec.touch_efi_vars and vars_file.exists():
                    written.append(out / "efi-vars.fd")
                    shutil.copyfile(vars_file, out / "efi-vars.fd")
            with step("convert"):
                written += [out / spec.image_file_name, out / "nix-support" / "hydra-build-products"]
                final = convert(spec, raw, out)
            with step("postVM"):
                run_post_vm(spec, final)
    except BaseException:
        # A failed or stopped build must not leave a finished-looking image (or its Hydra line) behind.
        for path in written:
            path.unlink(missing_ok=True)
        if (out / "nix-support").is_dir() and not any((out / "nix-support").iterdir()):
            (out / "nix-support").rmdir()
        raise
    return final
