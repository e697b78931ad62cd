"""One way to run a tool, as mkosi's mkosi/run.py has one: the command line logged (with MDI_DEBUG=1), its
output captured, its exit status checked, and a failure raised as a BuildError that names what was being
done, the exit status and the end of what the tool printed."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from .errors import BuildError
from .log import info

TAIL = 2000  # characters of the tool's output a failure message carries (its end, where the reason is)


def debug_enabled() -> bool:
    """Whether every command line is logged (MDI_DEBUG=1), for reading a build log."""
    return os.environ.get("MDI_DEBUG") == "1"


def output_tail(done: subprocess.CompletedProcess[str]) -> str:
    """What the tool printed, stdout then stderr, cut to its last TAIL characters."""
    text = "\n".join(part.strip() for part in (done.stdout or "", done.stderr or "") if part and part.strip())
    return text[-TAIL:]


def run(argv: Sequence[str], failed: str | None = None, *, ok: tuple[int, ...] | None = (0,),
        env: dict[str, str] | None = None, cwd: str | None = None, missing: str | None = None,
        preexec_fn: Callable[[], Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv with stdout and stderr captured as text; the result when its exit status is in ok.

    failed: the message for any other status (default "<command line> failed"); the status and the output's
    end are appended. ok=None returns every result, for callers that read the output to judge it.
    missing: why the tool is needed, for a BuildError naming it when it is not on PATH.
    """
    argv = list(argv)
    if debug_enabled():
        info(f"$ {shlex.join(argv)}")
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              errors="backslashreplace", env=env, cwd=cwd, preexec_fn=preexec_fn)
    except FileNotFoundError:
        if missing is None:
            raise
        raise BuildError(f"{argv[0]} is not on PATH ({missing})") from None
    if ok is not None and done.returncode not in ok:
        raise BuildError(f"{failed or shlex.join(argv) + ' failed'} (exit {done.returncode}): {output_tail(done)}")
    return done
