"""runInLinuxVM's VM in the nixpkgs stand-in: builder.vm runs the original builder as root, $diskImage as /dev/vda.

argv: host.json, then `--disk FILE --mem MIB -- BUILDER ARGS...` as vm-run.sh passes them. The build
environment is passed through (vmTools' stage 2 sources it from xchg/saved-env) with TMPDIR and
NIX_BUILD_TOP at /tmp, where the guest starts; QEMU_OPTS is appended to qemu's command line as vmTools
does (`$out` in it expanded; `-smp cpus=N` sets the vCPU count). Exits with the guest's status.
"""

import json
import os
import shlex
import sys
from pathlib import Path

host = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, host["builderSource"])
os.environ["XDG_CACHE_HOME"] = host["cacheDir"]

from builder.errors import BuildError  # noqa: E402
from builder.vm.runner import run_in_vm  # noqa: E402


def qemu_opts(text: str) -> tuple[list[str], int]:
    """QEMU_OPTS as qemu arguments ($out expanded) without -smp, and the vCPU count -smp asks for (1 if none)."""
    words = [w.replace("$out", os.environ["out"]) for w in shlex.split(text)]
    args: list[str] = []
    cpus = 1
    i = 0
    while i < len(words):
        if words[i] == "-smp" and i + 1 < len(words):
            cpus = int(words[i + 1].removeprefix("cpus="))
            i += 2
            continue
        args.append(words[i])
        i += 1
    return args, cpus


def main(argv: list[str]) -> int:
    """--disk FILE --mem MIB -- BUILDER ARGS...: run BUILDER ARGS in the VM."""
    disk = Path(argv[argv.index("--disk") + 1]).resolve()
    mem = int(argv[argv.index("--mem") + 1])
    command = argv[argv.index("--") + 1 :]
    extra, cpus = qemu_opts(os.environ.get("QEMU_OPTS", ""))
    skip = {"TMPDIR", "TEMPDIR", "TMP", "TEMP", "NIX_BUILD_TOP", "PWD", "OLDPWD", "SHLVL", "_", "QEMU_OPTS"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update({"TMPDIR": "/tmp", "NIX_BUILD_TOP": "/tmp"})
    xchg = Path(os.environ["NIX_BUILD_TOP"]) / "xchg"
    # vmTools runs qemu and virtiofsd from the store; this host side finds qemu on the host (the guest
    # still gets only the derivation's PATH, in env).
    os.environ["PATH"] = f"/usr/bin:{os.environ.get('PATH', '')}"
    try:
        return run_in_vm(command, disk, mem_mib=mem, xchg=xchg, env=env, extra_qemu_args=tuple(extra), cpus=cpus)
    except BuildError as exc:
        print(f"VM stand-in: {exc}", file=sys.stderr)
        return 1


sys.exit(main(sys.argv[2:]))
