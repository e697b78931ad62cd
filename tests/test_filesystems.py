"""Root filesystems btrfs, xfs, erofs and squashfs under efi, legacy and none, read back with their own tools."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.system import fixture_system_spec
from tests.support.fscheck import checker, cut, extract, owners_and_modes, root_range
from tests.support.imagecheck import blkid
from tests.support.specs import SpecFactory, spec_doc
from tests.support.trees import closure_paths, same_tree

pytestmark = pytest.mark.slow

LAYOUTS = ["efi", "legacy", "none"]
ROOT_NUMBER: dict[str, int | None] = {"efi": 2, "legacy": 1, "none": None}
UUID = "f222513b-ded1-49fa-b591-20ce86a2fe7f"
READ_ONLY = {"erofs", "squashfs"}
Built = Callable[[str, str], tuple[Path, Path]]


def prepare(spec: Path, image: Path) -> subprocess.CompletedProcess[str]:
    """`python -m builder prepare` as a separate process."""
    return subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def xfs_base(fixture_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixture system (no whitespace in its store names, which xfs protofiles cannot express) + contents."""
    spec = fixture_system_spec(tmp_path_factory.mktemp("xfs-system"), "efi", fsType="xfs", installBootLoader=False)
    doc: dict[str, Any] = {**spec_doc(spec), "contents": spec_doc(fixture_spec)["contents"]}
    return doc


@pytest.fixture(scope="module")
def built(make_spec: SpecFactory, xfs_base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build (once per module) the image of fsType under layout; returns (image, spec)."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}
    out = tmp_path_factory.mktemp("fs-images")

    def get(fs: str, layout: str) -> tuple[Path, Path]:
        if (fs, layout) not in cache:
            if fs in READ_ONLY:
                spec = make_spec(fsType=fs, onlyNixStore=True, contents=[], installBootLoader=False,
                                 partitionTableType=layout, label="nix-store")
            elif fs == "xfs":
                spec = out / f"xfs-{layout}.json"
                spec.write_text(json.dumps({**xfs_base, "partitionTableType": layout}))
            else:
                spec = make_spec(fsType=fs, partitionTableType=layout)
            image = out / f"{fs}-{layout}.img"
            res = prepare(spec, image)
            assert res.returncode == 0, res.stderr
            cache[fs, layout] = (image, spec)
        return cache[fs, layout]

    return get


def root_part(image: Path, layout: str, dest: Path) -> Path:
    """The root filesystem's bytes cut out of the image by sfdisk's numbers."""
    offset, size = root_range(image, ROOT_NUMBER[layout])
    return cut(image, offset, size, dest)


FS_LAYOUTS = [(fs, layout) for fs in ("btrfs", "xfs", "erofs", "squashfs") for layout in LAYOUTS]


@pytest.mark.parametrize(("fs", "layout"), FS_LAYOUTS)
def test_checker_clean_and_identity(fs: str, layout: str, built: Built, tmp_path: Path) -> None:
    image, spec = built(fs, layout)
    part = root_part(image, layout, tmp_path / "root.part")
    res = checker(fs, part)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    offset, _ = root_range(image, ROOT_NUMBER[layout])
    probe = blkid(image, offset)
    assert probe["TYPE"] == fs
    if fs != "squashfs":  # squashfs has neither label nor UUID
        assert (probe["LABEL"], probe["UUID"]) == (spec_doc(spec)["label"], UUID)


@pytest.mark.parametrize(("fs", "layout"), [(fs, lay) for fs, lay in FS_LAYOUTS if fs not in READ_ONLY])
def test_system_root_store_verifies(fs: str, layout: str, built: Built, tmp_path: Path) -> None:
    """nix-store --verify --check-contents on the root copied out with the filesystem's own tool."""
    image, spec = built(fs, layout)
    root = extract(fs, root_part(image, layout, tmp_path / "root.part"), tmp_path / "root")
    store = ["nix-store", "--store", str(root), "--option", "substituters", ""]
    res = subprocess.run([*store, "--verify", "--check-contents"], capture_output=True, text=True)
    assert res.returncode == 0 and "error" not in res.stderr.lower(), res.stderr
    paths = closure_paths(spec)
    in_store = sorted(n for n in os.listdir(root / "nix/store") if n != ".links")  # .links: made by --verify
    assert in_store == sorted(os.path.basename(p) for p in paths)
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            assert same_tree(Path(path), root / path.lstrip("/")) == []
    assert subprocess.run([*store, "--check-validity", *paths], capture_output=True).returncode == 0


@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_owners_modes_and_store_permissions(fs: str, built: Built, tmp_path: Path) -> None:
    """Root owns everything but the contents' numeric owners, although prepare ran without root privileges."""
    image, spec = built(fs, "efi")
    root = extract(fs, root_part(image, "efi", tmp_path / "root.part"), tmp_path / "root")
    facts = owners_and_modes(root)
    assert facts["/srv/tree"] == (1234, 5678, 0o755)
    assert facts["/srv/tree/sub/deeper/leaf.txt"] == (1234, 5678, 0o755)
    assert facts["/usr/local/bin/suid-tool"] == (0, 0, 0o4755)
    assert facts["/etc/fixture.d/a.conf"] == (0, 100, 0o640)
    assert facts["/nix/store"] == (0, 0, 0o1775)
    owned = {"/srv/tree", "/etc/fixture.d/a.conf", "/etc/fixture.d/b.conf", "/etc/fixture.d/c.conf"}
    others = {p: f[:2] for p, f in facts.items()
              if f[:2] != (0, 0) and p not in owned and not p.startswith("/srv/tree/")}
    assert others == {}
    assert os.readlink(root / "srv/tree/sub/link") == "deeper/leaf.txt"


@pytest.mark.parametrize("fs", ["erofs", "squashfs"])
def test_store_only_trees_identical(fs: str, built: Built, make_spec: SpecFactory, tmp_path: Path) -> None:
    """The read-only store image holds exactly the closure, byte for byte, all owned by root."""
    image, spec = built(fs, "none")
    root = extract(fs, image, tmp_path / "root")
    paths = closure_paths(spec)
    assert sorted(os.listdir(root)) == sorted(os.path.basename(p) for p in paths)
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            assert same_tree(Path(path), root / os.path.basename(path)) == []
        elif os.path.islink(path):
            assert os.readlink(root / os.path.basename(path)) == os.readlink(path)
    assert {f[:2] for f in owners_and_modes(root).values()} == {(0, 0)}


def pair(spec: Path) -> str:
    """The fixture's hard-linked pair directory (store path relative to the store)."""
    files = next(p for p in closure_paths(spec) if p.endswith("-files"))
    return f"{os.path.basename(files)}/share/pair"


def test_hard_links_kept_btrfs(built: Built, tmp_path: Path) -> None:
    image, spec = built("btrfs", "none")
    dump = subprocess.run(["btrfs", "inspect-internal", "dump-tree", "-t", "fs", str(image)],
                          capture_output=True, text=True, check=True).stdout
    names: dict[str, int] = {}
    for m in re.finditer(r"key \((\d+) INODE_REF \d+\)[^\n]*\n((?:\s+index [^\n]*\n)+)", dump):
        for name in re.findall(r"name: (\S+)", m.group(2)):
            names.setdefault(name, int(m.group(1)))
    assert names["a"] == names["b"]
    item = re.search(rf"key \({names['a']} INODE_ITEM 0\)[^\n]*\n[^\n]*\n[^\n]*links (\d+)", dump)
    assert item and item.group(1) == "2"


def test_hard_links_kept_erofs(built: Built) -> None:
    image, spec = built("erofs", "none")

    def nid(name: str) -> str:
        out = subprocess.run(["dump.erofs", f"--path=/{pair(spec)}/{name}", str(image)], capture_output=True,
                             text=True, check=True).stdout
        m = re.search(r"NID: (\d+)\s+Links: (\d+)", out)
        assert m, out
        return f"{m.group(1)}/{m.group(2)}"

    assert nid("a") == nid("b")
    assert nid("a").endswith("/2")


def test_hard_links_kept_squashfs(built: Built, tmp_path: Path) -> None:
    image, spec = built("squashfs", "none")
    root = extract("squashfs", image, tmp_path / "root")
    a, b = os.stat(root / pair(spec) / "a"), os.stat(root / pair(spec) / "b")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)


def test_xfs_refuses_names_with_whitespace(fixture_spec: Path, make_spec: SpecFactory, tmp_path: Path) -> None:
    """The fixture closure holds 'with space': mkfs.xfs protofiles cannot name it; the error says so and where."""
    image = tmp_path / "x.img"
    res = prepare(make_spec(fsType="xfs", partitionTableType="legacy"), image)
    assert res.returncode == 2, res.stderr
    assert "share/with space" in res.stderr and "whitespace" in res.stderr and "Traceback" not in res.stderr
    assert not image.exists() and not Path(f"{image}.partial").exists()


def test_btrfs_fixed_disk_too_small(make_spec: SpecFactory, tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    res = prepare(make_spec(fsType="btrfs", partitionTableType="legacy", diskSize=64), image)
    assert res.returncode == 2
    assert "diskSize = 64 MiB is too small for fsType = \"btrfs\"" in res.stderr and "use diskSize >=" in res.stderr
    assert not image.exists()


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"fsType": "erofs"}, "$.fsType: 'erofs' is read-only and allowed only with onlyNixStore = true"),
    ({"fsType": "squashfs"}, "$.fsType: 'squashfs' is read-only"),
    ({"fsType": "vfat"}, "$.fsType: \"vfat\" is not allowed for the root filesystem"),
    ({"fsType": "xfs", "label": "thirteen-char"}, "$.label: \"thirteen-char\" is not allowed with fsType = 'xfs'"),
    ({"fsType": "erofs", "onlyNixStore": True, "contents": [], "label": "seventeen-chars!!"},
     "at most 16 fit"),
    ({"fsType": "btrfs", "rootFSUID": None}, "$.rootFSUID: null is not allowed with deterministic = true"),
])
def test_fs_type_spec_errors(overrides: dict[str, Any], fragment: str, make_spec: SpecFactory,
                             tmp_path: Path) -> None:
    res = prepare(make_spec(**overrides), tmp_path / "x.img")
    assert res.returncode == 2
    assert fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_root_partition_is_sparse(built: Built) -> None:
    """The root filesystem was copied in hole-aware: the image allocates little more than its data."""
    image, _ = built("btrfs", "efi")
    assert os.stat(image).st_blocks * 512 < 48 * 1024 * 1024 < os.path.getsize(image)
