"""What shareRootFilesystem costs and saves per image, on a synthetic closure (bench/closure.py).

`python -m bench.sharedroot [--size 1G] [--runs 3]`: alternated runs of, on the same closure and `efi`
layout (raw, no VM): `prepare` making the root filesystem itself (an image built alone), `root-filesystem`
(the shared build), and `prepare --root-filesystem` placing it (each further image). Prints the medians
and the root filesystem's store space (apparent and allocated bytes), and what n images of one system cost
each way: n x alone, against one root-filesystem + n x place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .closure import ensure_closure
from .methods import spec_document

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str]) -> float:
    """Wall seconds of one builder command (its failure stops the bench)."""
    started = time.monotonic()
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Run the alternated measurements and print one JSON document."""
    p = argparse.ArgumentParser(prog="python -m bench.sharedroot", description=__doc__)
    p.add_argument("--size", default="1G", help="closure size (1G: about 1 GiB of file data)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/var/tmp/mdi-bench")))
    args = p.parse_args(argv)
    target = int(args.size.rstrip("G")) << 30 if args.size.endswith("G") else int(args.size.rstrip("M")) << 20
    closure = ensure_closure(args.work, target, 1, args.size)
    scratch = args.work / f"sharedroot-{os.getpid()}"
    scratch.mkdir(parents=True)
    try:
        spec = scratch / "spec.json"
        spec.write_text(json.dumps({**spec_document(closure, logical_store=False), "shareRootFilesystem": True}))
        py = [sys.executable, "-m", "builder"]
        root, image = scratch / "root.ext4", scratch / "image.raw"
        times: dict[str, list[float]] = {"alone": [], "root-filesystem": [], "place": []}
        load = [Path("/proc/loadavg").read_text().split()[0]]
        for _ in range(args.runs):
            times["alone"].append(timed([*py, "prepare", str(spec), "--image", str(image)]))
            image.unlink()
            times["root-filesystem"].append(timed([*py, "root-filesystem", str(spec), "--out", str(root)]))
            times["place"].append(timed([*py, "prepare", str(spec), "--image", str(image), "--root-filesystem",
                                         str(root)]))
            image.unlink()
            load.append(Path("/proc/loadavg").read_text().split()[0])
        st = root.stat()
        med = {k: round(statistics.median(v), 2) for k, v in times.items()}
        result = {
            "size": args.size, "runs": args.runs, "load1": load, "seconds": times, "median": med,
            "rootFilesystemBytes": {"apparent": st.st_size, "allocated": st.st_blocks * 512},
            "imagesOfOneSystem": {n: {"alone": round(n * med["alone"], 1),
                                      "shared": round(med["root-filesystem"] + n * med["place"], 1)}
                                  for n in (1, 2, 3, 7)},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
