"""Child process that runs one method's commands and reports their wall time, CPU time and peak memory.

Run as `python -m bench.runner` with a JSON list of steps on stdin. Being a fresh process, its
RUSAGE_CHILDREN covers exactly the commands of this one method run: user+sys of every descendant
that was waited for, and ru_maxrss = the largest resident set any of them reached.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any


def run_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Run each step in order; stop at the first failure and say which and why."""
    timings: list[tuple[str, float]] = []
    started = time.monotonic()
    error = None
    for s in steps:
        t0 = time.monotonic()
        env = dict(os.environ, **s.get("env", {}))
        with open(s.get("stdin") or os.devnull, "rb") as stdin:
            proc = subprocess.run(s["argv"], stdin=stdin, capture_output=True, env=env, cwd=s.get("cwd"))
        timings.append((s["name"], time.monotonic() - t0))
        if proc.returncode != 0:
            tail = (proc.stderr or b"").decode(errors="replace")[-3000:]
            error = f"step {s['name']!r} exited {proc.returncode}: {tail}"
            break
        for line in proc.stderr.decode(errors="replace").splitlines():
            if line.startswith("BENCH-STEP "):
                _, name, seconds = line.split()
                timings.append((f"{s['name']}/{name}", float(seconds)))
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
            "steps": timings, "error": error}


def main() -> int:
    """Read the steps from stdin, run them, print the measurement as JSON."""
    result = run_steps(json.load(sys.stdin))
    print(json.dumps(result))
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
