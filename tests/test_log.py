"""The build log (builder/log.py) stays one whole line per message while steps run side by side on threads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent

# Two threads logging steps at once, switching as often as the interpreter allows.
PROGRAM = """
import sys, threading
from builder.log import info, step
sys.setswitchinterval(1e-6)
def work(name):
    for i in range(3000):
        with step(f"{name} {i}"):
            info(f"{name} inside {i}")
threads = [threading.Thread(target=work, args=(n,)) for n in ("alpha", "beta")]
for t in threads: t.start()
for t in threads: t.join()
"""
LINE = re.compile(r"\[makeDiskImage\] (alpha|beta) (\d+ \.\.\.|inside \d+|\d+ done in \d+\.\d\ds)")


def test_concurrent_steps_never_share_a_line() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, check=True)
    lines = done.stderr.split("\n")
    assert lines[-1] == ""
    bad = [ln for ln in lines[:-1] if not LINE.fullmatch(ln)]
    assert bad == [], bad[:5]
    assert len(lines) - 1 == 2 * 3000 * 3
