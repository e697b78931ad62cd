"""Run a command in a private user+mount namespace with bind mounts, so mkfs reads the closure in place.

Binding each store path over a placeholder in the staging root lets `mkfs.ext4 -d` read the closure once,
straight from the store, with no staging copy and no root. The mounts die with the namespace, so a killed
build leaves nothing mounted. When user namespaces are unavailable the caller copies instead.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from ..process import run
from ..signals import die_with_parent

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
        return run([*UNSHARE, "true"], ok=None).returncode == 0
    except OSError:
        return False


def run_with_binds(
    binds: Sequence[tuple[str, str]], argv: Sequence[str], bind_file: Path, env: Mapping[str, str] | None = None,
    lazy_store: str | None = None, epoch: int = 0,
) -> subprocess.CompletedProcess[str]:
    """Run argv inside a new user+mount namespace after bind-mounting each (source, target) pair.

    With lazy_store, the targets do not exist yet: a tmpfs is mounted over that directory and they are
    made there first (see _mount_store).
    """
    plan: object = list(binds) if lazy_store is None else {"store": lazy_store, "epoch": epoch, "binds": list(binds)}
    bind_file.write_text(json.dumps(plan))
    cmd = [*UNSHARE, sys.executable, "-m", "builder.sandbox.namespace", str(bind_file), "--", *argv]
    pythonpath = str(Path(__file__).resolve().parents[2])
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = pythonpath + (":" + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    # The helper (and mkfs it execs) gets SIGKILL if the builder dies, so a killed build leaves no writer behind.
    return run(cmd, ok=None, env=full_env, preexec_fn=die_with_parent)


def mount_binds(binds: list[list[str]]) -> None:
    """Bind-mount every pair read-only (called inside the namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc (find_library would run ldconfig -p)
    for source, target in binds:
        if libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind mount {source} -> {target}: {os.strerror(err)}")


def _mount_store(store: str, epoch: int, binds: list[list[str]]) -> None:
    """A tmpfs over the staged store directory, the placeholders made on it, then the binds (in the namespace).

    The directory keeps its mode and gets the epoch as mtime; symlinks staged in it (store paths that are
    symlinks) are recreated on the tmpfs with their times.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    mode = stat.S_IMODE(os.lstat(store).st_mode)
    links = {}
    with os.scandir(store) as entries:
        for entry in entries:
            if not entry.is_symlink():
                raise OSError(errno.EEXIST, f"staged store {store} holds {entry.name}, which is not a symlink")
            links[entry.name] = os.readlink(entry.path)
    if libc.mount(b"tmpfs", store.encode(), b"tmpfs", 0, f"mode={mode:o}".encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting a tmpfs on {store}: {os.strerror(err)}")
    for name, target in links.items():
        path = os.path.join(store, name)
        os.symlink(target, path)
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    for source, target in binds:
        if os.path.isdir(source):
            os.mkdir(target)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    mount_binds(binds)
    os.utime(store, (epoch, epoch))


def _main(args: list[str]) -> None:
    """Namespace side: mount the binds from the file, then exec the command."""
    bind_file, sep, *argv = args
    if sep != "--" or not argv:
        raise SystemExit("usage: python -m builder.sandbox.namespace BINDFILE -- COMMAND...")
    try:
        plan = json.loads(Path(bind_file).read_text())
        if isinstance(plan, dict):
            _mount_store(plan["store"], plan["epoch"], plan["binds"])
        else:
            mount_binds(plan)
        os.execvp(argv[0], argv)
    except OSError as exc:  # e.g. a store path deleted mid-build: the caller reports this line, not a traceback
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    _main(sys.argv[1:])
