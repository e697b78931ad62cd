"""The seed's diskSize = "auto" formula (nixpkgs-notes §1.5), run with the same find and du on a tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

MiB = 1 << 20


def _round_to_nearest(x: int, unit: int) -> int:
    """make-disk-image.nix's round_to_nearest: (x/unit + 1) * unit, which always adds one unit."""
    return (x // unit + 1) * unit


def seed_auto_size(root: Path, boot_bytes: int, additional: int) -> dict[str, int]:
    """Disk size the seed computes for an `efi` image of the tree at root, with its parts."""
    du = subprocess.run(
        "find . ! -type d -print0 | du --files0-from=- --apparent-size --count-links --block-size 4096"
        " | cut -f1 | awk '{s+=$1} END {print s+0}'",
        shell=True, cwd=root, check=True, capture_output=True, text=True).stdout
    inodes = subprocess.run("find . | wc -l", shell=True, cwd=root, check=True, capture_output=True,
                            text=True).stdout
    usage = (int(du) + 2 * int(inodes)) * 4096
    fudge = usage * 52 // 1000
    fs_needed = _round_to_nearest(usage + fudge, 4096)
    reserved = 512 * 34 + boot_bytes
    disk = _round_to_nearest(fs_needed + additional + reserved, MiB)
    return {"usage": usage, "inodes": int(inodes), "fudge": fudge, "fs_needed": fs_needed, "disk": disk,
            "root_fs": disk - boot_bytes - 512 * 34}
