"""A host that has never run Nix: no /nix/store (Debian's nix-bin makes it only at its first build).

Each test runs its command in a private mount namespace with a tmpfs over /nix, so it sees what a fresh
machine sees even where earlier tests (or CI) have built into the real store. Root only, as CI runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.leftovers import assert_nothing_left, mounts_under

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="hiding /nix needs a mount namespace as root")

# /nix is hidden under an empty tmpfs where it exists; where it does not, the host already has no store.
HIDE_NIX = '[ ! -d /nix ] || mount -t tmpfs -o mode=0755 fresh /nix; [ ! -e /nix/store ] || exit 99; exec "$@"'


def without_nix(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv in the repository where /nix/store does not exist."""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE_NIX, "sh", *argv],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode != 99, "could not hide /nix/store"
    return done


DRIVER = """
import json, sys
from pathlib import Path
from bench.cli import run_plan
from bench.closure import generate
from bench.methods import builder_plan, stat_shim
work = Path(sys.argv[1])
closure = generate(work / "closure", 3 << 20, 7)
shim, _ = stat_shim(Path.cwd(), work)
scratch = work / "scratch"
scratch.mkdir()
plan = builder_plan(closure, scratch, sys.executable, Path.cwd(), True, shim)
print(json.dumps({"result": run_plan(plan), "image": str(plan.image)}))
"""


def test_benchmark_runs_where_the_host_has_no_nix_store(tmp_path: Path) -> None:
    """The benchmark shows its closure at /nix/store itself (bench/storeview.sh) rather than binding over a
    /nix/store the host may not have (it failed with "mount: /nix/store: mount point does not exist"); the
    builder's image holds the closure at /nix/store."""
    done = without_nix([sys.executable, "-c", DRIVER, str(tmp_path)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["result"].get("error") is None, report["result"]
    image = report["image"]
    start = json.loads(subprocess.run(["sfdisk", "--json", image], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]["partitions"][1]["start"]
    fs = f"{image}?offset={start * 512}"
    fsck = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["debugfs", "-R", "ls -l /nix/store", fs], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "-nixos-system-bench-25.11" in listing.stdout, listing.stdout[-2000:]
    assert mounts_under(tmp_path) == []


def test_builder_refuses_a_spec_whose_store_is_missing(fixture_spec: Path, tmp_path: Path) -> None:
    """A spec naming /nix/store paths on a host with no /nix/store: exit 2 and one line naming the store
    directory, before any work, and nothing left behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = without_nix([sys.executable, "-m", "builder", "build", str(fixture_spec), "--out", str(tmp_path / "out")],
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "system.storeDir: '/nix/store' is not a directory on this machine" in done.stderr, done.stderr
    assert_nothing_left(tmp_path, scratch, tmp_path / "out")
