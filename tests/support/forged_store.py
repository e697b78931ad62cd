"""Store paths no Nix made, written as root under the real /nix/store and registered through a closureInfo copy."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from builder.staging.store import NIX32_ALPHABET, nix32
from tests.support.specs import SpecFactory, spec_doc

STORE = Path("/nix/store")


def store_path(name: str) -> Path:
    """A store path name of the tests' own (32 Nix base-32 digits from the name, then the name)."""
    digest = nix32(hashlib.sha256(f"mdi-hostile-store-{name}".encode()).digest())[:32]
    assert not digest.strip(NIX32_ALPHABET)
    return STORE / f"{digest}-mdi-hostile-{name}"


def remove(path: Path) -> None:
    """Remove a forged store path, whatever it is."""
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        os.chmod(path, 0o755)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextmanager
def forged(name: str) -> Iterator[Path]:
    """A fresh forged store path for the block to fill; removed afterwards."""
    path = store_path(name)
    remove(path)
    try:
        yield path
    finally:
        remove(path)


def spec_with(make_spec: SpecFactory, fixture_spec: Path, paths: list[Path], workdir: Path, **overrides: Any) -> Path:
    """A spec of the fixture with paths added to additionalPaths and to a copy of its closureInfo's registration."""
    doc = spec_doc(fixture_spec)
    info = workdir / "closure-info"
    shutil.copytree(doc["system"]["closureInfo"], info)
    fake_hash = "sha256:" + nix32(hashlib.sha256(b"not a NAR").digest())
    with open(info / "registration", "a") as f:
        for p in paths:
            f.write(f"{p}\n{fake_hash}\n0\n\n0\n")
    system = {**doc["system"], "closureInfo": str(info),
              "additionalPaths": [*doc["system"]["additionalPaths"], *map(str, paths)]}
    return make_spec(system=system, **overrides)
