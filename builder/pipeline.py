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

import errno
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .disk import layout, sparse, table
from .disk.intermediate import raw_intermediate
from .errors import BuildError, UserError
from .fs import ext, fat, placed
from .log import info, step
from .output import Output, output_dir
from .resources import template_dir
from .sandbox.e2fscrc import crc_library
from .sandbox.e2fsdata import data_library, files_mode
from .sandbox.e2fsdir import dir_library
from .sandbox.statshim import stat_shim
from .signals import reaping_descendants
from .spec import Spec
from .staging import store
from .staging.root import remove_tree, stage_root
from .units import SECTOR, MiB, human

# Called with the finished image's path once everything else succeeded, before OUT is kept (the CLI prints it).
Report = Callable[[Path], None]


@contextmanager
def scratch_dir(work: Path | None) -> Iterator[Path]:
    """A fresh scratch directory of this build's own, inside work (else TMPDIR), removed afterwards.

    Only that directory is ever removed: whatever else work holds (a `root`, a `binds.json` of someone
    else's) is not the builder's and stays as it was.
    """
    if work is not None:
        if os.path.lexists(work) and not work.is_dir():
            raise UserError(f"--work {str(work)!r}: is not a directory")
        try:
            work.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="mdi-", dir=work))
        except OSError as exc:
            raise UserError(f"--work {str(work)!r}: cannot make a scratch directory there ({exc.strerror})") from None
    else:
        scratch = Path(tempfile.mkdtemp(prefix="mdi-"))
    try:
        yield scratch
    finally:
        remove_tree(scratch)


def _umask() -> int:
    """The process's umask, read without changing it (/proc/self/status), 022 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def fresh_file(beside: Path, suffix: str) -> Path:
    """A new empty file under a random name in beside's directory (O_EXCL: nothing planted is opened).

    Its mode is the one a plain open() would give (0666 less the umask), not mkstemp's 0600.
    """
    fd, name = tempfile.mkstemp(dir=beside.absolute().parent, prefix=f".{beside.name}.", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(name)


@contextmanager
def written_beside(target: Path, option: str) -> Iterator[Path]:
    """A fresh file beside target (fresh_file), renamed onto target when the block ends well, removed if not."""
    try:
        partial = fresh_file(target, ".partial")
    except OSError as exc:
        raise UserError(f"{option} {str(target)!r}: cannot write in its directory ({exc.strerror})") from None
    try:
        yield partial
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _size_field(spec: Spec) -> str:
    """The argument that sets the image's size, as the user wrote it: diskSize, or additionalSpace with "auto"."""
    if spec.disk_size is None:
        return f"additionalSpace = {json.dumps(spec.raw['additionalSpace'])}"
    return f"diskSize = {spec.disk_size // MiB}"


def check_room(spec: Spec, directories: list[tuple[Path, Path]]) -> None:
    """Refuse, before any work, an image larger than the build filesystem holds in one file (exit 2).

    1 EiB is a valid ext4 size, but the work directory's filesystem (ext4: 16 TiB) or RLIMIT_FSIZE may
    allow less; the image (and the probe file sizing makes) must fit in one file there.
    """
    need = spec.disk_size if spec.disk_size is not None else spec.additional_space
    for probe, directory in directories:  # (a directory or own empty file to probe, the directory to name)
        limit = sparse.largest_file(probe)
        if need > limit:
            raise UserError(
                f"{_size_field(spec)}: the image would be {'at least ' if spec.disk_size is None else ''}"
                f"{human(need)}, but the build filesystem holding {str(directory)!r} holds files of at most "
                f"{human(limit)} (its own limit, or this process's RLIMIT_FSIZE); give a smaller size, or build "
                "where the work directory's filesystem allows larger files")


def check_image_path(image: Path) -> None:
    """Refuse an image path that cannot be written (exit 2): its directory missing or not one, or a directory."""
    parent = image.absolute().parent
    if image.is_dir():
        raise UserError(f"--image {str(image)!r}: is a directory")
    if not os.path.lexists(parent):
        raise UserError(f"--image {str(image)!r}: its directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise UserError(f"--image {str(image)!r}: {str(parent)!r} is not a directory")


def _make_root(spec: Spec, regs: list[store.Registration], image: Path, scratch: Path,
               root_only: bool = False) -> layout.Layout:
    """Stage the tree and make the root filesystem in the image (root_only: as the whole image); the layout."""
    if spec.ext_root:  # made in place at its offset by mkfs -d (builder/fs/ext.py)
        return ext.prepare_root(spec, regs, image, scratch, root_only)
    # btrfs, xfs, erofs, squashfs: built as their own file and placed (builder/fs/placed.py)
    with step("stage root"):
        staged = stage_root(spec, regs, scratch / "root")
    return placed.prepare_root(spec, staged, image, scratch, root_only)


def pre_vm_variables(spec: Spec, plan: layout.Layout, build_dir: Path) -> dict[str, str]:
    """The shell variables nixpkgs' make-disk-image.nix sets in preVM, which its postVM (same shell) still sees.

    There: root="$PWD/root"; bootSize=$(round_to_nearest $(numfmt --from=iec bootSize) $mebibyte) and
    bootSizeMiB=$((bootSize / 1024 / 1024))MiB; with a partition table,
    `eval $(partx $diskImage -o START,SECTORS --nr <root partition> --pairs)`: the root partition's first
    sector and length in sectors (without a table START and SECTORS stay unset).
    """
    variables = {"root": f"{build_dir}/root", "bootSize": str(spec.boot_partition_end),
                 "bootSizeMiB": f"{spec.boot_partition_end // MiB}MiB"}
    if plan.table is not None:
        variables["START"] = str(plan.root.start // SECTOR)
        variables["SECTORS"] = str(plan.root.size // SECTOR)
    return variables


def write_pre_vm_variables(path: Path, variables: dict[str, str]) -> None:
    """Write the variables as shell assignments for the Nix derivation's postVM to source."""
    text = "".join(f"{name}={shlex.quote(value)}\n" for name, value in variables.items())
    try:
        path.write_text("# nixpkgs' preVM variables (builder/pipeline.py pre_vm_variables)\n" + text)
    except OSError as exc:
        raise UserError(f"--pre-vm-variables {str(path)!r}: cannot write it ({exc.strerror})") from None


def prepare_image(spec: Spec, image: Path, work: Path | None = None,
                  root_filesystem: Path | None = None) -> layout.Layout:
    """Unprivileged part: stage, size, partition, create and populate every filesystem into a raw image.

    The image is written under a fresh random name beside it and renamed into place when complete.
    root_filesystem: the root filesystem `build_root_filesystem` made (shareRootFilesystem), placed instead
    of made again.
    """
    check_image_path(image)
    check_environment(spec)
    with scratch_dir(work) as scratch, written_beside(image, "--image") as partial:
        try:
            check_room(spec, [(scratch, scratch.parent), (partial, image.absolute().parent)])
            regs: list[store.Registration] = []
            if root_filesystem is None:
                with step("read closure"):
                    regs = store.read_closure(spec)
            boot_install = None
            if spec.installs_systemd_boot:  # no VM: systemd-boot from the system's bootspec (builder/boot/)
                from .boot.systemd_boot import load_plan

                with step("read bootspec"):
                    boot_install = load_plan(spec)
            grub_install = None
            if spec.installs_grub:  # no VM: GRUB from the system's bootspec and package (builder/boot/grub.py)
                from .boot import grub

                with step("read bootspec (GRUB)"):
                    grub_install = grub.load_plan(spec)
            if root_filesystem is not None:  # shareRootFilesystem (builder/fs/shared.py)
                from .fs.shared import place_root

                plan = place_root(spec, root_filesystem, partial)
            else:
                plan = _make_root(spec, regs, partial, scratch)
            if boot_install is not None:
                from .boot.systemd_boot import write_install

                with step("systemd-boot from the bootspec"):
                    write_install(spec, boot_install, partial, plan, scratch)
            if grub_install is not None:
                if not grub_install.on_root:
                    with step("GRUB files into the ESP"):
                        grub.write_esp(spec, grub_install, partial, plan, scratch)
                if grub_install.cfg.bios_package is not None:
                    with step("GRUB boot code (boot.img, core.img)"):
                        grub.write_boot_code(spec, grub_install, partial, plan, scratch)
            with step("check partition table"):
                table.check(partial, plan)
        except OSError as exc:
            if exc.errno == errno.EFBIG:  # sizing added more than check_room could know: still the size's fault
                raise UserError(f"{_size_field(spec)}: the image does not fit in one file on the build filesystem "
                                f"({exc}); give a smaller size, or build where larger files are allowed") from None
            raise
    return plan


def build_root_filesystem(spec: Spec, out: Path, work: Path | None = None) -> Path:
    """Only the root filesystem, as the file out (shareRootFilesystem): what `prepare --root-filesystem` places.

    Its bytes are those of the root partition of any image of this spec built alone. Written next to out
    and renamed, so a failed build leaves no out.
    """
    if not spec.share_root_filesystem:
        raise UserError("root-filesystem: the spec does not have shareRootFilesystem = true; only then is the root "
                        "filesystem sized independently of the layout, so that one build serves every variant")
    check_image_path(out)
    check_environment(spec)
    with scratch_dir(work) as scratch, written_beside(out, "--out") as partial:
        with step("read closure"):
            regs = store.read_closure(spec)
        _make_root(spec, regs, partial, scratch, root_only=True)
    return out


def post_vm_env_script() -> Path:
    """The shell file postVM runs after: the functions nixpkgs' make-disk-image.nix defines before it."""
    return template_dir() / "post-vm-env.sh"


def run_post_vm(spec: Spec, image: Path, variables: dict[str, str] | None = None) -> None:
    """Run the user's postVM as nixpkgs does: $diskImage, $out and preVM's variables set, its functions defined.

    (Under Nix the derivation runs postVM itself, after sourcing the same file, with PATH set to the
    tools nixpkgs gives it; here PATH is the host's.)
    """
    if not spec.post_vm.strip():
        return
    out = image.parent
    env = dict(os.environ, **(variables or {}), diskImage=str(image), out=str(out))
    if spec.touch_efi_vars:
        env["efiVars"] = str(out / "efi-vars.fd")
    # The script goes through a memfd, not argv: one argument holds at most 128 KiB (E2BIG), a postVM may
    # be longer. bash's `.` reads the whole file before running it, so its first line closes the descriptor
    # (postVM's own commands do not inherit it); $0 stays "bash" and there are no positional parameters.
    fd = os.memfd_create("postVM")
    try:
        script = f"exec {fd}<&-\nsource {shlex.quote(str(post_vm_env_script()))}\n{spec.post_vm}"
        os.write(fd, script.encode("utf-8", "surrogateescape"))
        # No command of the user's outlives it: its own process group, killed whole when it ends or the build
        # is stopped, and whatever left that group (setsid, a double fork) is re-parented to the builder and
        # killed then too (signals.reaping_descendants).
        with reaping_descendants():
            # Its stdout goes to stderr, as a Nix build's log has it: the builder's stdout holds the image's path
            # alone (img=$(python -m builder build ...)).
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", f". /dev/fd/{fd}"], env=env, cwd=out,
                                    start_new_session=True, pass_fds=(fd,), stdout=2)
            try:
                status = proc.wait()
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    finally:
        os.close(fd)
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
    check_environment(spec)
    plan = layout.plan(spec, image.stat().st_size)
    with step("check after finalize"):
        check_finalized(spec, image, plan)
    if spec.deterministic:
        from .vm.settle import settle_image

        settle_image(spec, image)
        with step("check after settling"):
            check_finalized(spec, image, plan)


def _no_report(path: Path) -> None:
    """Report nothing: for callers that want the path only as the return value."""


def _convert(spec: Spec, raw: Path, output: Output) -> Path:
    """Step 4 inside an output transaction: <baseName>.<ext> in the requested format and the Hydra product line."""
    from .disk.convert import convert_into

    with step("convert"):
        return convert_into(spec, raw, output)


def check_tmpdir() -> None:
    """TMPDIR, when set, must be a directory the build can write: Python's tempfile would otherwise fall back to
    /tmp, /var/tmp or the working directory without a word, putting the scratch files somewhere not chosen."""
    value = os.environ.get("TMPDIR")
    if not value:  # unset or empty: tempfile's documented default, /tmp
        return
    if not os.path.isdir(value):
        why = "is not a directory" if os.path.lexists(value) else "does not exist"
        raise UserError(f"TMPDIR {value!r} {why}: the build's scratch files go there; set TMPDIR to a writable "
                        "directory (or unset it for /tmp)")
    if not os.access(value, os.W_OK | os.X_OK):
        raise UserError(f"TMPDIR {value!r} cannot be written by this build (read-only or no permission): the build's "
                        "scratch files go there; set TMPDIR to a writable directory (or unset it for /tmp)")


def check_environment(spec: Spec) -> None:
    """The environment this build reads (TMPDIR, stat shim, checksum, directory and data libraries, qcow2 writer),
    checked before any work: a bad value is the user's error (exit 2)."""
    check_tmpdir()
    stat_shim()
    crc_library()
    dir_library()
    data_library()
    files_mode()
    if spec.format == "qcow2-compressed":
        from .disk.convert import qcow2_writer
        qcow2_writer()


def convert_image(spec: Spec, raw: Path, out: Path, report: Report = _no_report) -> Path:
    """Step 4 alone (the `convert` command, the Nix derivation's postVM): into OUT, as builder/output.py says."""
    check_environment(spec)
    with output_dir(out) as output:
        final = _convert(spec, raw, output)
        report(final)
    return final


def prepare_and_convert(spec: Spec, image: Path | None, out: Path, work: Path | None = None,
                        report: Report = _no_report, root_filesystem: Path | None = None,
                        variables_file: Path | None = None) -> Path:
    """Steps 1 and 4 in one process, for an image without a VM stage (the Nix build's plain derivation).

    Without `image` the raw image goes where it costs no extra write (builder/disk/intermediate.py) and is
    gone afterwards; with it, it is written there (and moved from there when the format is raw).
    variables_file: where to write nixpkgs' preVM variables for postVM (pre_vm_variables).
    """
    if spec.needs_vm:
        raise UserError(f"prepare --out {str(out)!r}: this spec needs the VM stage (finalize) before the image "
                        "is converted; run prepare without --out, then finalize, after-vm and convert")
    check_environment(spec)
    with output_dir(out) as output:
        if image is not None:
            plan = prepare_image(spec, image, work, root_filesystem)
            final = _convert(spec, image, output)
        else:
            with scratch_dir(work) as scratch, raw_intermediate(spec, scratch, output) as raw:
                plan = prepare_image(spec, raw, scratch, root_filesystem)
                final = _convert(spec, raw, output)
        if variables_file is not None:
            write_pre_vm_variables(variables_file, pre_vm_variables(spec, plan, Path.cwd()))
        report(final)
    return final


def check_vm_inputs(spec: Spec) -> None:
    """The files the build VM reads, before any work: OVMF's code and variables with touchEFIVars (exit 2)."""
    if not (spec.needs_vm and spec.touch_efi_vars):
        return
    for field, path in (("efiFirmware", spec.efi_firmware), ("efiVariables", spec.efi_variables)):
        assert path is not None, "checked by the spec loader"
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the copy, a device is no firmware
                raise UserError(f"{field} {path!r}: not a regular file")
            os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            raise UserError(f"{field} {path!r}: {exc.strerror}") from None


def build(spec: Spec, out: Path, work: Path | None = None, report: Report = _no_report,
          root_filesystem: Path | None = None) -> Path:
    """The whole pipeline outside Nix: prepare, finalize in a VM when needed, after_vm, convert, postVM.

    OUT is locked before any work and changed as one transaction (builder/output.py): the image is in
    place for postVM, and everything is undone if a step, postVM or report (printing the path) fails.
    """
    check_vm_inputs(spec)
    check_environment(spec)
    with output_dir(out) as output:
        with scratch_dir(work) as scratch, raw_intermediate(spec, scratch, output) as raw:
            plan = prepare_image(spec, raw, scratch, root_filesystem)
            variables = pre_vm_variables(spec, plan, Path.cwd())
            if spec.needs_vm:
                with step("finalize (VM)"):
                    from .vm.runner import run_finalize

                    run_finalize(spec, raw, scratch)
                after_vm(spec, raw)
                vars_file = raw.parent / "efi-vars.fd"
                if spec.touch_efi_vars and vars_file.exists():
                    shutil.copyfile(vars_file, output.stage("efi-vars.fd"))
            final = _convert(spec, raw, output)
        # After the scratch directory and the raw intermediate are gone: postVM needs neither, and what it
        # leaves running is killed at its end (builder/signals.py), which must not reach their janitor.
        with step("postVM"):
            run_post_vm(spec, final, variables)
        if not os.path.lexists(final):  # nixpkgs' postVM may compress or rename it: not an error
            info(f"postVM removed or moved {str(final)!r}; the path printed is the image as the build made it")
        report(final)
    return final
