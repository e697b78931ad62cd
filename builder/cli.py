"""Command line: prepare, root-filesystem, finalize, after-vm, convert, build, inspect, pin.

User errors exit 2 without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from .errors import BuildError, Interrupted, UserError
from .signals import handle_termination

WORK_HELP = "where the build makes its own scratch directory, removed afterwards (default: TMPDIR)"


def _parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = argparse.ArgumentParser(prog="python -m builder", description="Build NixOS disk images from a JSON spec.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="unprivileged: stage, size, partition and populate a raw image")
    s.add_argument("spec", type=Path)
    s.add_argument("--image", type=Path, help="raw image file to write (required without --out; with --out, "
                   "default: where it costs no extra write, gone afterwards)")
    s.add_argument("--work", type=Path, help=WORK_HELP)
    s.add_argument("--out", type=Path, help="then convert the image into OUT in the same process, as `convert` "
                   "would (only for a spec with no VM stage)")
    s.add_argument("--root-filesystem", type=Path, help="place this root filesystem (from `root-filesystem`, "
                   "shareRootFilesystem) instead of making it")
    s.add_argument("--pre-vm-variables", type=Path, help="write the shell variables nixpkgs' preVM sets (root, "
                   "bootSize, bootSizeMiB, START, SECTORS) to this file, for postVM to source")

    s = sub.add_parser("root-filesystem", help="shareRootFilesystem: only the root filesystem, as the file OUT, "
                       "for `prepare --root-filesystem` of every variant with the same root")
    s.add_argument("spec", type=Path)
    s.add_argument("--out", type=Path, required=True, help="the file to write (written under another name, "
                   "then renamed)")
    s.add_argument("--work", type=Path, help=WORK_HELP)

    s = sub.add_parser("finalize", help="as root in the VM: bootloader, owners by name, tune2fs")
    s.add_argument("spec", type=Path)
    s.add_argument("--device", default="/dev/vda", help="the image's block device (default /dev/vda)")
    s.add_argument("--print", action="store_true", help="print the in-VM script instead of running it")

    s = sub.add_parser("convert", help="write <baseName>.<ext> in the requested format and the Hydra product line")
    s.add_argument("spec", type=Path)
    s.add_argument("--image", type=Path, required=True, help="the raw image (moved when format is raw)")
    s.add_argument("--out", type=Path, required=True)

    s = sub.add_parser("build", help="the whole pipeline: prepare, finalize (in a VM when needed), convert")
    s.add_argument("spec", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--work", type=Path, help=WORK_HELP)
    s.add_argument("--root-filesystem", type=Path, help="as for prepare")

    s = sub.add_parser("after-vm", help="after the VM: check the image, then pin times, journal, free space and "
                       "FAT entries (deterministic)")
    s.add_argument("spec", type=Path)
    s.add_argument("--image", type=Path, required=True, help="the raw image the VM finalized")

    s = sub.add_parser("check-reproducible", help="build twice from fresh work directories; name what differs")
    s.add_argument("spec", type=Path)
    s.add_argument("--work", type=Path, help="where the two builds go (default: a temporary directory)")

    s = sub.add_parser("inspect", help="print what independent tools read from an image, as JSON")
    s.add_argument("image", type=Path)

    s = sub.add_parser("validate", help="validate a spec and print it normalized")
    s.add_argument("spec", type=Path)

    s = sub.add_parser("pin", help="refresh nix/pin.json (the nixpkgs pin for non-flake users)")
    s.add_argument("--file", type=Path, default=Path("nix/pin.json"))
    s.add_argument("--owner", default="NixOS")
    s.add_argument("--repo", default="nixpkgs")
    s.add_argument("--rev", default="nixos-25.11", help="branch, tag or commit to pin")
    return p


def print_path(path: Path) -> None:
    """Print the finished image's path: the last step of a build, so a full or closed stdout undoes the build.

    Written straight to the file descriptor (nothing is left in a buffer for the interpreter to fail on
    at exit); through print() where stdout has no descriptor (tests capturing it).
    """
    data = f"{path}\n".encode("utf-8", "surrogateescape")
    if _stdout_closed:
        raise BuildError("cannot print the image's path: the builder was started with stdout closed; the build is "
                         "undone")
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        print(path, flush=True)
        return
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError as exc:
        raise BuildError(f"cannot print the image's path on stdout ({exc}); the build is undone") from None


def run(args: argparse.Namespace) -> int:
    """Dispatch one parsed command."""
    from .spec import load_spec

    if args.command == "validate":
        spec = load_spec(args.spec)
        print(json.dumps(spec.raw, indent=2, sort_keys=True))
        return 0
    if args.command == "prepare":
        from .pipeline import prepare_and_convert, prepare_image

        spec = load_spec(args.spec)
        if args.out is None:
            if args.image is None:
                raise UserError("prepare: --image is required unless --out is given")
            plan = prepare_image(spec, args.image, args.work, args.root_filesystem)
            if args.pre_vm_variables is not None:
                from .pipeline import pre_vm_variables, write_pre_vm_variables

                write_pre_vm_variables(args.pre_vm_variables, pre_vm_variables(spec, plan, Path.cwd()))
        else:
            prepare_and_convert(spec, args.image, args.out, args.work, report=print_path,
                                root_filesystem=args.root_filesystem, variables_file=args.pre_vm_variables)
        return 0
    if args.command == "root-filesystem":
        from .pipeline import build_root_filesystem

        print_path(build_root_filesystem(load_spec(args.spec), args.out, args.work))
        return 0
    if args.command == "finalize":
        from .vm.finalize import finalize

        return finalize(load_spec(args.spec), args.device, print_only=args.print)
    if args.command == "convert":
        from .pipeline import convert_image

        convert_image(load_spec(args.spec), args.image, args.out, report=print_path)
        return 0
    if args.command == "build":
        from .pipeline import build

        build(load_spec(args.spec), args.out, args.work, report=print_path, root_filesystem=args.root_filesystem)
        return 0
    if args.command == "after-vm":
        from .pipeline import after_vm

        after_vm(load_spec(args.spec), args.image)
        return 0
    if args.command == "check-reproducible":
        from .tools.reprocheck import check_reproducible

        return check_reproducible(load_spec(args.spec), args.work)
    if args.command == "inspect":
        from .tools.inspect import inspect_image

        print(json.dumps(inspect_image(args.image), indent=2, sort_keys=True))
        return 0
    if args.command == "pin":
        from .tools.nixpkgs_pin import refresh_pin

        refresh_pin(args.file, args.owner, args.repo, args.rev)
        return 0
    raise AssertionError(args.command)


def _limit_hint(exc: OSError) -> str:
    """What a process limit failure means: the build needs more processes or descriptors than it may have."""
    if exc.errno == errno.EAGAIN:
        return (" (no process or thread could be started: the build runs mkfs, debugfs and other tools as child "
                "processes; raise the process limit, ulimit -u, or the memory limit, ulimit -v)")
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return " (too many open files: the build needs a few dozen file descriptors; raise ulimit -n)"
    return ""


# Whether the builder was started with fd 1 closed: print_path then fails, so the build is undone.
_stdout_closed = False


def reserve_standard_fds() -> None:
    """Put /dev/null on fds 0-2 the builder was started without, so that no file it opens becomes one of them.

    A closed fd 2 made Python print errors to stdout (print(file=None)); a file opened as fd 1 or 2 would
    receive the output of every tool the build runs. A closed stdout is remembered: the path cannot be printed.
    """
    global _stdout_closed
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    if not closed:
        return
    null = os.open(os.devnull, os.O_RDWR)  # lands on the lowest closed fd, non-inheritable like every os.open
    for fd in closed:
        if fd != null:
            os.dup2(null, fd, inheritable=True)
        else:  # so the tools the build starts get /dev/null there too, not a closed fd 0
            os.set_inheritable(fd, True)
    if null not in closed:
        os.close(null)
    if 1 in closed:
        _stdout_closed = True
    if 2 in closed:
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")


def _error(message: str) -> None:
    """Print the final error line to stderr; a stderr that cannot be written must not change the exit status."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors exit 2, build failures 1, a terminating signal 128+signal after cleanup."""
    reserve_standard_fds()
    args = _parser().parse_args(argv)
    try:
        with handle_termination():
            return run(args)
    except Interrupted as exc:
        _error(f"{exc}: stopped, temporary files removed")
        return exc.exit_status
    except UserError as exc:
        _error(f"error: {exc}")
        return exc.exit_status
    except BuildError as exc:
        _error(f"build failed: {exc}")
        return exc.exit_status
    except OSError as exc:  # the host failed us (no space, file too large, I/O error): a message, not a traceback
        _error(f"build failed: {exc}{_limit_hint(exc)}")
        return 1
    except KeyboardInterrupt:  # SIGINT before the handlers were installed
        _error("interrupted")
        return 130
