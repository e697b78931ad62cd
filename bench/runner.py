"""Child process that runs one method's commands and reports their wall time, CPU time and peak memory.

Run as `python -m bench.runner` with a JSON list of steps on stdin. Being a fresh process, its
RUSAGE_CHILDREN covers exactly the commands of this one method run: user+sys of every descendant
that was waited for, and ru_maxrss = the largest resident set any of them reached.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

BUILDER_LOG = "[makeDiskImage] "
BUILDER_STEP = re.compile(r"^\[makeDiskImage\] (?P<name>.+) done in (?P<seconds>[0-9.]+)s$")


def pressure_stall_us(resource_name: str) -> int:
    """Microseconds some task waited for cpu or io since boot (PSI), 0 where the kernel has no PSI."""
    try:
        text = open(f"/proc/pressure/{resource_name}").read()
    except OSError:
        return 0
    return int(text.split("total=")[1].split()[0])


def run_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Run each step in order; stop at the first failure and say which and why."""
    timings: list[tuple[str, float]] = []
    said: list[str] = []
    load = float(open("/proc/loadavg").read().split()[0])
    stall = {r: pressure_stall_us(r) for r in ("cpu", "io")}
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
            elif m := BUILDER_STEP.match(line):
                timings.append((f"{s['name']}/{m['name']}", float(m["seconds"])))
            elif line.startswith(BUILDER_LOG) and not line.endswith(" ...") and len(said) < 40:
                said.append(line.removeprefix(BUILDER_LOG))  # what the builder says it did (e.g. which copy path)
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
            "steps": timings, "said": said, "error": error, "load_before": load,
            "cpu_stall": (pressure_stall_us("cpu") - stall["cpu"]) / 1e6 / wall,
            "io_stall": (pressure_stall_us("io") - stall["io"]) / 1e6 / wall}


def main() -> int:
    """Read the steps from stdin, run them, print the measurement as JSON."""
    result = run_steps(json.load(sys.stdin))
    print(json.dumps(result))
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
