"""Time `nix build` of every hydraJobs job of a commit, against the tests' nixpkgs stand-in.

`python -m bench.hydrajobs REV [REV ...] [--runs N]`: for each run and each commit (alternated), the
commit's tracked files are exported into a fresh flake directory next to a freshly assembled stand-in
(tests/test_nix_glue.py's machinery: the fixture system, the VM stand-in), so every derivation is new and
nothing comes from an earlier build. All x86_64 jobs are built in one `nix build --max-jobs 2`. Reported:
wall time, the load average before and after, each job's image hash (so the commits' images can be
compared), and the store space of every derivation built (apparent and allocated bytes; a root
filesystem shared by several jobs is one of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.test_nix_glue import assemble_glue

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


def sha256(path: Path) -> str:
    """Hash of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def measure(rev: str, scratch: Path) -> dict[str, Any]:
    """Build every x86_64 hydraJobs job of rev once; time, images and store space."""
    glue = assemble_glue(scratch)
    export(rev, glue.flake)
    jobs = sorted(json.loads(glue.nix("eval", "--json", glue.ref("hydraJobs"), "--apply", "builtins.attrNames").stdout))
    attrs = [f"hydraJobs.{job}.x86_64-linux" for job in jobs]
    # Everything the jobs need that is not the images: the builder, the fixture system, closure infos.
    drvs = {job: glue.eval_json(f"{attr}.drvPath") for job, attr in zip(jobs, attrs, strict=True)}
    before = load()
    started = time.monotonic()
    glue.nix("build", "--max-jobs", "2", "--no-link", *map(glue.ref, attrs))
    wall = time.monotonic() - started
    after = load()
    images: dict[str, Any] = {}
    for job, attr in zip(jobs, attrs, strict=True):
        out = Path(glue.eval_json(f"{attr}.outPath"))
        name = glue.eval_json(f"{attr}.filePath")
        inputs = subprocess.run(["nix-store", "--query", "--references", drvs[job]], capture_output=True,
                                text=True, check=True).stdout.split()
        roots = [d for d in inputs if d.endswith(".drv") and "root-filesystem" in d]
        images[job] = {"sha256": sha256(out / name), "bytes": du(out / name), "rootFilesystemDrv": roots}
    shared: dict[str, Any] = {}
    for drv in sorted({d for i in images.values() for d in i["rootFilesystemDrv"]}):
        root_fs = subprocess.run(["nix-store", "--query", "--outputs", drv], capture_output=True, text=True,
                                 check=True).stdout.split()[0]
        users = [job for job, i in images.items() if drv in i["rootFilesystemDrv"]]
        shared[root_fs] = {"bytes": du(Path(root_fs)), "usedBy": users}
    return {"rev": rev, "commit": subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True,
                                                 text=True, check=True).stdout.strip(),
            "wallSeconds": round(wall, 1), "loadBefore": before, "loadAfter": after, "images": images,
            "rootFilesystems": shared}


def main(argv: list[str] | None = None) -> int:
    """Measure each commit given, alternating, and print one JSON line per build of the set."""
    p = argparse.ArgumentParser(prog="python -m bench.hydrajobs", description=__doc__)
    p.add_argument("revs", nargs="+", help="git commits (e.g. the one before shareRootFilesystem, and HEAD)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = p.parse_args(argv)
    for run in range(args.runs):
        for rev in args.revs:
            scratch = Path(tempfile.mkdtemp(prefix="mdi-hydrajobs-"))
            try:
                result = measure(rev, scratch)
            finally:
                if not args.keep:
                    shutil.rmtree(scratch, ignore_errors=True)
            print(json.dumps({"run": run, **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
