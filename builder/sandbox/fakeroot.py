"""Run a filesystem tool unprivileged: closure bound in, owners faked, time and randomness pinned when asked.

Tools without options for owners or times (mkfs.btrfs, mkfs.xfs) run as:
  unshare --user --map-root-user --mount --pid --fork  (store paths bound over placeholders; PID 1)
    fakeroot [-i state]                                 (every file reads as root:root, or the recorded owner)
      sh -c 'LD_PRELOAD+=libfaketime' TOOL              (FAKETIME frozen at the epoch, FAKERANDOM_SEED fixed)
A frozen clock alone is not enough: libuuid mixes getpid() and the time into its random bytes, so the
PID namespace (the tool always runs with the same PID) and FAKERANDOM_SEED make UUIDs repeatable too.
libfaketime is preloaded into the tool only: faked (fakeroot's daemon) spins with a frozen clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import BuildError
from ..process import run
from ..staging.contents import ModeFix, OwnerFix
from .namespace import userns_available

LIBFAKETIME_ENV = "MDI_LIBFAKETIME"
# Where distributions put libfaketime (Debian, nixpkgs' libfaketime output via PATH's ../lib).
LIBFAKETIME_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/lib64/faketime/libfaketime.so.1",
)
PRELOAD_WRAPPER = 'export LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD:}$0"; exec "$@"'
RANDOM_SEED = "0x6d6469"  # any fixed value; "mdi"


def libfaketime() -> str:
    """The libfaketime library to preload: $MDI_LIBFAKETIME, next to a `faketime` on PATH, or a distro path."""
    env = os.environ.get(LIBFAKETIME_ENV)
    if env:
        return env
    candidates = list(LIBFAKETIME_CANDIDATES)
    tool = shutil.which("faketime")
    if tool:
        prefix = Path(os.path.realpath(tool)).parent.parent
        candidates[:0] = [str(prefix / "lib" / "libfaketime.so.1"),
                          str(prefix / "lib" / "faketime" / "libfaketime.so.1")]
    for c in candidates:
        if os.path.exists(c):
            return c
    raise BuildError("libfaketime is needed for a deterministic btrfs or xfs root (install libfaketime, or set "
                     f"{LIBFAKETIME_ENV} to libfaketime.so.1); or build with deterministic = false")


def fakeroot_state(fixes: Sequence[OwnerFix], root: Path, state: Path, modes: Sequence[ModeFix] = ()) -> Path:
    """A fakeroot state file recording the contents' numeric owners and modes (paths under the staged root).

    Modes come after owners: a chown clears set-id bits. fakeroot keeps the owner's access on the real file.
    """
    state.unlink(missing_ok=True)
    script = "\n".join([*(f"chown -h {f.uid}:{f.gid} -- {_sh(str(root) + f.image_path)}" for f in fixes),
                        *(f"chmod {m.mode & 0o7777:04o} -- {_sh(str(root) + m.image_path)}" for m in modes)])
    run(["fakeroot", "-s", str(state), "--", "sh", "-ec", script or "true"], "recording owners with fakeroot failed")
    return state


def _sh(word: str) -> str:
    """Single-quote a word for sh."""
    return "'" + word.replace("'", "'\\''") + "'"


SortedCopy = tuple[Path, Path, Sequence[OwnerFix], Sequence[ModeFix]]  # staged root, tmpfs copy, owners, modes


def run_tool(argv: Sequence[str], *, binds: Sequence[tuple[str, str]], scratch: Path, epoch: int | None,
             fake_owners: Path | None = None, use_fakeroot: bool = False,
             sorted_copy: SortedCopy | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv with the store bound in (user+mount+PID namespace), under fakeroot if asked, pinned by epoch."""
    # FAKEROOTDONTTRYCHOWN: libfakeroot records owners without calling chown (which fails in the namespace).
    env = dict(os.environ, TZ="UTC", LC_ALL="C", FAKEROOTDONTTRYCHOWN="1")
    cmd: list[str] = list(argv)
    if epoch is not None:
        env["FAKETIME"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
        env["FAKERANDOM_SEED"] = RANDOM_SEED
        env["FAKETIME_DONT_RESET"] = "1"
        cmd = ["sh", "-c", PRELOAD_WRAPPER, libfaketime(), *cmd]
    pythonpath = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pythonpath + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    bind_file = scratch / "binds.json"
    bind_file.write_text(json.dumps(list(binds)))
    if sorted_copy is not None and userns_available():
        src, dest, fixes, modes = sorted_copy
        dest.mkdir(exist_ok=True)
        owners = scratch / "owners.json"
        owners.write_text(json.dumps({"owners": [[f.image_path, f.uid, f.gid] for f in fixes],
                                      "modes": [[m.image_path, m.mode] for m in modes]}))
        cmd = [sys.executable, "-m", "builder.sandbox.sortedcopy", str(bind_file), str(src), str(dest), str(owners),
               "--", *cmd]
    elif binds:
        cmd = [sys.executable, "-m", "builder.sandbox.namespace", str(bind_file), "--", *cmd]
    if use_fakeroot or fake_owners is not None:
        cmd = ["fakeroot", *(["-i", str(fake_owners)] if fake_owners else []), "--", *cmd]
    if userns_available():
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child",
               "--propagation", "private", *cmd]
    elif binds:
        raise BuildError("internal: store binds need user namespaces")
    return run(cmd, ok=None, env=env)
