"""The four ways to build the same `efi` image with an ext4 root, each as a list of commands to time."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .closure import LOGICAL_STORE, Closure

METHODS = ("builder", "floor", "repart", "seed")
ROOT_ONLY = ("repart", "seed")
BOOT_MIB = 256
ADDITIONAL_SPACE = "512M"
LABEL = "nixos"
ROOT_GUID = "F222513B-DED1-49FA-B591-20CE86A2FE7F"
REPART_SEED = "6e1f2a52-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
Step = dict[str, Any]
# Runs a command with the closure at /nix/store in a private mount namespace, whether or not the host has one.
STORE_VIEW = ("unshare", "--mount", "--propagation", "private", "sh", str(Path(__file__).with_name("storeview.sh")))


@dataclass(frozen=True)
class Plan:
    """One method run: the commands to time and the image file they leave."""

    steps: list[Step]
    image: Path  # the raw image to measure (for the builder's converted formats: made from output, untimed)
    root_offset: int | None = None  # where the root fs starts when the image has no partition table
    output: Path | None = None  # the converted image, for formats other than raw


FORMATS = ("raw", "qcow2", "qcow2-compressed")


def converted_name(fmt: str) -> str:
    """The builder's output file name for a format (baseName nixos)."""
    return "nixos.img" if fmt == "raw" else "nixos.qcow2"


def convert_step(image: Path, fmt: str) -> list[Step]:
    """What the floor and repart add for a converted format: one `qemu-img convert` of their raw image, as
    nixpkgs' make-disk-image.nix does (`-c` for qcow2-compressed)."""
    if fmt == "raw":
        return []
    return [{"name": "qemu-img convert", "argv": ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                                                   *(["-c"] if fmt == "qcow2-compressed" else []),
                                                   str(image), str(image.with_suffix(".qcow2"))]}]


def spec_document(closure: Closure, logical_store: bool, fmt: str = "raw") -> dict[str, Any]:
    """The builder's spec for the closure: efi, ext4, auto size, no VM (no bootloader, contents or channel).

    With logical_store the spec names /nix/store (the tree is bind-mounted there), else the tree's own
    store directory, which the builder then also uses as the store's place inside the image.
    """
    store = LOGICAL_STORE if logical_store else str(closure.store_dir)
    info = closure.closure_info_nix if logical_store else closure.closure_info
    return {
        "specVersion": 1, "name": "bench-disk-image", "baseName": "nixos", "format": fmt,
        "partitionTableType": "efi", "fsType": "ext4", "label": LABEL, "diskSize": "auto",
        "additionalSpace": ADDITIONAL_SPACE, "bootSize": f"{BOOT_MIB}M", "contents": [],
        "installBootLoader": False, "touchEFIVars": False, "efiFirmware": None, "efiVariables": None,
        "configFile": None, "postVM": "", "memSize": 1024, "onlyNixStore": False, "deterministic": True,
        "rootGPUID": ROOT_GUID, "rootFSUID": ROOT_GUID.lower(), "copyChannel": False,
        "system": {
            "toplevel": f"{store}/{closure.toplevel.name}", "closureInfo": str(info), "channel": None,
            "additionalPaths": [], "storeDir": store,
        },
        "bootLoader": {"grubDevices": []}, "sourceDateEpoch": 1, "enterCommand": "chroot",
    }


def stat_shim(src: Path, work: Path) -> tuple[str, str]:
    """The builder's stat shim and where it came from: built by pip next to the package, else compiled here.

    Without it the builder falls back to its slower debugfs pass, so a fresh clone must not time that.
    """
    built = sorted((src / "builder" / "sandbox").glob("_statshim*.so"))
    if built:
        return str(built[0]), f"{built[0].name}, built with the package"
    out = work / "statshim.so"
    source = src / "builder" / "sandbox" / "statshim.c"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(out), str(source), "-ldl"], check=True)
    return str(out), "compiled by the bench from builder/sandbox/statshim.c (the package was not built)"


def compile_bytecode(src: Path, python: str) -> str:
    """Byte-compile the timed builder package beside its sources (__pycache__, ignored by git), before timing.

    The Nix package is installed with its bytecode (buildPythonApplication compiles it), so a timed run
    must not compile the sources again, as an interpreter run with PYTHONDONTWRITEBYTECODE would on
    every run (about 0.1 s here). PYTHONPYCACHEPREFIX is dropped for the whole bench: with it the
    interpreter looks for every module's bytecode there only, and compiled the standard library on each
    run. Returns the fact line for the results; a tree that cannot be compiled is timed as it is.
    """
    os.environ.pop("PYTHONPYCACHEPREFIX", None)  # the timed runs inherit this process's environment
    done = subprocess.run([python, "-m", "compileall", "-q", str(src / "builder")], capture_output=True, text=True)
    if done.returncode != 0:
        return f"NOT compiled before timing ({(done.stdout + done.stderr).strip()[-300:]}): timed compiling it"
    return f"compiled before timing (python -m compileall {src / 'builder'}), as the Nix package installs it"


def builder_plan(closure: Closure, scratch: Path, python: str, src: Path, as_root: bool, shim: str,
                 fmt: str = "raw") -> Plan:
    """`python -m builder prepare --out`: prepare and convert to raw in one process, as a Nix build with no
    VM stage runs them.

    As root the closure is seen at /nix/store in a private mount namespace (bench/storeview.sh: what a Nix
    build sandbox sees, also on a host that has no /nix/store yet), so the image holds /nix/store like the
    other methods' images; `src` is the directory holding the `builder` package to time.
    """
    spec = scratch / "spec.json"
    spec.write_text(json.dumps(spec_document(closure, logical_store=as_root, fmt=fmt), indent=2) + "\n")
    out, work = scratch / "out", scratch / "builder-work"
    work.mkdir()
    env = {"PYTHONPATH": str(src), "MDI_STAT_SHIM": shim}
    # As nix/make-disk-image.nix runs it: no --image, so the raw image goes where it costs no extra write.
    prepare = [python, "-m", "builder", "prepare", str(spec), "--work", str(work), "--out", str(out)]
    if as_root:
        view = scratch / "store-view"
        view.mkdir()
        prepare = [*STORE_VIEW, str(closure.store_dir), str(view), "--", *prepare]
    steps: list[Step] = [{"name": "prepare", "argv": prepare, "env": env, "cwd": str(src)},
                         {"name": "sync", "argv": ["sync"]}]
    if fmt == "raw":
        return Plan(steps, out / "nixos.img")
    return Plan(steps, scratch / "measured.raw", output=out / converted_name(fmt))


def floor_plan(closure: Closure, scratch: Path, disk_size: int, root_offset: int, root_size: int,
               fmt: str = "raw") -> Plan:
    """`mkfs.ext4 -d` straight from the closure tree at the builder's root offset, in a file of its size
    (then one `qemu-img convert` for a converted format)."""
    image = scratch / "floor.img"
    return Plan([
        {"name": "truncate", "argv": ["truncate", "-s", str(disk_size), str(image)]},
        {"name": "mkfs-d", "argv": ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", LABEL, "-d", str(closure.root),
                                    "-E", f"offset={root_offset}", str(image), f"{root_size // 1024}k"]},
        *convert_step(image, fmt),
        {"name": "sync", "argv": ["sync"]},
    ], image, root_offset, None if fmt == "raw" else image.with_suffix(".qcow2"))


def repart_plan(closure: Closure, scratch: Path, disk_size: int, root_size: int, fmt: str = "raw") -> Plan:
    """systemd-repart 252: ESP + root with CopyFiles=, sized by hand (its --size=auto ignores CopyFiles)."""
    defs = scratch / "repart.d"
    defs.mkdir()
    (defs / "10-esp.conf").write_text(
        f"[Partition]\nType=esp\nFormat=vfat\nSizeMinBytes={BOOT_MIB - 8}M\nSizeMaxBytes={BOOT_MIB - 8}M\n")
    (defs / "20-root.conf").write_text(
        f"[Partition]\nType=root\nFormat=ext4\nLabel={LABEL}\nCopyFiles={closure.root}/nix:/nix\n"
        f"SizeMinBytes={root_size}\n")
    image = scratch / "repart.img"
    return Plan([
        {"name": "repart", "argv": ["systemd-repart", "--empty=create", f"--size={disk_size}", "--dry-run=no",
                                    f"--definitions={defs}", f"--seed={REPART_SEED}", "--no-pager", str(image)]},
        *convert_step(image, fmt),
        {"name": "sync", "argv": ["sync"]},
    ], image, None, None if fmt == "raw" else image.with_suffix(".qcow2"))


def seed_plan(closure: Closure, scratch: Path, staging: Path, repo: Path) -> Plan:
    """The seed's method (bench/seed_method.sh): staging copy, DB, auto size, parted, mkfs, loop mount, cp -a."""
    image = scratch / "seed.img"
    env = {
        "TREE": str(closure.root), "STAGE": str(staging), "IMG": str(image), "MNT": str(scratch / "mnt"),
        "REG": str(closure.closure_info_nix / "registration"),
        "TOPLEVEL": f"{LOGICAL_STORE}/{closure.toplevel.name}", "BOOT_MIB": str(BOOT_MIB),
        "ADDITIONAL": ADDITIONAL_SPACE, "LABEL": LABEL, "HOME": str(scratch), "LC_ALL": "C",
    }
    return Plan([
        {"name": "seed", "argv": ["bash", str(repo / "bench/seed_method.sh")], "env": env},
        {"name": "sync", "argv": ["sync"]},
    ], image)


def ensure_loop_nodes(count: int = 32) -> None:
    """Recreate /dev/loopN nodes: systemd-repart 252 deletes the ones it used, which breaks the next losetup."""
    for n in range(count):
        node = Path(f"/dev/loop{n}")
        if not node.exists():
            os.mknod(node, 0o660 | stat.S_IFBLK, os.makedev(7, n))
