"""shareRootFilesystem: the root filesystem built once (`root-filesystem`), placed by each variant (--root-filesystem).

An image made from a shared root filesystem must be byte-identical (sha256) to the same spec built alone,
whichever variant the root filesystem was built for; a root filesystem that is not the spec's, or does not
fit its layout, is refused with a message saying why; a step that fails midway leaves no output behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.closure_fixture import ROOT_GPUID
from tests.support.digest import sha256
from tests.support.imagecheck import part_offset, part_size
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def builder(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m builder ARGV...` as its own process."""
    return subprocess.run([sys.executable, "-m", "builder", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})


def ok(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the builder; fail the test with its stderr unless it succeeds."""
    res = builder(*argv)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def shared_spec(make_spec: SpecFactory, table: str, **overrides: Any) -> Path:
    """A spec of the fixture closure (contents, no bootloader) with shareRootFilesystem for this layout."""
    boot = {"bootSize": "128M"} if table == "efixbootldr" else {}
    return make_spec(partitionTableType=table, shareRootFilesystem=True, **boot, **overrides)


def build_both(spec: Path, root: Path, tmp: Path) -> tuple[Path, Path, str]:
    """`build` the spec alone and with the shared root filesystem; both output files and the shared build's log."""
    alone = Path(ok("build", spec, "--out", tmp / "alone").stdout.strip())
    placed = ok("build", spec, "--out", tmp / "placed", "--root-filesystem", root)
    return alone, Path(placed.stdout.strip()), placed.stderr


@pytest.fixture(scope="module")
def root_fs(make_spec: SpecFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ext4 root filesystem of the fixture closure, built for a legacy+boot variant."""
    out = tmp_path_factory.mktemp("shared-root") / "root.ext4"
    ok("root-filesystem", shared_spec(make_spec, "legacy+boot"), "--out", out)
    return out


LAYOUTS = [
    pytest.param("legacy", "raw", id="legacy-raw"),
    pytest.param("efi", "qcow2", id="efi-qcow2"),
    pytest.param("legacy", "qcow2", id="legacy-qcow2", marks=pytest.mark.slow),
    pytest.param("efi", "raw", id="efi-raw", marks=pytest.mark.slow),
    pytest.param("hybrid", "raw", id="hybrid-raw", marks=pytest.mark.slow),
    pytest.param("hybrid", "qcow2", id="hybrid-qcow2", marks=pytest.mark.slow),
    pytest.param("legacy+gpt", "vdi", id="legacy-gpt-vdi", marks=pytest.mark.slow),
    pytest.param("efixbootldr", "raw", id="efixbootldr-raw", marks=pytest.mark.slow),
    pytest.param("none", "raw", id="none-raw", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("table", "fmt"), LAYOUTS)
def test_variant_from_a_shared_root_is_byte_identical_to_it_built_alone(
        table: str, fmt: str, root_fs: Path, make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = shared_spec(make_spec, table, format=fmt)
    alone, placed, log = build_both(spec, root_fs, tmp_path)
    assert sha256(placed) == sha256(alone)
    assert "mkfs.ext4" not in log, "the root filesystem was made again instead of placed"
    assert "[makeDiskImage] root filesystem placed by " in log


def test_root_filesystem_is_the_root_partition_of_an_image_alone(root_fs: Path, make_spec: SpecFactory,
                                                                 tmp_path: Path) -> None:
    # Read back with the table (sfdisk): the file is exactly the bytes the image's root partition starts with,
    # and the partition holds nothing else.
    image = tmp_path / "efi.raw"
    ok("prepare", shared_spec(make_spec, "efi"), "--image", image)
    offset, size = part_offset(image, 2), part_size(image, 2)
    fs = root_fs.read_bytes()
    with open(image, "rb") as f:
        f.seek(offset)
        assert f.read(len(fs)) == fs
        assert f.read(size - len(fs)).count(0) == size - len(fs)


@pytest.mark.parametrize("table", ["legacy", "none", "efi"])
def test_shared_sizing_keeps_todays_bytes_where_the_table_allows(table: str, make_spec: SpecFactory,
                                                                 tmp_path: Path) -> None:
    # Sized from its contents alone, the root filesystem is what an image without shareRootFilesystem has on
    # msdos tables, without a table and on GPT disks over ~200 MiB (efi with 256 MiB to spare here); only on
    # smaller GPT disks does its partition reach up to 1 MiB past it.
    extra = {"additionalSpace": "256M"} if table == "efi" else {}
    before, after = tmp_path / "before.raw", tmp_path / "after.raw"
    ok("prepare", make_spec(partitionTableType=table, **extra), "--image", before)
    ok("prepare", shared_spec(make_spec, table, **extra), "--image", after)
    assert os.path.getsize(before) > (200 * MiB if table == "efi" else 0)
    assert sha256(after) == sha256(before)


FILESYSTEMS: dict[str, dict[str, Any]] = {
    "btrfs": {"fsType": "btrfs"},
    "erofs": {"fsType": "erofs", "onlyNixStore": True, "contents": [], "label": "nix-store"},
    "squashfs": {"fsType": "squashfs", "onlyNixStore": True, "contents": [], "label": "nix-store",
                 "rootFSUID": None},
}


@pytest.mark.slow
@pytest.mark.parametrize("fs", list(FILESYSTEMS))
def test_other_filesystems_are_shared_byte_identically(fs: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    root = tmp_path / f"root.{fs}"
    ok("root-filesystem", shared_spec(make_spec, "legacy", **FILESYSTEMS[fs]), "--out", root)
    for table, fmt in (("efi", "qcow2"), ("hybrid", "raw")):
        alone, placed, _ = build_both(shared_spec(make_spec, table, format=fmt, **FILESYSTEMS[fs]), root,
                                      tmp_path / table)
        assert sha256(placed) == sha256(alone), (fs, table)


@pytest.mark.slow
def test_systemd_boot_images_share_a_root_with_its_mount_point(tmp_path: Path) -> None:
    # The fixture system on systemd-boot, installed by prepare from its bootspec (no VM): the root holds the
    # ESP's mount point /boot. Built for efi, placed into hybrid; the ESP is written per image.
    from tests.fixtures.system import sdboot_system_spec

    efi = sdboot_system_spec(tmp_path / "efi", table="efi", shareRootFilesystem=True)
    hybrid = sdboot_system_spec(tmp_path / "hybrid", table="hybrid", shareRootFilesystem=True, format="qcow2")
    root = tmp_path / "root.ext4"
    ok("root-filesystem", efi, "--out", root)
    alone, placed, log = build_both(hybrid, root, tmp_path / "build")
    assert sha256(placed) == sha256(alone)
    assert "[makeDiskImage] systemd-boot from the bootspec done" in log


def test_fixed_disk_size_is_shared_only_by_equal_root_partitions(make_spec: SpecFactory, tmp_path: Path) -> None:
    root = tmp_path / "root.ext4"
    ok("root-filesystem", shared_spec(make_spec, "efi", diskSize=300), "--out", root)
    # hybrid's root partition on 300 MiB is efi's (GPT, from bootSize to 1 MiB before the end).
    alone, placed, _ = build_both(shared_spec(make_spec, "hybrid", diskSize=300), root, tmp_path)
    assert sha256(placed) == sha256(alone)
    # legacy+gpt's starts at 2 MiB: a larger partition, refused before anything is written.
    image = tmp_path / "gpt.raw"
    res = builder("prepare", shared_spec(make_spec, "legacy+gpt", diskSize=300), "--image", image,
                  "--root-filesystem", root)
    assert res.returncode == 2, res.stderr
    assert (f"--root-filesystem {str(root)!r} is {root.stat().st_size} bytes" in res.stderr
            and "partitionTableType = 'legacy+gpt', diskSize = 300 MiB) holds 311427072 bytes" in res.stderr
            and "built for another layout or diskSize" in res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    assert not image.exists() and not image.with_name(image.name + ".partial").exists()


def test_a_root_filesystem_that_is_not_the_specs_is_refused(root_fs: Path, make_spec: SpecFactory,
                                                            tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff" * MiB)
    other_uuid = "0A0B0C0D-1111-2222-3333-444455556666"
    cases = [
        (shared_spec(make_spec, "efi", rootFSUID=other_uuid), root_fs,
         f"has the UUID {ROOT_GPUID.lower()}, not the spec's rootFSUID {other_uuid.lower()}"),
        (shared_spec(make_spec, "efi", fsType="btrfs"), root_fs, "holds ext4, not the spec's fsType 'btrfs'"),
        (shared_spec(make_spec, "efi"), junk, "holds no filesystem, not the spec's fsType 'ext4'"),
        (make_spec(partitionTableType="efi"), root_fs, "the spec does not have shareRootFilesystem = true"),
        (shared_spec(make_spec, "efi"), tmp_path / "missing", "No such file or directory"),
    ]
    for spec, root, message in cases:
        res = builder("prepare", spec, "--image", image, "--root-filesystem", root)
        assert res.returncode == 2 and message in res.stderr, (message, res.stderr)
        assert "Traceback" not in res.stderr
        assert not image.exists() and not image.with_name(image.name + ".partial").exists()


def test_root_filesystem_needs_the_argument(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "root.ext4"
    res = builder("root-filesystem", make_spec(), "--out", out)
    assert res.returncode == 2, res.stderr
    assert "root-filesystem: the spec does not have shareRootFilesystem = true" in res.stderr
    assert not out.exists()


def test_bad_value_is_refused_at_spec_load(make_spec: SpecFactory) -> None:
    res = builder("validate", make_spec(shareRootFilesystem="yes"))
    assert res.returncode == 2
    assert "$.shareRootFilesystem: \"yes\" is not allowed" in res.stderr and "boolean" in res.stderr, res.stderr


# A tool that fails as if it found an error, first on PATH (the gate shims of test_faults, made to fail).
FAILING_TOOL = "#!/bin/sh\necho \"$(basename \"$0\"): simulated failure\" >&2\nexit 4\n"


def failing(tmp: Path, tool: str) -> dict[str, str]:
    """An environment in which `tool` fails, with TMPDIR in tmp (to see that nothing is left there)."""
    shims, tmpdir = tmp / "shims", tmp / "tmp"
    shims.mkdir()
    tmpdir.mkdir()
    (shims / tool).write_text(FAILING_TOOL)
    (shims / tool).chmod(0o755)
    return {"PATH": f"{shims}:{os.environ['PATH']}", "TMPDIR": str(tmpdir)}


def test_root_filesystem_failing_midway_leaves_no_output(make_spec: SpecFactory, tmp_path: Path) -> None:
    # e2fsck runs after mkfs wrote the whole filesystem: the file exists then, under its temporary name only.
    out = tmp_path / "out" / "root.ext4"
    out.parent.mkdir()
    env = failing(tmp_path, "e2fsck")
    res = builder("root-filesystem", shared_spec(make_spec, "legacy"), "--out", out, env=env)
    assert res.returncode == 1, res.stderr
    assert "[makeDiskImage] root filesystem (mkfs.ext4 -d) done" in res.stderr
    assert "build failed: e2fsck found problems" in res.stderr and "Traceback" not in res.stderr
    assert list(out.parent.iterdir()) == [] and list(Path(env["TMPDIR"]).iterdir()) == []


def test_placing_failing_midway_leaves_no_image(root_fs: Path, make_spec: SpecFactory, tmp_path: Path) -> None:
    # mkfs.vfat runs after the root filesystem was placed.
    out = tmp_path / "out"
    env = failing(tmp_path, "mkfs.vfat")
    res = builder("build", shared_spec(make_spec, "efi"), "--out", out, "--root-filesystem", root_fs, env=env)
    assert res.returncode == 1, res.stderr
    assert "[makeDiskImage] place root filesystem done" in res.stderr and "Traceback" not in res.stderr
    assert not any(out.rglob("*")) and list(Path(env["TMPDIR"]).iterdir()) == []


def test_root_filesystem_stopped_midway_leaves_no_output(make_spec: SpecFactory, tmp_path: Path) -> None:
    # SIGTERM while e2fsck checks the written filesystem (a stand-in e2fsck that waits to be stopped).
    out = tmp_path / "out" / "root.ext4"
    out.parent.mkdir()
    env = failing(tmp_path, "e2fsck")
    started = tmp_path / "e2fsck-started"
    (Path(env["PATH"].split(":")[0]) / "e2fsck").write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 60\n")
    proc = subprocess.Popen([sys.executable, "-m", "builder", "root-filesystem", str(shared_spec(make_spec, "legacy")),
                             "--out", str(out)], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, log = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "[makeDiskImage] root filesystem (mkfs.ext4 -d) done" in log and "interrupted by SIGTERM" in log
    assert list(out.parent.iterdir()) == [] and list(Path(env["TMPDIR"]).iterdir()) == []


def test_placed_from_another_filesystem(root_fs: Path, make_spec: SpecFactory, tmp_path: Path) -> None:
    # A store on another filesystem than the build directory (here tmpfs): copy_file_range refuses to copy
    # across them, so the data is read and written by the builder; the same bytes.
    shm = Path("/dev/shm") / f"mdi-shared-root-{os.getpid()}.ext4"
    if subprocess.run(["cp", "--sparse=always", str(root_fs), str(shm)]).returncode != 0:
        pytest.skip("no room in /dev/shm")
    try:
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev
        alone, placed, log = build_both(shared_spec(make_spec, "efi"), shm, tmp_path)
        assert sha256(placed) == sha256(alone)
        assert "root filesystem placed by sparse copy" in log
    finally:
        shm.unlink()


def filefrag_shared(path: Path) -> bool:
    """Whether any extent of the file is shared with another file (FIEMAP's shared flag, via filefrag)."""
    res = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True)
    return "shared" in res.stdout


@pytest.mark.slow
def test_placed_by_reflink_where_the_filesystem_shares_blocks(root_fs: Path, make_spec: SpecFactory,
                                                             tmp_path: Path) -> None:
    # A btrfs store (loop-mounted here): the image shares the root filesystem's blocks, nothing is copied.
    disk, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(disk, "wb") as f:
        f.truncate(512 * MiB)
    subprocess.run(["mkfs.btrfs", "-q", str(disk)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(disk), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot loop-mount a btrfs here")
    try:
        root = mnt / "root.ext4"
        subprocess.run(["cp", "--sparse=always", str(root_fs), str(root)], check=True)
        image = mnt / "image.raw"
        res = ok("prepare", shared_spec(make_spec, "efi"), "--image", image, "--root-filesystem", root)
        assert "[makeDiskImage] root filesystem placed by reflink" in res.stderr
        subprocess.run(["sync"], check=True)
        time.sleep(0.2)
        assert filefrag_shared(image) and filefrag_shared(root)
        alone = tmp_path / "alone.raw"
        ok("prepare", shared_spec(make_spec, "efi"), "--image", alone)
        assert sha256(image) == sha256(alone)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
