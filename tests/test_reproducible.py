"""Bit-for-bit rebuilds: fresh work directories, another time, another user (nobody) give identical images.

Covered: ext4, btrfs, erofs and squashfs under every partition table type (prepare, raw), and qcow2
through `python -m builder build`; `check-reproducible` naming the partition, structure and file of a
difference.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.tools.reprocheck import explain
from tests.support.digest import sha256
from tests.support.fixture_images import FixtureImages, build
from tests.support.imagecheck import part_offset
from tests.support.specs import SpecFactory, spec_doc

pytestmark = pytest.mark.slow

REPO = Path(__file__).parent.parent
LAYOUTS = ["legacy", "legacy+boot", "legacy+gpt", "efi", "efixbootldr", "hybrid", "none"]
FS_TYPES = ["ext4", "btrfs", "erofs", "squashfs"]


@pytest.fixture(scope="module")
def shared(fixture_spec: Path) -> Iterator[Path]:
    """A world-readable directory outside pytest's private tree, holding a copy of the fixture's inputs.

    (pytest keeps its basetemp at mode 0700, and a concurrent pytest resets it, so nobody reads copies.)
    """
    d = Path("/tmp") / f"mdi-repro-{os.getpid()}"
    d.mkdir(mode=0o777, exist_ok=True)
    os.chmod(d, 0o777)
    shutil.copytree(fixture_spec.parent, d / "fx", symlinks=True)
    for dirpath, dirnames, filenames in os.walk(d / "fx"):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                os.chmod(p, stat.S_IMODE(p.stat().st_mode) | (0o005 if p.is_dir() else 0o004))
    os.chmod(d / "fx", 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def write_spec(path: Path, spec: Path, fixture_spec: Path, shared: Path) -> Path:
    """Copy a spec to path with the fixture's inputs pointing at the shared copy; readable by nobody."""
    path.write_text(spec.read_text().replace(str(fixture_spec.parent), str(shared / "fx")))
    os.chmod(path, 0o644)
    return path


def overrides(fs: str, layout: str) -> dict[str, object]:
    """Spec keys for fsType under layout (read-only filesystems hold only the store)."""
    if fs in ("erofs", "squashfs"):
        return {"fsType": fs, "partitionTableType": layout, "onlyNixStore": True, "contents": [],
                "installBootLoader": False, "label": "nix-store", "bootSize": "128M"}
    return {"fsType": fs, "partitionTableType": layout, "bootSize": "128M"}


def run_as(user: str | None, argv: list[str], shared: Path) -> subprocess.CompletedProcess[str]:
    """Run the builder CLI as root or as another user, from a fresh work directory under shared."""
    cmd = [sys.executable, "-m", "builder", *argv]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "TMPDIR": str(shared)})


@pytest.mark.parametrize("fs", FS_TYPES)
def test_prepare_identical_across_users_times_and_work_dirs(fs: str, make_spec: SpecFactory, shared: Path,
                                                           fixture_spec: Path) -> None:
    """Every layout: root in one work dir, then nobody in another one a second later: same sha256."""
    mismatches = {}
    for layout in LAYOUTS:
        spec = write_spec(shared / f"{fs}-{layout}.json", make_spec(**overrides(fs, layout)), fixture_spec, shared)
        images = []
        for user in (None, "nobody"):
            work = shared / f"work-{fs}-{layout}-{user or 'root'}"
            image = shared / f"{fs}-{layout}-{user or 'root'}.img"
            res = run_as(user, ["prepare", str(spec), "--image", str(image), "--work", str(work)], shared)
            assert res.returncode == 0, res.stderr
            images.append(image)
            time.sleep(1.1)
        assert os.stat(images[1]).st_uid != 0
        if sha256(images[0]) != sha256(images[1]):
            mismatches[layout] = explain(images[0], images[1])[:6]
        for image in images:
            image.unlink()
    assert mismatches == {}


@pytest.mark.parametrize("fs", FS_TYPES)
def test_qcow2_identical_across_users(fs: str, make_spec: SpecFactory, shared: Path, fixture_spec: Path) -> None:
    spec = write_spec(shared / f"{fs}-qcow2.json", make_spec(format="qcow2", **overrides(fs, "efi")), fixture_spec,
                      shared)
    digests = []
    for user in (None, "nobody"):
        out = shared / f"out-{fs}-{user or 'root'}"
        res = run_as(user, ["build", str(spec), "--out", str(out)], shared)
        assert res.returncode == 0, res.stderr
        (image,) = out.glob("*.qcow2")
        assert subprocess.run(["qemu-img", "check", str(image)], capture_output=True).returncode == 0
        digests.append(sha256(image))
        time.sleep(1.1)
    assert digests[0] == digests[1]


@pytest.mark.parametrize("table", ["efi", "none"])
def test_xfs_prepare_identical(table: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """xfs (fixture system: its store names have no whitespace): two work dirs, a second apart, same bytes."""
    from tests.fixtures.system import fixture_system_spec

    spec = fixture_system_spec(tmp_path_factory.mktemp(f"xfs-{table}"), table, fsType="xfs",
                               installBootLoader=False)
    digests = []
    for run in ("first", "second"):
        base = tmp_path_factory.mktemp(f"xfs-{table}-{run}")
        res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(base / "x.img"),
                              "--work", str(base / "work")], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr
        digests.append(sha256(base / "x.img"))
        time.sleep(1.1)
    assert digests[0] == digests[1]


def test_check_reproducible_passes_for_a_deterministic_spec(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(partitionTableType="legacy")
    res = subprocess.run([sys.executable, "-m", "builder", "check-reproducible", str(spec), "--work", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "byte-identical" in res.stderr


def test_check_reproducible_names_what_differs(make_spec: SpecFactory, tmp_path: Path) -> None:
    """deterministic = false: random UUIDs and hash seed show up as ext4 superblock/metadata differences."""
    spec = make_spec(partitionTableType="efi", deterministic=False, rootFSUID=None)
    res = subprocess.run([sys.executable, "-m", "builder", "check-reproducible", str(spec), "--work", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "not reproducible" in res.stdout
    assert "partition 2 (ext4" in res.stdout and "superblock" in res.stdout
    assert "partition table" in res.stdout  # random disk and partition GUIDs


def test_explain_maps_a_changed_byte_to_the_file(fixture_spec: Path, tmp_path: Path) -> None:
    """One byte flipped in a file's data and one in an inode: the report names the file both times."""
    image = tmp_path / "a.img"
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(fixture_spec), "--image", str(image)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    offset = part_offset(image, 2)
    target = f"{image}?offset={offset}"
    bmap = subprocess.run(["debugfs", "-R", "bmap /srv/tree/sub/deeper/leaf.txt 0", target], capture_output=True,
                          text=True, check=True).stdout.split()
    block = int(bmap[-1])
    ino = subprocess.run(["debugfs", "-R", "stat /etc/motd", target], capture_output=True, text=True,
                         check=True).stdout
    motd_ino = int(ino.split("Inode: ")[1].split()[0])
    other = tmp_path / "b.img"
    shutil.copyfile(image, other)
    imap = subprocess.run(["debugfs", "-R", f"imap <{motd_ino}>", target], capture_output=True, text=True,
                          check=True).stdout
    iblock = int(imap.split("located at block ")[1].split(",")[0])
    ioff = int(imap.split("offset ")[1].split()[0], 16)
    with open(other, "r+b") as f:
        f.seek(offset + block * 4096 + 3)
        f.write(b"\xff")
        f.seek(offset + iblock * 4096 + ioff + 0x10)  # i_mtime
        f.write(b"\x01\x02\x03\x04")
    report = "\n".join(explain(image, other))
    assert "partition 2 (ext4" in report
    assert f"ext4 block {block}: data of inode" in report and "/srv/tree/sub/deeper/leaf.txt" in report
    assert f"inode {motd_ino} (/etc/motd)" in report
    assert json.dumps(spec_doc(fixture_spec)["partitionTableType"]) == '"efi"'


@pytest.mark.boot
@pytest.mark.parametrize("recipe", ["legacy", "efi", "hybrid", "efixbootldr", "legacy+boot"])
def test_vm_stage_builds_identical(recipe: str, fixture_images: FixtureImages,
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Through the VM, two builds give the same bytes: GRUB/legacy with owners by name, configFile and a
    hostile target; systemd-boot/efi with touchEFIVars; GRUB and systemd-boot on hybrid; systemd-boot on
    ESP + XBOOTLDR; GRUB with a FAT /boot. Every layout whose FAT partitions the VM writes is here: what
    the VM left in a FAT data area must not survive its rebuild. The first build is the one test_boot boots."""
    first = fixture_images.get(recipe)
    time.sleep(1.1)
    base = tmp_path_factory.mktemp(f"vm-{recipe.replace('+', '-')}-second")
    second, log = build(first.spec, base / "out", base / "work")
    assert "settle the VM's writes" in log
    assert explain(first.image, second) == []
    root = part_offset(second, {"legacy": 1, "efi": 2, "hybrid": 3, "efixbootldr": 3, "legacy+boot": 2}[recipe])
    fsck = subprocess.run(["e2fsck", "-fn", f"{second}?offset={root}"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    if recipe == "efi":
        listing = subprocess.run(["mdir", "-/", "-i", f"{second}@@{part_offset(second, 1)}", "::"],
                                 capture_output=True, text=True, check=True).stdout
        assert "BOOTX64" in listing and "random-seed" not in listing
        assert "2023-11-14" in listing  # every FAT time is the epoch (1700000000)


@pytest.mark.parametrize("shim", ["none", "/usr/lib/x86_64-linux-gnu/libm.so.6"])
def test_stat_shim_gives_the_bytes_of_the_debugfs_pass(shim: str, make_spec: SpecFactory, shared: Path,
                                                       fixture_spec: Path) -> None:
    """As nobody (files not owned by root): mkfs with the stat shim writes the image the debugfs pass writes.

    "none" takes the debugfs pass on purpose; libm is a library that loads but changes nothing, which
    the builder must notice on the image and repair with the debugfs pass rather than trust.
    """
    from builder.sandbox import statshim

    assert statshim.stat_shim() is not None, \
        "the stat shim is not built (pip install -e . builds builder/sandbox/_statshim*.so)"
    spec = write_spec(shared / "shim.json", make_spec(partitionTableType="efi"), fixture_spec, shared)
    digests, logs = [], []
    for name, env in (("shim", {}), ("other", {statshim.SHIM_ENV: shim})):
        image = shared / f"shim-{name}.img"
        cmd = ["runuser", "-u", "nobody", "--", sys.executable, "-m", "builder", "prepare", str(spec),
               "--image", str(image), "--work", str(shared / f"work-shim-{name}")]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "TMPDIR": str(shared), **env})
        assert res.returncode == 0, res.stderr
        digests.append(sha256(image))
        logs.append(res.stderr)
    images = [shared / "shim-shim.img", shared / "shim-other.img"]
    differences = explain(*images)[:6] if digests[0] != digests[1] else []
    for image in images:
        image.unlink()
    assert "owners and times (debugfs)" not in logs[0]
    assert "owners and times (debugfs)" in logs[1]
    if shim != "none":
        assert "did not take effect" in logs[1]
    assert differences == []


def test_stat_shim_that_is_not_a_file_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(make_spec()), "--image",
                          str(tmp_path / "x.img")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "MDI_STAT_SHIM": str(tmp_path / "missing.so")})
    assert res.returncode == 2, res.stderr
    assert "MDI_STAT_SHIM" in res.stderr and "missing.so" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x.img").exists()
