"""What a finished (or failed) build may have left on the host, read from /proc, losetup and the file tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def mounts_under(path: Path) -> list[str]:
    """Lines of /proc/mounts whose mount point or source lies under path."""
    marker = str(path)
    return [line for line in Path("/proc/mounts").read_text().splitlines() if marker in line]


def loops_under(path: Path) -> list[str]:
    """Loop devices (`losetup -a`) backed by a file under path."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains text (the test's private directory names them)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and text.encode() in raw and int(pid) != os.getpid():
            found.append(pid + ": " + raw.replace(b"\0", b" ").decode(errors="replace"))
    return found


def tree_listing(path: Path) -> list[str]:
    """Every entry below path (relative, sorted): empty means nothing was left behind."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def assert_nothing_left(private: Path, tmpdir: Path, out: Path, *, image_allowed: bool = False) -> None:
    """No mounts, loop devices or processes under private, an empty TMPDIR, and no image in out."""
    assert mounts_under(private) == []
    assert loops_under(private) == []
    assert processes_mentioning(str(private)) == []
    assert tree_listing(tmpdir) == []
    if not image_allowed:
        assert tree_listing(out) == [], "the output directory holds a partial result"
