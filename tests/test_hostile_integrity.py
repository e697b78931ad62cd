"""The builder's own integrity checks (run before it declares success) reject corrupted images.

A real efi image is prepared, then copies of it are damaged with independent tools (debugfs -w,
raw bytes in the FAT and the GPT): `ext4.check`, `fat.check` and `table.check` must raise BuildError
on the damaged copies and pass on the pristine image. The FAT damage (a lost cluster, so the two FAT
copies differ) is one that a boot-sector-only probe such as `minfo` does not notice, which
`fsck.vfat -n` does; the GPT damage is one `sfdisk` survives silently by using the other copy.

What mkfs.ext4 -d writes is checked by the e2fsck -fyD that indexes its directories
(`ext4.index_directories`): real mkfs output damaged with debugfs must fail it, the problem named,
and undamaged output of every ext type must pass.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder.disk import table
from builder.disk.layout import Partition, plan
from builder.errors import BuildError
from builder.fs import ext as ext4
from builder.fs import fat
from builder.spec import load_spec
from builder.units import MiB
from tests.support.imagecheck import part_offset
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pristine(make_spec: SpecFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec, raw efi image) prepared by the builder."""
    spec = make_spec(diskSize=128)
    image = tmp_path_factory.mktemp("integrity") / "efi.img"
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return spec, image


def esp(spec: Path) -> Partition:
    """The ESP partition of the spec's layout (checked against sfdisk below)."""
    part = plan(load_spec(spec), 128 * MiB).partitions[0]
    assert part.fs == "vfat"
    return part


def layout_of(spec: Path) -> Any:
    """The builder's plan for the spec at the fixture's disk size."""
    return plan(load_spec(spec), 128 * MiB)


def test_pristine_image_passes_every_check(pristine: tuple[Path, Path]) -> None:
    spec, image = pristine
    assert esp(spec).start == part_offset(image, 1)
    ext4.check(image, part_offset(image, 2))
    fat.check(image, esp(spec))
    table.check(image, layout_of(spec))


@pytest.mark.parametrize("copy", ["primary", "backup"])
def test_table_check_rejects_a_gpt_header_with_a_bad_crc(copy: str, pristine: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """sfdisk silently falls back to the other GPT copy (exit 0); the builder's check must not."""
    spec, image = pristine
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    with open(damaged, "r+b") as f:
        f.seek(512 if copy == "primary" else damaged.stat().st_size - 512)
        header = bytearray(f.read(92))
        assert header[:8] == b"EFI PART"
        header[16] ^= 0xFF  # the header CRC32
        f.seek(-92, 1)
        f.write(header)
    with pytest.raises(BuildError, match="sfdisk --verify found problems in the gpt partition table"):
        table.check(damaged, layout_of(spec))


def test_table_check_rejects_a_table_that_is_not_the_plan(pristine: tuple[Path, Path]) -> None:
    """The same image checked against the plan for a different layout (legacy+gpt) must not pass."""
    spec, image = pristine
    other = plan(dataclasses.replace(load_spec(spec), partition_table_type="legacy+gpt"), 128 * MiB)
    with pytest.raises(BuildError, match="not the planned"):
        table.check(image, other)


def test_ext4_check_rejects_a_cleared_inode(pristine: tuple[Path, Path], tmp_path: Path) -> None:
    _, image = pristine
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    offset = part_offset(damaged, 2)
    done = subprocess.run(["debugfs", "-w", "-R", "clri /etc/motd", f"{damaged}?offset={offset}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(BuildError, match="e2fsck found problems in the root filesystem"):
        ext4.check(damaged, offset)


def test_ext4_check_rejects_a_block_marked_free(pristine: tuple[Path, Path], tmp_path: Path) -> None:
    _, image = pristine
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    offset = part_offset(damaged, 2)
    target = f"{damaged}?offset={offset}"
    blocks = subprocess.run(["debugfs", "-R", "blocks /etc/motd", target], capture_output=True, text=True).stdout
    first = blocks.split()[0]
    subprocess.run(["debugfs", "-w", "-R", f"freeb {first}", target], capture_output=True, check=True)
    with pytest.raises(BuildError, match="e2fsck found problems"):
        ext4.check(damaged, offset)


def test_fat_check_rejects_a_lost_cluster_that_minfo_accepts(pristine: tuple[Path, Path], tmp_path: Path) -> None:
    spec, image = pristine
    part = esp(spec)
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    with open(damaged, "r+b") as f:
        f.seek(part.start)
        boot = f.read(512)
        reserved = struct.unpack_from("<H", boot, 14)[0]
        sectors_per_fat = struct.unpack_from("<H", boot, 22)[0]
        entry = 2 if sectors_per_fat else 4  # FAT16 has a 16-bit FAT size here; FAT32 keeps it at offset 36
        f.seek(part.start + reserved * 512 + entry * 40)
        f.write(b"\xff" * entry)  # cluster 40 marked allocated (end of chain) in the first FAT only
    probe = subprocess.run(["minfo", "-i", f"{damaged}@@{part.start}"], capture_output=True, text=True)
    assert probe.returncode == 0, "the damage should be invisible to a boot-sector probe"
    with pytest.raises(BuildError, match="fsck.vfat found problems in the ESP FAT filesystem"):
        fat.check(damaged, part)


def test_fat_check_rejects_a_broken_boot_sector(pristine: tuple[Path, Path], tmp_path: Path) -> None:
    spec, image = pristine
    part = esp(spec)
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    with open(damaged, "r+b") as f:
        f.seek(part.start + 11)
        f.write(struct.pack("<H", 0))  # 0 bytes per sector
    with pytest.raises(BuildError, match="fsck.vfat found problems"):
        fat.check(damaged, part)


BROKEN_MKFS_VFAT = """#!{python}
import os, struct, subprocess, sys
real = subprocess.run([{real!r}, *sys.argv[1:]])
offsets = [int(a.split("=")[1]) * 512 for a in sys.argv if a.startswith("--offset=")]
if offsets and real.returncode == 0:  # the call that makes the partition's filesystem in the image
    with open(sys.argv[-2], "r+b") as f:
        f.seek(offsets[0] + 14)
        reserved = struct.unpack("<H", f.read(2))[0]
        f.seek(offsets[0] + reserved * 512 + 2 * 40)
        f.write(b"\\xff\\xff")  # a lost cluster in the first FAT only
sys.exit(real.returncode)
"""
BROKEN_MKFS_EXT4 = """#!{python}
import re, subprocess, sys
real = subprocess.run([{real!r}, *sys.argv[1:]])
if "-d" in sys.argv:
    offset = re.search(r"offset=(\\d+)", " ".join(sys.argv)).group(1)
    subprocess.run(["debugfs", "-w", "-R", "freeb 600 20", sys.argv[-2] + "?offset=" + offset], capture_output=True)
sys.exit(real.returncode)
"""


@pytest.mark.parametrize("tool", ["mkfs.vfat", "mkfs.ext4"])
def test_a_tool_writing_a_broken_filesystem_fails_the_build(tool: str, make_spec: SpecFactory,
                                                            tmp_path: Path) -> None:
    """A mkfs that exits 0 but leaves damage (simulated by a wrapper first on PATH): the build must fail."""
    shims = tmp_path / "shims"
    shims.mkdir()
    real = shutil.which(tool)
    assert real is not None
    shim = shims / tool
    shim.write_text((BROKEN_MKFS_VFAT if tool == "mkfs.vfat" else BROKEN_MKFS_EXT4).format(python=sys.executable,
                                                                                         real=real))
    shim.chmod(0o755)
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", TMPDIR=str(tmp), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(make_spec()), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1, res.stderr
    expected = "fsck.vfat found problems in the ESP" if tool == "mkfs.vfat" else "e2fsck found problems"
    assert expected in res.stderr, res.stderr
    # e2fsck -fyD repairs what mkfs.ext4 broke: its report, read in the same step, must fail the build and name it.
    step = "check ESP (fsck.vfat)" if tool == "mkfs.vfat" else "index directories (e2fsck -fyD)"
    assert f"[makeDiskImage] {step} failed after" in res.stderr
    if tool == "mkfs.ext4":
        assert "as mkfs.ext4 and debugfs wrote it" in res.stderr, res.stderr
        assert "Block bitmap differences:" in res.stderr, res.stderr
    assert not out.exists() and os.listdir(tmp) == []  # out did not exist before the failed build


TREE_FILES = 300  # two-block directory: e2fsck -D indexes it


@pytest.fixture(scope="module")
def mkfs_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small source tree for mkfs.ext4 -d: a directory of TREE_FILES files, a 2 MB file, a nested one."""
    root = tmp_path_factory.mktemp("tree")
    (root / "d").mkdir()
    for i in range(TREE_FILES):
        (root / "d" / f"some-file-name-{i}").write_text(str(i))
    (root / "e" / "f").mkdir(parents=True)
    (root / "e" / "big").write_bytes(bytes(range(256)) * 8192)
    (root / "e" / "f" / "x").write_text("x\n")
    return root


def mkfs_image(tree: Path, image: Path, fs_type: str = "ext4", label: str = "nixos",
               fake_time: int | None = None) -> ext4.Ext4Params:
    """What mkfs.ext4 -d writes of tree (64 MiB, the builder's block size); the parameters it was made with."""
    os.truncate(image, 0) if image.exists() else image.touch()
    os.truncate(image, 64 * MiB)
    label_args = ["-L", label] if label else []
    subprocess.run(["mkfs.ext4", "-q", "-F", "-t", fs_type, "-b", "4096", "-N", "2048", *label_args, "-d", str(tree),
                    str(image)], check=True, capture_output=True,
                   env=dict(os.environ, E2FSPROGS_FAKE_TIME=str(fake_time)) if fake_time else None)
    return ext4.Ext4Params(label=label, uuid=None, hash_seed=None, inodes=2048, fake_time=fake_time, fs_type=fs_type)


def debugfs_w(image: Path, request: str) -> str:
    """Run one debugfs -w request on the image; its stdout."""
    done = subprocess.run(["debugfs", "-w", "-R", request, str(image)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


# Labels e2fsck prints otherwise than given (e2fsck/unix.c): whitespace and ':' as '_', cut at 16 bytes (also
# inside a UTF-8 character), shell metacharacters (tests/test_hostile_names.py's label).
@pytest.mark.parametrize("fs_type,label", [("ext4", "nixos"), ("ext4", "nïxos-ü"), ("ext4", ""), ("ext3", "nixos"),
                                           ("ext2", "nixos"), ("ext4", "a b:c\td"), ("ext4", "l$(touch x)'\"`"),
                                           ("ext4", "a-label-longer-than-16-bytes"), ("ext4", "ü" * 9)])
def test_indexing_accepts_what_mkfs_wrote_undamaged(fs_type: str, label: str, mkfs_tree: Path,
                                                   tmp_path: Path) -> None:
    """A clean run's report is read as clean whatever names the filesystem in it (label, else file name)."""
    image = tmp_path / "root.img"
    params = mkfs_image(mkfs_tree, image, fs_type, label)
    ext4.index_directories(image, 0, params)
    flags = subprocess.run(["debugfs", "-R", "stat /d", str(image)], capture_output=True, text=True).stdout
    assert int(flags.split("Flags:")[1].split()[0], 16) & 0x1000  # EXT4_INDEX_FL: /d has two blocks
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


# (damage done with debugfs, what e2fsck -fyD's report must say). The group descriptor checksum, the orphan
# list and the superblock state passed the `e2fsck -f -n` that checked mkfs' output before (its exit 0), and
# e2fsck -fyD exits 0 after truncating an orphan: only its report shows that.
DAMAGE = {
    "block in use marked free": ("freeb {block} 4", r"Block bitmap differences: +\+\({block}--"),
    "wrong link count": ("sif /e/big links_count 3", r"Inode \d+ ref count is 3, should be 1\."),
    "group descriptor checksum": ("set_bg 0 checksum 0x1234", r"Group descriptor 0 checksum is 0x1234"),
    "orphan list": ("ssv last_orphan {ino}", r"Truncating orphaned inode {ino} "),
    "superblock not clean": ("ssv state 2", r"exited 1\):\nthe superblock's state was not clean"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_indexing_fails_on_damage_mkfs_left_and_names_it(damage: str, mkfs_tree: Path, tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    params = mkfs_image(mkfs_tree, image)
    block = subprocess.run(["debugfs", "-R", "blocks /e/big", str(image)], capture_output=True,
                           text=True).stdout.split()[0]
    ino = subprocess.run(["debugfs", "-R", "stat /e/f/x", str(image)], capture_output=True,
                         text=True).stdout.split()[1]
    request, expected = DAMAGE[damage]
    debugfs_w(image, request.format(block=block, ino=ino))
    with pytest.raises(BuildError, match="e2fsck found problems in the root filesystem as mkfs.ext4 and") as exc:
        ext4.index_directories(image, 0, params)
    assert re.search(expected.format(block=block, ino=ino), str(exc.value)), str(exc.value)


def test_array_link_counts_give_the_same_bytes(mkfs_tree: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """e2fsck -E inode_count_fullmap (up to FULLMAP_INODES) changes e2fsck's memory, not what it writes."""
    made = tmp_path / "made.img"
    params = mkfs_image(mkfs_tree, made, fake_time=1_000_000_000)  # also e2fsck's clock: the same bytes twice
    images = []
    for cap in (ext4.FULLMAP_INODES, 0):
        monkeypatch.setattr(ext4, "FULLMAP_INODES", cap)
        image = tmp_path / f"root-{cap}.img"
        shutil.copyfile(made, image)
        ext4.index_directories(image, 0, params)
        ext4.check(image, 0, params.inodes)
        images.append(image.read_bytes())
    assert images[0] == images[1]


def test_a_source_date_after_the_clock_builds_when_not_deterministic(make_spec: SpecFactory, tmp_path: Path) -> None:
    """deterministic = false: mkfs stamps sourceDateEpoch (stat shim), e2fsck the real clock unless that is
    earlier; a superblock written "in the future" would otherwise be a problem e2fsck -fyD reports."""
    future = 4102444800  # 2100-01-01
    spec = make_spec(deterministic=False, sourceDateEpoch=future)
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(tmp_path / "x.img")],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    offset = part_offset(tmp_path / "x.img", 2)
    assert subprocess.run(["e2fsck", "-fn", f"{tmp_path / 'x.img'}?offset={offset}"], capture_output=True,
                          env={**os.environ, "E2FSCK_TIME": str(future)}).returncode == 0
