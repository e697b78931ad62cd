"""Where `prepare --out` and `build` keep the raw image (builder/disk/intermediate.py): the same bytes wherever
it is, in memory or on disk, no extra copy for raw, and nothing left behind, done or failed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.digest import sha256
from tests.support.specs import SpecFactory

REPO = Path(__file__).parent.parent
EXT = {"raw": "img", "qcow2": "qcow2", "vdi": "vdi", "vpc": "vhd", "vmdk": "vmdk"}


def prepare_out(spec: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """`python -m builder prepare SPEC --out OUT [extra]` in its own process."""
    return subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A private directory standing for /dev/shm (on the same tmpfs when there is one), so leftovers are ours."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path
    d = base / f"mdi-test-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=True)


@pytest.mark.parametrize(("table", "fmt", "shim"), [
    ("efi", "qcow2", True), ("efi", "raw", True), ("legacy", "vdi", True), ("hybrid", "vpc", True),
    ("none", "vmdk", True), ("efi", "qcow2", False),
])
def test_same_bytes_in_memory_on_disk_and_at_a_given_path(make_spec: SpecFactory, tmp_path: Path,
                                                          memory_dir: Path, table: str, fmt: str,
                                                          shim: bool) -> None:
    """The image is byte-identical whether its raw intermediate was in memory, on disk or at --image."""
    spec = make_spec(format=fmt, partitionTableType=table, installBootLoader=False, baseName="nixos",
                     deterministic=True)
    base_env = {"MDI_MEMORY_DIR": str(memory_dir)} | ({} if shim else {"MDI_STAT_SHIM": "none"})
    hashes = {}
    for where in ("memory", "disk", "given"):
        out = tmp_path / where
        if where == "given":
            res = prepare_out(spec, out, "--image", str(tmp_path / "given.raw"), env=base_env)
        else:
            res = prepare_out(spec, out, "--work", str(tmp_path / f"work-{where}"),
                              env={**base_env, "MDI_INTERMEDIATE": where})
        assert res.returncode == 0, res.stderr
        image = out / f"nixos.{EXT[fmt]}"
        assert res.stdout.strip() == str(image)
        if where == "memory" and fmt != "raw":
            assert f"raw intermediate in memory ({memory_dir})" in res.stderr
        hashes[where] = sha256(image)
        # Only the image and its Hydra line in out; no raw left in the work directory or in memory.
        assert sorted(p.name for p in out.iterdir()) == sorted([image.name, "nix-support"])
        if where != "given":
            assert not [p for p in (tmp_path / f"work-{where}").rglob("*") if p.is_file() and
                        p.stat().st_size > 1 << 20]
    assert list(memory_dir.iterdir()) == []
    assert hashes["memory"] == hashes["disk"] == hashes["given"]
    if fmt != "raw":
        assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2" if fmt == "qcow2" else fmt,
                               str(tmp_path / "given.raw"), str(tmp_path / "memory" / f"nixos.{EXT[fmt]}")],
                              capture_output=True).returncode == 0


def test_auto_chooses_memory_when_it_has_room_and_disk_when_not(make_spec: SpecFactory, tmp_path: Path,
                                                                 memory_dir: Path) -> None:
    """auto: memory for the small fixture; on disk when the memory directory has no room (a 64 KiB tmpfs)."""
    spec = make_spec(format="qcow2", installBootLoader=False, baseName="nixos")
    res = prepare_out(spec, tmp_path / "out", env={"MDI_MEMORY_DIR": str(memory_dir)})
    assert res.returncode == 0, res.stderr
    assert f"raw intermediate in memory ({memory_dir})" in res.stderr
    # A memory directory on a full filesystem: statvfs reports no room, so the raw image stays on disk.
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        res = prepare_out(spec, tmp_path / "out2", "--work", str(tmp_path / "work"),
                          env={"MDI_MEMORY_DIR": str(full)})
        assert res.returncode == 0, res.stderr
        assert f"raw intermediate on disk ({tmp_path / 'work'}/mdi-" in res.stderr  # the build's own scratch
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert sha256(tmp_path / "out" / "nixos.qcow2") == sha256(tmp_path / "out2" / "nixos.qcow2")


def test_a_failed_convert_leaves_nothing_in_memory_or_out(make_spec: SpecFactory, tmp_path: Path,
                                                          memory_dir: Path) -> None:
    """qemu-img failing after prepare: the raw intermediate in memory is removed and out holds no image."""
    spec = make_spec(format="qcow2", installBootLoader=False)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-img"
    fake.write_text("#!/bin/sh\necho 'qemu-img: simulated failure' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    res = prepare_out(spec, out, env={"MDI_MEMORY_DIR": str(memory_dir), "MDI_INTERMEDIATE": "memory",
                                      "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert res.returncode == 1, res.stderr
    assert "simulated failure" in res.stderr and "Traceback" not in res.stderr
    assert list(memory_dir.iterdir()) == []
    assert not (out / "nixos.qcow2").exists()
    assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True


def test_bad_choice_is_a_user_error(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(format="qcow2", installBootLoader=False)
    res = prepare_out(spec, tmp_path / "out", env={"MDI_INTERMEDIATE": "ram"})
    assert res.returncode == 2
    assert "MDI_INTERMEDIATE='ram'" in res.stderr and "'auto', 'memory' or 'disk'" in res.stderr
    assert "Traceback" not in res.stderr


def test_prepare_without_out_still_needs_image(make_spec: SpecFactory) -> None:
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(make_spec())], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 2
    assert "--image is required unless --out is given" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("closed", ["0 2", "0 1 2"])
def test_closed_standard_fds_do_not_end_the_janitor_early(make_spec: SpecFactory, tmp_path: Path,
                                                          memory_dir: Path, closed: str) -> None:
    """Started with stdin/stdout/stderr closed, the builder's janitor pipe must not land on fd 0-2: the janitor
    points those at /dev/null, would see end-of-file at once and remove the raw image mid-build."""
    spec = make_spec(format="qcow2", installBootLoader=False, baseName="nixos")
    out = tmp_path / "out"
    redirect = " ".join(f"{fd}<&-" for fd in closed.split())
    cmd = f'exec "$0" -m builder prepare "$1" --out "$2" {redirect}'
    res = subprocess.run(["sh", "-c", cmd, sys.executable, str(spec), str(out)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "MDI_MEMORY_DIR": str(memory_dir),
                                        "MDI_INTERMEDIATE": "memory"})
    if "1" in closed.split():  # the image's path cannot be printed: the build is undone (docs/failure-behaviour.md)
        assert res.returncode == 1, res.stderr
        assert not (out / "nixos.qcow2").exists()
    else:
        assert res.returncode == 0, res.stderr
        assert subprocess.run(["qemu-img", "check", str(out / "nixos.qcow2")], capture_output=True).returncode == 0
    assert list(memory_dir.iterdir()) == []


def test_memory_full_names_the_way_out(make_spec: SpecFactory, tmp_path: Path) -> None:
    """A raw image kept in memory that runs out of room: the message says so and how to keep it on disk."""
    spec = make_spec(format="qcow2", partitionTableType="none", installBootLoader=False)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        res = prepare_out(spec, tmp_path / "out", env={"MDI_MEMORY_DIR": str(full), "MDI_INTERMEDIATE": "memory"})
        assert res.returncode == 1, res.stderr
        assert "ran out of space" in res.stderr and "MDI_INTERMEDIATE=disk" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_bad_qcow2_writer_is_refused_before_any_work(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(format="qcow2-compressed", installBootLoader=False)
    res = prepare_out(spec, tmp_path / "out", env={"MDI_QCOW2_WRITER": "qemu"})
    assert res.returncode == 2
    assert "MDI_QCOW2_WRITER='qemu'" in res.stderr and "Traceback" not in res.stderr
    assert "root filesystem" not in res.stderr, "refused only after the build's steps ran"
