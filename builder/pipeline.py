"""The one step order of a build, as plain functions called in order.

1. prepare (host, unprivileged): stage, size, partition, make and fill every filesystem;
2. finalize (as root in the build VM, only when the spec needs it: bootloader, owners by name);
3. after_vm (host): check what the VM wrote, then settle it when deterministic;
4. convert (host): the requested format and the Hydra product line;
5. postVM: the user's shell code.

`build` runs them all outside Nix; `prepare_and_convert` runs 1 and 4 in one process for an image
without a VM stage. The Nix derivations (nix/make-disk-image.nix) run the same steps through the CLI:
`prepare --out` for an image without a VM stage; else `prepare` in preVM, `finalize` in the VM,
`after-vm` and `convert` in postVM, then postVM.

With shareRootFilesystem, step 1 is split: `build_root_filesystem` makes the root filesystem alone (its own
derivation under Nix, shared by every variant with the same root), and prepare places it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .disk import layout, table
from .errors import BuildError, UserError
from .fs import ext, fat, placed
from .log import step
from .resources import template_dir
from .spec import Spec
from .staging import store
from .staging.root import remove_tree, stage_root


@contextmanager
def scratch_dir(work: Path | None) -> Iterator[Path]:
    """A scratch directory: the given one (kept), or a temporary one removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="mdi-") as tmp:
        yield Path(tmp)


def _make_root(spec: Spec, regs: list[store.Registration], image: Path, scratch: Path,
               root_only: bool = False) -> layout.Layout:
    """Stage the tree and make the root filesystem in the image (root_only: as the whole image); the layout."""
    if spec.ext_root:  # made in place at its offset by mkfs -d (builder/fs/ext.py)
        return ext.prepare_root(spec, regs, image, scratch, root_only)
    # btrfs, xfs, erofs, squashfs: built as their own file and placed (builder/fs/placed.py)
    with step("stage root"):
        staged = stage_root(spec, regs, scratch / "root")
    return placed.prepare_root(spec, staged, image, scratch, root_only)


def prepare_image(spec: Spec, image: Path, work: Path | None = None,
                  root_filesystem: Path | None = None) -> layout.Layout:
    """Unprivileged part: stage, size, partition, create and populate every filesystem into a raw image.

    root_filesystem: the root filesystem `build_root_filesystem` made (shareRootFilesystem), placed instead
    of made again.
    """
    partial = image.with_name(image.name + ".partial")
    with scratch_dir(work) as scratch:
        try:
            regs: list[store.Registration] = []
            if root_filesystem is None:
                with step("read closure"):
                    regs = store.read_closure(spec)
            boot_install = None
            if spec.installs_systemd_boot:  # no VM: systemd-boot from the system's bootspec (builder/boot/)
                from .boot.systemd_boot import load_plan

                with step("read bootspec"):
                    boot_install = load_plan(spec)
            if root_filesystem is not None:  # shareRootFilesystem (builder/fs/shared.py)
                from .fs.shared import place_root

                plan = place_root(spec, root_filesystem, partial)
            else:
                plan = _make_root(spec, regs, partial, scratch)
            if boot_install is not None:
                from .boot.systemd_boot import write_install

                with step("systemd-boot from the bootspec"):
                    write_install(spec, boot_install, partial, plan, scratch)
            with step("check partition table"):
                table.check(partial, plan)
            os.replace(partial, image)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            remove_tree(scratch / "root")
    return plan


def build_root_filesystem(spec: Spec, out: Path, work: Path | None = None) -> Path:
    """Only the root filesystem, as the file out (shareRootFilesystem): what `prepare --root-filesystem` places.

    Its bytes are those of the root partition of any image of this spec built alone. Written next to out
    and renamed, so a failed build leaves no out.
    """
    if not spec.share_root_filesystem:
        raise UserError("root-filesystem: the spec does not have shareRootFilesystem = true; only then is the root "
                        "filesystem sized independently of the layout, so that one build serves every variant")
    partial = out.with_name(out.name + ".partial")
    with scratch_dir(work) as scratch:
        try:
            with step("read closure"):
                regs = store.read_closure(spec)
            _make_root(spec, regs, partial, scratch, root_only=True)
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            remove_tree(scratch / "root")
    return out


def post_vm_env_script() -> Path:
    """The shell file postVM runs after: the functions nixpkgs' make-disk-image.nix defines before it."""
    return template_dir() / "post-vm-env.sh"


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
    if spec.ext_root:  # other root filesystems are checked as their own file in prepare (builder/fs/placed.py)
        ext.check(image, plan.root.start)
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
        from .vm.settle import settle_image

        settle_image(spec, image)
        with step("check after settling"):
            check_finalized(spec, image, plan)


def convert_image(spec: Spec, raw: Path, out: Path) -> Path:
    """Step 4: out/<baseName>.<ext> in the requested format and the Hydra product line."""
    from .disk.convert import convert

    with step("convert"):
        return convert(spec, raw, out)


def prepare_and_convert(spec: Spec, image: Path, out: Path, work: Path | None = None,
                        root_filesystem: Path | None = None) -> Path:
    """Steps 1 and 4 in one process, for an image without a VM stage (the Nix build's plain derivation)."""
    if spec.needs_vm:
        raise UserError(f"prepare --out {str(out)!r}: this spec needs the VM stage (finalize) before the image "
                        "is converted; run prepare without --out, then finalize, after-vm and convert")
    prepare_image(spec, image, work, root_filesystem)
    return convert_image(spec, image, out)


def build(spec: Spec, out: Path, work: Path | None = None, root_filesystem: Path | None = None) -> Path:
    """The whole pipeline outside Nix: prepare, finalize in a VM when needed, after_vm, convert, postVM."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []  # what this build put into out, removed again if it fails
    try:
        with scratch_dir(work) as scratch:
            raw = scratch / "nixos.raw"
            prepare_image(spec, raw, scratch, root_filesystem)
            if spec.needs_vm:
                with step("finalize (VM)"):
                    from .vm.runner import run_finalize

                    run_finalize(spec, raw, scratch)
                after_vm(spec, raw)
                vars_file = scratch / "efi-vars.fd"
                if spec.touch_efi_vars and vars_file.exists():
                    written.append(out / "efi-vars.fd")
                    shutil.copyfile(vars_file, out / "efi-vars.fd")
            written += [out / spec.image_file_name, out / "nix-support" / "hydra-build-products"]
            final = convert_image(spec, raw, out)
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
