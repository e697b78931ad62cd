"""Big directories are hash-indexed in every ext root the builder writes, as the kernel would have them.

mkfs.ext4 -d (e2fsprogs 1.47) writes every directory linear, and the kernel indexes a directory only while it
has one block (fs/ext4/namei.c make_indexed_dir), so a linear /nix/store of many blocks stays linear: linear
lookups, and mkdir fails with EMLINK past 65000 subdirectories (EXT4_DIR_LINK_MAX). Checked with debugfs
(`stat` shows EXT4_INDEX_FL 0x1000, `htree_dump` reads the index) and e2fsck -fn on the images of the no-VM
path, the VM path, a shared root filesystem and onlyNixStore; the bytes are the same run after run; and the
kernel (the host's, mounting a `none` image) takes more than 65000 new subdirectories in its /nix/store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.nixstore import run_nix, write_closure_info
from tests.fixtures.system import fixture_system_spec
from tests.support.digest import sha256
from tests.support.imagecheck import part_offset
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent
EXT4_INDEX_FL = 0x1000
STORE_PATHS = 120  # /nix/store of the fixture plus these: three blocks as a linear directory
BIG_DIR_FILES = 3000  # one directory of a store path: about 30 blocks
BIG_DIR = "big-directory"


def _added_store_paths(work: Path) -> list[str]:
    """Small store paths added with nix-store --add (the same each run): many /nix/store entries, one of them
    a directory of BIG_DIR_FILES files."""
    src = work / "store-src"
    big = src / BIG_DIR
    big.mkdir(parents=True, exist_ok=True)
    for i in range(BIG_DIR_FILES):
        (big / f"entry-{i:05d}.txt").write_text("")
    files = [big]
    for i in range(STORE_PATHS):
        f = src / f"mdi-directories-fixture-{i:03d}"
        f.write_text(f"store path {i} of the directory fixture\n")
        files.append(f)
    return [line for line in run_nix(["nix-store", "--add", *map(str, files)]).splitlines() if line]


def _with_store_paths(spec: Path, added: list[str], **overrides: Any) -> Path:
    """The spec with `added` in system.additionalPaths and its closure info (keys overridden), written beside it."""
    doc = json.loads(spec.read_text())
    info = Path(doc["system"]["closureInfo"])
    roots = [p for p in (info / "store-paths").read_text().split() if p] + added
    new_info = write_closure_info(roots, spec.parent / "closure-info-directories")
    doc["system"] = {**doc["system"], "closureInfo": str(new_info),
                     "additionalPaths": [*doc["system"]["additionalPaths"], *added]}
    doc.update(overrides)
    out = spec.parent / f"spec-directories-{len(list(spec.parent.glob('spec-directories-*')))}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _builder(*argv: str | Path) -> str:
    """Run `python -m builder ARGV...`; its stdout, or the test fails with its stderr."""
    res = subprocess.run([sys.executable, "-m", "builder", *map(str, argv)], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def _debugfs(target: str, request: str) -> str:
    """debugfs -R request on target (path?offset=N); its stdout, or the test fails with its stderr."""
    res = subprocess.run(["debugfs", "-R", request, target], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _flags(target: str, path: str) -> int:
    """The inode flags debugfs `stat` shows for path."""
    out = _debugfs(target, f'stat "{path}"')
    found = re.search(r"Flags: (0x[0-9a-f]+)", out)
    assert found, out
    return int(found[1], 16)


def assert_indexed(target: str, *paths: str) -> None:
    """Each path is a directory with EXT4_INDEX_FL whose htree debugfs reads; e2fsck -fn finds the fs clean."""
    for path in paths:
        assert _flags(target, path) & EXT4_INDEX_FL, f"{path} is not hash-indexed"
        dump = _debugfs(target, f'htree_dump "{path}"')
        assert "Root node dump:" in dump and "Entry #1:" in dump, dump[:2000]
    fsck = subprocess.run(["e2fsck", "-fn", target], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout[-3000:]


def _superblock(target: str) -> dict[str, str]:
    """dumpe2fs -h of target as a dict."""
    out = subprocess.run(["dumpe2fs", "-h", target], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in out.splitlines()) if sep}


@pytest.fixture(scope="module")
def added(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The added store paths (nix-store --add), the big directory's first."""
    return _added_store_paths(tmp_path_factory.mktemp("directories-store"))


def test_no_vm_image_has_indexed_directories_and_the_same_bytes_twice(
        make_spec: SpecFactory, added: list[str], tmp_path: Path) -> None:
    spec = _with_store_paths(make_spec(), added)
    images = []
    for run in ("a", "b"):
        image = tmp_path / f"{run}.img"
        _builder("prepare", spec, "--image", image, "--work", tmp_path / f"work-{run}")
        images.append(image)
    target = f"{images[0]}?offset={part_offset(images[0], 2)}"
    assert_indexed(target, "/nix/store", f"{added[0]}")
    doc = json.loads(spec.read_text())
    sb = _superblock(target)
    assert sb["Directory Hash Seed"] == doc["rootFSUID"].lower()
    # e2fsck stamps the clock's time; the build sets the fixed one back (mkfs wrote it as the creation time)
    assert sb["Last write time"] == sb["Last checked"] == sb["Filesystem created"]
    assert sha256(images[0]) == sha256(images[1])


def test_only_nix_store_image_has_an_indexed_root(make_spec: SpecFactory, added: list[str], tmp_path: Path) -> None:
    spec = _with_store_paths(make_spec(onlyNixStore=True, contents=[], label="nix-store"), added)
    image = tmp_path / "store.img"
    _builder("prepare", spec, "--image", image, "--work", tmp_path / "work")
    name = os.path.basename(added[0])
    assert_indexed(f"{image}?offset={part_offset(image, 2)}", "/", f"/{name}")


def test_shared_root_filesystem_has_indexed_directories(make_spec: SpecFactory, added: list[str],
                                                        tmp_path: Path) -> None:
    spec = _with_store_paths(make_spec(partitionTableType="legacy", shareRootFilesystem=True), added)
    root = tmp_path / "root.ext4"
    _builder("root-filesystem", spec, "--out", root)
    assert_indexed(str(root), "/nix/store", added[0])


@pytest.mark.slow
@pytest.mark.boot
def test_vm_image_has_indexed_directories(added: list[str], tmp_path: Path) -> None:
    """Through the build VM (a bootloader installed), deterministic = false: no settle step rewrites them."""
    spec = _with_store_paths(fixture_system_spec(tmp_path / "system", "legacy", deterministic=False), added)
    image = Path(_builder("build", spec, "--out", tmp_path / "out").strip())
    assert_indexed(f"{image}?offset={part_offset(image, 1)}", "/nix/store", added[0])


@pytest.mark.slow
def test_kernel_takes_more_than_65000_new_store_directories(make_spec: SpecFactory, added: list[str],
                                                            tmp_path: Path) -> None:
    """The host kernel mounts the root of a `none` image and makes 65001 directories in its /nix/store."""
    spec = _with_store_paths(make_spec(partitionTableType="none", diskSize=1400), added)
    image = tmp_path / "root.img"
    _builder("prepare", spec, "--image", image, "--work", tmp_path / "work")
    with tempfile.TemporaryDirectory(prefix="mdi-dirs-mnt-") as mnt:
        subprocess.run(["mount", "-t", "ext4", "-o", "loop", str(image), mnt], check=True, capture_output=True)
        try:
            store = Path(mnt) / "nix" / "store"
            before = os.stat(store).st_nlink
            made = 0
            for i in range(65001):
                os.mkdir(store / f"{i:032x}-new-store-directory")
                made += 1
            assert made == 65001 and before > 2
        finally:
            subprocess.run(["umount", mnt], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout[-3000:]
