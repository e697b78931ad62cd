"""Comparing trees and reading closures for tests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.support.specs import spec_doc


def closure_paths(spec: Path) -> list[str]:
    """Store paths listed by the spec's closureInfo."""
    info = Path(spec_doc(spec)["system"]["closureInfo"])
    return (info / "store-paths").read_text().split()


def same_tree(a: Path, b: Path) -> list[str]:
    """Differences between two trees in type, permission bits, symlink targets and bytes."""
    diffs = []
    for dirpath, dirnames, filenames in os.walk(a):
        for name in dirnames + filenames:
            pa = Path(dirpath) / name
            pb = b / pa.relative_to(a)
            sa, sb = os.lstat(pa), os.lstat(pb) if os.path.lexists(pb) else None
            if sb is None:
                diffs.append(f"missing {pb}")
                continue
            if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode) or (
                    not stat.S_ISLNK(sa.st_mode) and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode)):
                diffs.append(f"mode {pa}: {oct(sa.st_mode)} != {oct(sb.st_mode)}")
            elif stat.S_ISLNK(sa.st_mode) and os.readlink(pa) != os.readlink(pb):
                diffs.append(f"link {pa}")
            elif stat.S_ISREG(sa.st_mode) and pa.read_bytes() != pb.read_bytes():
                diffs.append(f"bytes {pa}")
    return diffs
