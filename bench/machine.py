"""Facts about the machine a benchmark ran on, for the results file."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _out(argv: list[str]) -> str:
    """First line of a command's output, or '?' when it is missing or fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except OSError:
        return "?"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total() -> str:
    """MemTotal from /proc/meminfo, in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "?"


def _disk(path: Path) -> str:
    """The device, filesystem and disk kind holding path."""
    src = _out(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(path)])
    dev = src.split()[0] if src != "?" else ""
    kind = _out(["lsblk", "-dno", "SIZE,ROTA,MODEL", dev]).split() if dev.startswith("/dev/") else []
    size = kind[0] if kind else "?"
    rotational = "rotational" if kind[1:2] == ["1"] else "non-rotational" if kind[1:2] == ["0"] else "?"
    model = " ".join(kind[2:]) or "no model reported (virtual disk)"
    return f"{' '.join(src.split())}, {size}, kernel says {rotational}, {model}"


def machine_facts(work: Path, repo: Path) -> dict[str, str]:
    """nproc, kernel, CPU, memory, the disk under the work dir, and the versions of the tools timed."""
    return {
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "memory": _mem_total(),
        "work disk": _disk(work),
        "e2fsprogs": _out(["mke2fs", "-V"]),
        "systemd-repart": _out(["systemd-repart", "--version"]),
        "rsync": _out(["rsync", "--version"]),
        "python": platform.python_version(),
        "repo commit": _out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
    }
