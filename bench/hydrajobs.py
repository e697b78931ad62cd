"""Time `nix build` of every hydraJobs job of some commits, against the tests' nixpkgs stand-in.

`python -m bench.hydrajobs REV [REV ...] [--runs N]`: each run assembles a fresh stand-in
(tests/test_nix_glue.py's machinery: the fixture system, the VM stand-in) and, for each commit in turn, puts
that commit's tracked files into the flake directory, builds what every job's image is made from (the
system's closure, closureInfo: shared by the commits, untimed), then times one
`nix build --max-jobs 2` of all x86_64 jobs. The builder differs between commits, so every image and root
filesystem derivation is new. Reported per commit: wall time, the load average before and after, each
job's image hash and size (comparable between the commits of one run: same stand-in, same store paths)
and the seconds its log gives the root filesystem steps (made, or placed), and the store space of each
shared root filesystem (apparent and allocated bytes) with the jobs using it and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.digest import sha256
from tests.test_nix_glue import Glue, assemble_glue

REPO = Path(__file__).resolve().parent.parent


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def export(rev: str, dest: Path) -> None:
    """The files git tracks at rev, in dest (what a git flake of that commit sees)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def du(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a store path."""
    apparent = allocated = 0
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        st = p.lstat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


STEP = re.compile(r"^\[makeDiskImage\] (?P<name>.+) done in (?P<seconds>[0-9.]+)s$", re.M)
# The steps that make or place the root filesystem: what sharing saves or adds, per derivation.
ROOT_STEPS = ("stage root", "size", "root filesystem (mkfs.ext4 -d)", "contents owners (debugfs)",
              "owners and times (debugfs)", "check filesystems", "place root filesystem")


def root_seconds(drv: str) -> float:
    """Seconds a derivation's build log says the root filesystem steps took (nix-store --read-log)."""
    log = subprocess.run(["nix-store", "--read-log", drv], capture_output=True, text=True).stdout
    return round(sum(float(m["seconds"]) for m in STEP.finditer(log) if m["name"] in ROOT_STEPS), 2)


def jobs_of(glue: Glue) -> list[str]:
    """The hydraJobs job names of the flake."""
    names = glue.nix("eval", "--json", glue.ref("hydraJobs"), "--apply", "builtins.attrNames").stdout
    return sorted(json.loads(names))


def measure(rev: str, glue: Glue) -> dict[str, Any]:
    """Build every x86_64 hydraJobs job of rev once in glue's flake; time, images and store space."""
    export(rev, glue.flake)
    attrs = {job: f"hydraJobs.{job}.x86_64-linux" for job in jobs_of(glue)}
    glue.nix("build", "--no-link", *(glue.ref(f"{attr}.closureInfo") for attr in attrs.values()))
    drvs = {job: glue.eval_json(f"{attr}.drvPath") for job, attr in attrs.items()}
    before = load()
    started = time.monotonic()
    glue.nix("build", "--max-jobs", "2", "--no-link", *map(glue.ref, attrs.values()))
    wall = time.monotonic() - started
    after = load()
    images: dict[str, Any] = {}
    for job, attr in attrs.items():
        out = Path(glue.eval_json(f"{attr}.outPath")) / glue.eval_json(f"{attr}.filePath")
        inputs = subprocess.run(["nix-store", "--query", "--references", drvs[job]], capture_output=True,
                                text=True, check=True).stdout.split()
        roots = [d for d in inputs if re.search(r"-root-filesystem\.[a-z0-9]+\.drv$", d)]
        images[job] = {"sha256": sha256(out), "bytes": du(out), "rootFilesystemDrv": roots,
                       "rootSeconds": root_seconds(drvs[job])}
    shared: dict[str, Any] = {}
    for drv in sorted({d for i in images.values() for d in i["rootFilesystemDrv"]}):
        root_fs = subprocess.run(["nix-store", "--query", "--outputs", drv], capture_output=True, text=True,
                                 check=True).stdout.split()[0]
        users = [job for job, i in images.items() if drv in i["rootFilesystemDrv"]]
        shared[root_fs] = {"bytes": du(Path(root_fs)), "usedBy": users, "rootSeconds": root_seconds(drv)}
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True)
    return {"rev": rev, "commit": commit.stdout.strip(), "wallSeconds": round(wall, 1), "loadBefore": before,
            "loadAfter": after, "images": images, "rootFilesystems": shared}


def main(argv: list[str] | None = None) -> int:
    """Measure each commit given, alternating, and print one JSON line per build of the set."""
    p = argparse.ArgumentParser(prog="python -m bench.hydrajobs", description=__doc__)
    p.add_argument("revs", nargs="+", help="git commits (e.g. the one before shareRootFilesystem, and HEAD)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = p.parse_args(argv)
    for run in range(args.runs):
        scratch = Path(tempfile.mkdtemp(prefix="mdi-hydrajobs-"))
        try:
            glue = assemble_glue(scratch)
            for rev in args.revs if run % 2 == 0 else reversed(args.revs):
                print(json.dumps({"run": run, **measure(rev, glue)}), flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
