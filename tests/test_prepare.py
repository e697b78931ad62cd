"""prepare, checked with independent tools: table layout, filesystems, store, Nix DB, contents, sizing."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder.spec import load_spec
from tests.support.digest import sha256
from tests.support.imagecheck import (
    blkid,
    debugfs,
    e2fsck_clean,
    extract_root,
    fsck_vfat,
    inode_facts,
    part_offset,
    part_size,
    sfdisk_json,
    superblock,
)
from tests.support.nixpkgs_tables import assert_same_table, nixpkgs_partition
from tests.support.specs import SpecFactory, spec_doc
from tests.support.trees import closure_paths, same_tree

MiB = 1024 * 1024
LAYOUTS = ["legacy", "legacy+boot", "legacy+gpt", "efi", "efixbootldr", "hybrid", "none"]
ROOT_NUMBER = {"legacy": 1, "legacy+boot": 2, "legacy+gpt": 2, "efi": 2, "efixbootldr": 3, "hybrid": 3}
FAT_PARTS = {"legacy+boot": {1: "BOOT"}, "efi": {1: "ESP"}, "efixbootldr": {1: "ESP", 2: "BOOT"}, "hybrid": {1: "ESP"}}


def prepare(spec: Path, image: Path, *, env: dict[str, str] | None = None,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m builder prepare` as a separate process (optionally as another user)."""
    argv = [sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).parent.parent)


def root_offset(image: Path, layout: str) -> int:
    """Where the root ext4 starts, read from the table."""
    return 0 if layout == "none" else part_offset(image, ROOT_NUMBER[layout])


@pytest.fixture(scope="module")
def specs(make_spec: SpecFactory) -> dict[str, Path]:
    """One fixed-size (320 MiB) spec per partition table type, bootSize "128M"."""
    return {layout: make_spec(partitionTableType=layout, diskSize=320, bootSize="128M") for layout in LAYOUTS}


@pytest.fixture(scope="module")
def layout_images(specs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The image prepared from each of `specs`."""
    out = tmp_path_factory.mktemp("layouts")
    images = {}
    for layout, spec in specs.items():
        image = out / f"{layout}.img"
        res = prepare(spec, image)
        assert res.returncode == 0, res.stderr
        images[layout] = image
    return images


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x != "none"])
def test_table_matches_nixpkgs_parted(layout: str, layout_images: dict[str, Path], specs: dict[str, Path],
                                      tmp_path: Path) -> None:
    """The table nixpkgs' own parted + sgdisk commands make on a 320 MiB file (tests/support/nixpkgs_tables.py)."""
    spec = load_spec(specs[layout])
    nixpkgs_partition(tmp_path / "nixpkgs.img", 320 * MiB, layout, "128M", True, spec.root_gpuid)
    assert_same_table(layout_images[layout], tmp_path / "nixpkgs.img", spec, ids=True)


def test_none_has_no_table(layout_images: dict[str, Path]) -> None:
    image = layout_images["none"]
    assert subprocess.run(["sfdisk", "--json", str(image)], capture_output=True).returncode != 0
    assert blkid(image, 0)["TYPE"] == "ext4"
    assert os.path.getsize(image) == 320 * MiB


@pytest.mark.parametrize("layout", LAYOUTS)
def test_filesystems_clean_and_labelled(layout: str, layout_images: dict[str, Path], tmp_path: Path) -> None:
    image = layout_images[layout]
    offset = root_offset(image, layout)
    fsck = e2fsck_clean(image, offset)
    assert fsck.returncode == 0, fsck.stdout
    root = blkid(image, offset)
    assert (root["TYPE"], root["LABEL"], root["UUID"]) == ("ext4", "nixos", "f222513b-ded1-49fa-b591-20ce86a2fe7f")
    for number, label in FAT_PARTS.get(layout, {}).items():
        start, size = part_offset(image, number), part_size(image, number)
        res = fsck_vfat(image, start, size, tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        fat = blkid(image, start)
        assert (fat["TYPE"], fat["LABEL"]) == ("vfat", label)
        assert fat["UUID"].replace("-", "") != ""


def test_layout_offsets_follow_nixpkgs(layout_images: dict[str, Path]) -> None:
    """Spot-check DESIGN §3 offsets independently of parted: bootSize "128M" ends the boot partition at 129 MiB
    (nixpkgs' round_to_nearest always adds a MiB)."""
    starts = {k: [int(p["start"]) * 512 for p in sfdisk_json(v)["partitions"]]
              for k, v in layout_images.items() if k != "none"}
    assert starts["legacy"] == [MiB]
    assert starts["legacy+boot"] == [MiB, 129 * MiB]
    assert starts["legacy+gpt"] == [MiB, 2 * MiB]
    assert starts["efi"] == [8 * MiB, 129 * MiB]
    assert starts["efixbootldr"] == [8 * MiB, 100 * MiB, 129 * MiB]
    assert starts["hybrid"] == [8 * MiB, 34 * 512, 129 * MiB]


# --- the store, the Nix database and what nixos-install leaves -------------------------------------------

@pytest.fixture(scope="module")
def efi_image(fixture_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture spec as written (efi, auto size, contents, additionalPaths)."""
    image = tmp_path_factory.mktemp("efi") / "efi.img"
    res = prepare(fixture_spec, image)
    assert res.returncode == 0, res.stderr
    assert "root filesystem (mkfs.ext4 -d) done in" in res.stderr  # each step logs its elapsed time
    return image


@pytest.fixture(scope="module")
def extracted(efi_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The efi image's root filesystem copied out with debugfs rdump."""
    return extract_root(efi_image, part_offset(efi_image, 2), tmp_path_factory.mktemp("rdump") / "root")


def test_store_paths_byte_identical_and_owned_by_root(fixture_spec: Path, extracted: Path) -> None:
    paths = closure_paths(fixture_spec)
    assert sorted(os.listdir(extracted / "nix/store")) == sorted(os.path.basename(p) for p in paths)
    for path in paths:
        src, dst = Path(path), extracted / path.lstrip("/")
        if src.is_dir() and not src.is_symlink():
            assert same_tree(src, dst) == []
        for dirpath, dirnames, filenames in os.walk(dst):
            for name in [*dirnames, *filenames, "."]:
                st = os.lstat(Path(dirpath) / name)
                assert (st.st_uid, st.st_gid) == (0, 0), Path(dirpath) / name


def test_hard_links_shared(fixture_spec: Path, efi_image: Path) -> None:
    files = next(p for p in closure_paths(fixture_spec) if p.endswith("-files"))
    offset = part_offset(efi_image, 2)
    a = inode_facts(efi_image, offset, f"{files}/share/pair/a")
    b = inode_facts(efi_image, offset, f"{files}/share/pair/b")
    assert a["ino"] == b["ino"]
    assert a["links"] == 2


def test_nix_store_verify_and_closure(fixture_spec: Path, extracted: Path) -> None:
    doc = spec_doc(fixture_spec)
    top = doc["system"]["toplevel"]
    store = ["nix-store", "--store", str(extracted), "--option", "substituters", ""]
    res = subprocess.run([*store, "--verify", "--check-contents"], capture_output=True, text=True)
    assert res.returncode == 0 and "error" not in res.stderr.lower(), res.stderr
    in_image = subprocess.run([*store, "-qR", top], capture_output=True, text=True, check=True).stdout.split()
    on_host = subprocess.run(["nix-store", "-qR", top], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(in_image) == sorted(on_host)
    valid = subprocess.run([*store, "--check-validity", *closure_paths(fixture_spec)], capture_output=True)
    assert valid.returncode == 0


def test_profiles_and_nixos_marker(fixture_spec: Path, extracted: Path) -> None:
    top = spec_doc(fixture_spec)["system"]["toplevel"]
    profiles = extracted / "nix/var/nix/profiles"
    assert os.readlink(profiles / "system") == "system-1-link"
    assert os.readlink(profiles / "system-1-link") == top
    assert (extracted / "etc/NIXOS").is_file() and (extracted / "etc/NIXOS").stat().st_size == 0
    assert stat.S_IMODE(os.stat(extracted / "etc").st_mode) == 0o755
    assert not (profiles / "per-user/root/channels").exists()


def test_contents_modes_owners_globs(fixture_spec: Path, efi_image: Path) -> None:
    offset = part_offset(efi_image, 2)

    def facts(p: str) -> tuple[int, int, int]:
        f = inode_facts(efi_image, offset, p)
        return stat.S_IMODE(f["mode"]), f["uid"], f["gid"]

    assert facts("/etc/motd") == (0o644, 0, 0)
    assert facts("/srv/tree") == (0o755, 1234, 5678)
    assert facts("/srv/tree/sub/deeper/leaf.txt") == (0o755, 1234, 5678)
    assert facts("/usr/local/bin/suid-tool") == (0o4755, 0, 0)
    assert facts("/plain.txt") == (0o644, 0, 0)
    for name in ("a.conf", "b.conf", "c.conf"):
        assert facts(f"/etc/fixture.d/{name}") == (0o640, 0, 100)
    listing = debugfs(efi_image, offset, "ls /etc/fixture.d")
    assert "not-matched.txt" not in listing
    link = debugfs(efi_image, offset, "stat /srv/tree/sub/link")
    assert 'Fast link dest: "deeper/leaf.txt"' in link
    assert "leaf of the tree" in debugfs(efi_image, offset, "cat /srv/tree/sub/deeper/leaf.txt")


def test_auto_size_is_tight(fixture_spec: Path, efi_image: Path) -> None:
    doc = spec_doc(fixture_spec)
    additional = 16 * MiB
    assert doc["additionalSpace"] == "16M"
    sb = superblock(efi_image, part_offset(efi_image, 2))
    free = int(sb["Free blocks"]) * int(sb["Block size"])
    closure_bytes = sum(int(x) for x in subprocess.run(
        ["du", "-sb", "--apparent-size", *closure_paths(fixture_spec)], capture_output=True, text=True,
        check=True).stdout.split()[::2])
    assert free >= additional
    assert free - additional <= max(16 * MiB, closure_bytes // 20), (free, closure_bytes)


def test_auto_size_large_additional_space(make_spec: SpecFactory, tmp_path: Path) -> None:
    image = tmp_path / "big.img"
    res = prepare(make_spec(additionalSpace="1G", partitionTableType="legacy"), image)
    assert res.returncode == 0, res.stderr
    sb = superblock(image, part_offset(image, 1))
    free = int(sb["Free blocks"]) * 4096
    assert 1024 * MiB <= free <= 1024 * MiB + 16 * MiB
    assert os.stat(image).st_blocks * 512 < 64 * MiB  # sparse: only what was written is allocated


def test_too_small_disk_refused_before_writing(make_spec: SpecFactory, tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    res = prepare(make_spec(diskSize=3, partitionTableType="legacy"), image)
    assert res.returncode == 2
    assert "diskSize = 3 MiB is too small" in res.stderr and "use diskSize >=" in res.stderr
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_deterministic_builds_are_identical(fixture_spec: Path, efi_image: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.img"
    assert prepare(fixture_spec, again).returncode == 0
    assert sha256(again) == sha256(efi_image)


def test_copy_fallback_gives_the_same_image(fixture_spec: Path, efi_image: Path, tmp_path: Path) -> None:
    copied = tmp_path / "copied.img"
    res = prepare(fixture_spec, copied, env={"MDI_STAGE_STORE": "copy"})
    assert res.returncode == 0, res.stderr
    assert "copying the closure" in res.stderr
    assert sha256(copied) == sha256(efi_image)


def test_unprivileged_prepare_matches_root(fixture_spec: Path, efi_image: Path, tmp_path: Path) -> None:
    """prepare as `nobody` (as in a Nix build sandbox) writes the same bytes as root."""
    shared = Path("/tmp") / f"mdi-nobody-{os.getpid()}"
    shared.mkdir(mode=0o777, exist_ok=True)
    os.chmod(shared, 0o777)
    spec = shared / "spec.json"
    shutil.copy(fixture_spec, spec)
    os.chmod(spec, 0o644)
    opened: list[tuple[Path, int]] = []
    for p in [fixture_spec.parent, *fixture_spec.parent.parents]:  # make the fixture readable to others
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o005 != 0o005:
            opened.append((p, mode))
            os.chmod(p, mode | 0o005)
    try:
        image = shared / "nobody.img"
        res = prepare(spec, image, user="nobody")
        assert res.returncode == 0, res.stderr
        assert os.stat(image).st_uid != 0
        assert sha256(image) == sha256(efi_image)
    finally:
        for p, mode in opened:
            os.chmod(p, mode)
        shutil.rmtree(shared)


def test_channel_links(fixture_spec: Path, make_spec: SpecFactory, tmp_path: Path) -> None:
    doc = spec_doc(fixture_spec)
    lib = next(p for p in closure_paths(fixture_spec) if p.endswith("-lib"))
    system: dict[str, Any] = {**doc["system"], "channel": lib}
    image = tmp_path / "chan.img"
    res = prepare(make_spec(copyChannel=True, system=system, partitionTableType="legacy"), image)
    assert res.returncode == 0, res.stderr
    root = extract_root(image, part_offset(image, 1), tmp_path / "root")
    per_user = root / "nix/var/nix/profiles/per-user/root"
    assert os.readlink(per_user / "channels") == "channels-1-link"
    assert os.readlink(per_user / "channels-1-link") == lib
    assert os.readlink(root / "root/.nix-defexpr/channels") == "/nix/var/nix/profiles/per-user/root/channels"
    assert stat.S_IMODE(os.stat(root / "root/.nix-defexpr").st_mode) == 0o700


def test_only_nix_store(make_spec: SpecFactory, fixture_spec: Path, tmp_path: Path) -> None:
    image = tmp_path / "store.img"
    spec = make_spec(onlyNixStore=True, contents=[], installBootLoader=False, partitionTableType="none",
                     label="nix-store")
    res = prepare(spec, image)
    assert res.returncode == 0, res.stderr
    assert blkid(image, 0)["LABEL"] == "nix-store"
    root = extract_root(image, 0, tmp_path / "root")
    names = sorted(n for n in os.listdir(root) if n != "lost+found")
    assert names == sorted(os.path.basename(p) for p in closure_paths(fixture_spec))
    assert e2fsck_clean(image, 0).returncode == 0


def test_symlink_escape_refused(make_spec: SpecFactory, tmp_path: Path) -> None:
    """A target that reaches through a symlink placed by an earlier entry is refused; nothing lands outside."""
    evil = tmp_path / "evil-link"
    evil.symlink_to(tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    payload = tmp_path / "payload"
    payload.write_text("x")
    contents = [
        {"source": str(evil), "target": "/etc/evil", "mode": None, "user": None, "group": None},
        {"source": str(payload), "target": "/etc/evil/payload", "mode": None, "user": None, "group": None},
    ]
    image = tmp_path / "x.img"
    res = prepare(make_spec(contents=contents), image)
    assert res.returncode == 2
    assert "must not reach through a symlink" in res.stderr
    assert list((tmp_path / "outside").iterdir()) == []
    assert not image.exists() and not Path(str(image) + ".partial").exists()


def test_esp_in_a_large_image(make_spec: SpecFactory, tmp_path: Path) -> None:
    """A 249 MiB ESP (8 to 257 MiB) in a >512 MiB image gets the FAT type mkfs.vfat picks for it, not for the file."""
    image = tmp_path / "large.img"
    res = prepare(make_spec(partitionTableType="efi", bootSize="256M", additionalSpace="512M"), image)
    assert res.returncode == 0, res.stderr
    assert os.path.getsize(image) > 512 * MiB
    start, size = part_offset(image, 1), part_size(image, 1)
    assert size == 249 * MiB
    fat = blkid(image, start)
    assert (fat["TYPE"], fat["LABEL"], fat["VERSION"]) == ("vfat", "ESP", "FAT16")
    assert fsck_vfat(image, start, size, tmp_path).returncode == 0


def test_prepare_out_converts_in_the_same_process(make_spec: SpecFactory, tmp_path: Path) -> None:
    """prepare --out (what the Nix build runs when no VM stage follows) writes what prepare + convert write."""
    spec = make_spec(format="qcow2", installBootLoader=False, contents=[], baseName="nixos")
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(tmp_path / "a.raw"),
                          "--out", str(one)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(one / "nixos.qcow2")
    assert prepare(spec, tmp_path / "b.raw").returncode == 0
    res = subprocess.run([sys.executable, "-m", "builder", "convert", str(spec), "--image", str(tmp_path / "b.raw"),
                          "--out", str(two)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert subprocess.run(["qemu-img", "check", str(one / "nixos.qcow2")], capture_output=True).returncode == 0
    assert sha256(one / "nixos.qcow2") == sha256(two / "nixos.qcow2")
    assert (one / "nix-support/hydra-build-products").read_text() == \
        (two / "nix-support/hydra-build-products").read_text().replace(str(two), str(one))


def test_prepare_out_refuses_a_spec_that_needs_the_vm(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(installBootLoader=True)
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(tmp_path / "a.raw"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 2
    assert "needs the VM stage" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "a.raw").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("only_store", [False, True])
def test_symlink_and_file_store_paths(fixture_spec: Path, tmp_path: Path, only_store: bool) -> None:
    """Store paths that are a symlink or a single file: in the image as such, same bytes bound or copied."""
    from tests.fixtures.nixstore import write_closure_info

    src = tmp_path / "src"
    src.mkdir()
    (src / "mdi-single-file").write_text("a store path that is one file\n")
    (src / "mdi-top-symlink").symlink_to("/nix/store/does-not-matter-where")
    added = subprocess.run(["nix-store", "--add", str(src / "mdi-single-file"), str(src / "mdi-top-symlink")],
                           capture_output=True, text=True, check=True).stdout.split()
    doc = spec_doc(fixture_spec)
    roots = [doc["system"]["toplevel"], *doc["system"]["additionalPaths"], *added]
    info = write_closure_info(roots, tmp_path / "closure-info")
    doc["system"] = {**doc["system"], "closureInfo": str(info), "additionalPaths": [*doc["system"]["additionalPaths"],
                                                                                     *added]}
    if only_store:
        doc.update(onlyNixStore=True, contents=[], partitionTableType="none")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(doc))
    images = []
    for mode in ("bind", "copy"):
        image = tmp_path / f"{mode}.img"
        res = prepare(spec, image, env={"MDI_STAGE_STORE": mode})
        assert res.returncode == 0, res.stderr
        images.append(image)
    assert sha256(images[0]) == sha256(images[1])
    target = f"{images[0]}?offset={0 if only_store else part_offset(images[0], 2)}"
    prefix = "" if only_store else "/nix/store"
    file_path, link_path = (f"{prefix}/{os.path.basename(p)}" for p in added)
    cat = subprocess.run(["debugfs", "-R", f"cat {file_path}", target], capture_output=True, text=True)
    assert cat.stdout == "a store path that is one file\n"
    stat_out = subprocess.run(["debugfs", "-R", f"stat {link_path}", target], capture_output=True, text=True).stdout
    assert "Type: symlink" in stat_out and 'Fast link dest: "/nix/store/does-not-matter-where"' in stat_out
    assert subprocess.run(["e2fsck", "-fn", target], capture_output=True).returncode == 0
