"""Run a command in a private user+mount namespace with bind mounts, so mkfs reads the closure in place.

Binding each store path over a placeholder in the staging root lets `mkfs.ext4 -d` read the closure once,
straight from the store, with no staging copy and no root. The mounts die with the namespace, so a killed
build leaves nothing mounted. When user namespaces are unavailable the caller copies instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from .signals import die_with_parent

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


@cache
def userns_available() -> bool:
    """Whether this process may create a user namespace and bind-mount in it."""
    if os.environ.get("MDI_STAGE_STORE") == "copy":
        return False
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def run_with_binds(
    binds: Sequence[tuple[str, str]], argv: Sequence[str], bind_file: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv inside a new user+mount namespace after bind-mounting each (source, target) pair."""
    bind_file.write_text(json.dumps(list(binds)))
    cmd = [*UNSHARE, sys.executable, "-m", "builder.namespace", str(bind_file), "--", *argv]
    pythonpath = str(Path(__file__).resolve().parent.parent)
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = pythonpath + (":" + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    # The helper (and mkfs it execs) gets SIGKILL if the builder dies, so a killed build leaves no writer behind.
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, preexec_fn=die_with_parent)


def _mount_binds(binds: list[list[str]]) -> None:
    """Bind-mount every pair read-only (called inside the namespace)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for source, target in binds:
        if libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind mount {source} -> {target}: {os.strerror(err)}")


def _main(args: list[str]) -> None:
    """Namespace side: mount the binds from the file, then exec the command."""
    bind_file, sep, *argv = args
    if sep != "--" or not argv:
        raise SystemExit("usage: python -m builder.namespace BINDFILE -- COMMAND...")
    try:
        _mount_binds(json.loads(Path(bind_file).read_text()))
        os.execvp(argv[0], argv)
    except OSError as exc:  # e.g. a store path deleted mid-build: the caller reports this line, not a traceback
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    _main(sys.argv[1:])
