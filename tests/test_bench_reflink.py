"""`python -m bench --reflink` (issue 25): the closure and every method's output on a loop-mounted XFS with reflink,
its used space read around each build, torn down on every exit path, skipped with the reason where it cannot be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.reflink import mounted_xfs, shared_bytes, used_bytes
from tests.support.leftovers import loops_under, mounts_under, processes_mentioning

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BENCH = [sys.executable, "-m", "bench", "--reflink", "--sizes", "4M", "--runs", "1", "--methods", "builder,floor",
         "--debian-sizes", ""]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mount need root")


def assert_xfs_gone(base: Path) -> None:
    """No mount, loop device or process of the run under base, and no backing file or mount point left."""
    assert mounts_under(base) == []
    assert loops_under(base) == []
    assert processes_mentioning(str(base)) == []
    assert not (base / "work" / "reflink-xfs.img").exists() and not (base / "work" / "reflink-xfs").exists()


def test_shared_extents_are_counted_from_filefrag(tmp_path: Path) -> None:
    """The measure of sharing: a `cp --reflink=always` copy counts whole, a plain copy not at all."""
    with mounted_xfs(tmp_path, 512 * MiB) as xfs:
        source = xfs.mount / "source"
        source.write_bytes(os.urandom(3 * MiB + 100))
        subprocess.run(["cp", "--reflink=always", str(source), str(xfs.mount / "clone")], check=True)
        subprocess.run(["cp", "--reflink=never", str(source), str(xfs.mount / "copy")], check=True)
        subprocess.run(["sync", "-f", str(source)], check=True)
        assert shared_bytes(xfs.mount / "clone") == shared_bytes(source) == 3 * MiB + 4096
        assert shared_bytes(xfs.mount / "copy") == 0
        assert used_bytes(xfs.mount) > 0
    assert mounts_under(tmp_path) == [] and loops_under(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == []


def test_reflink_run_puts_store_and_output_on_the_xfs_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run([*BENCH, "--work", str(tmp_path / "work"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "closure copied onto the XFS in" in done.stdout
    data = json.loads(out.with_suffix(".json").read_text())
    (size,) = data["sizes"]
    assert size["label"] == "4M reflink-xfs" and size["xfs"]["loop direct I/O"] == "on"
    du = size["manifest"]["counts"]["du_bytes"]
    for r in size["records"]:
        assert r.get("error") is None and r["facts"]["fsck_ok"], r
        used = r["xfs_used"]
        assert used["before"] >= du, "the closure the methods read is the copy on the XFS"
        # the image was written on the XFS: it grew by at least the image's allocated blocks not shared
        assert used["after"] - used["before"] >= r["facts"]["allocated"] - used["shared"] - MiB, r
    builder = next(r for r in size["records"] if r["method"] == "builder")
    assert any(line.startswith("root filesystem free:") for line in builder["said"]), "the builder's log is kept"
    assert not [line for line in builder["said"] if "user namespaces unavailable" in line], "it binds the store"
    floor = next(r for r in size["records"] if r["method"] == "floor")
    assert floor["xfs_used"]["shared"] == 0, "mkfs.ext4 -d writes its own copy of every block"
    assert "| floor | " in out.read_text().split("XFS holding store copy and output")[1]
    assert_xfs_gone(tmp_path)


def test_reflink_run_is_skipped_with_the_reason_without_loop_devices(tmp_path: Path) -> None:
    """In a mount namespace whose /dev has no loop devices (as in many containers) nothing is generated or run."""
    dev = ("mount -t tmpfs -o mode=0755 nodev /dev && mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5 "
           "&& mknod -m 666 /dev/urandom c 1 9 && mkdir /dev/shm && exec \"$@\"")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", dev, "sh",
                           *BENCH, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results.md")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reflink run skipped: no loop devices: /dev/loop-control is missing" in done.stderr
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "work").exists()


def test_terminated_reflink_run_stops_its_method_unmounts_and_detaches(tmp_path: Path) -> None:
    """SIGTERM while a method hangs on the XFS (a builder that never ends, in the store view's mount namespace,
    which keeps the XFS busy while it lives): the bench stops the method's processes, unmounts, detaches
    and exits 143."""
    hung = tmp_path / "python"
    hung.write_text('#!/bin/sh\nif [ "$1 $2" = "-m builder" ]; then sleep 600; exit 1; fi\n'
                    f'exec {sys.executable} "$@"\n')
    hung.chmod(0o755)
    bench = subprocess.Popen([*BENCH, "--python", str(hung), "--work", str(tmp_path / "work"),
                              "--out", str(tmp_path / "results.md")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scratch = str(tmp_path / "work" / "reflink-xfs" / "scratch")
    try:
        deadline = time.monotonic() + 60
        while not processes_mentioning(scratch) and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.05)  # until the builder's command runs on the XFS
        assert processes_mentioning(scratch) and mounts_under(tmp_path), "no method ran on the XFS"
        bench.send_signal(signal.SIGTERM)
        stdout, stderr = bench.communicate(timeout=60)
    finally:  # a failed run's hung builder: its whole process group (the bench's runner's), so the bench tears down
        for pgid in {os.getpgid(int(line.split(":")[0])) for line in processes_mentioning(scratch)} - {os.getpgrp()}:
            os.killpg(pgid, signal.SIGKILL)
        bench.communicate(timeout=60)
    assert bench.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "warning" not in stderr, stderr[-3000:]
    assert not (tmp_path / "results.md").exists()
    assert_xfs_gone(tmp_path)
