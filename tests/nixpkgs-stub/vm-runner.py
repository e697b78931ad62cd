"""runInLinuxVM's VM in the nixpkgs stand-in: builder.vm runs the original builder as root, $diskImage as /dev/vda.

argv: host.json, then `--disk FILE --mem MIB -- BUILDER ARGS...` as vm-run.sh passes them. The build
environment is passed through; UEFI pflash comes from QEMU_OPTS as make-disk-image writes it. Exits with
the guest's status.
"""

import json
import os
import re
import sys
from pathlib import Path

host = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, host["builderSource"])
os.environ["XDG_CACHE_HOME"] = host["cacheDir"]

from builder.errors import BuildError  # noqa: E402
from builder.vm import run_in_vm  # noqa: E402


def pflash(qemu_opts: str, unit: int) -> Path | None:
    """The file of pflash unit `unit` in QEMU_OPTS, with $out expanded."""
    m = re.search(rf"if=pflash,[^ ]*unit={unit},[^ ]*file=([^ ,]+)", qemu_opts)
    return Path(m.group(1).replace("$out", os.environ["out"])) if m else None


def main(argv: list[str]) -> int:
    """--disk FILE --mem MIB -- BUILDER ARGS...: run BUILDER ARGS in the VM."""
    disk = Path(argv[argv.index("--disk") + 1]).resolve()
    mem = int(argv[argv.index("--mem") + 1])
    command = argv[argv.index("--") + 1 :]
    opts = os.environ.get("QEMU_OPTS", "")
    code, variables = pflash(opts, 0), pflash(opts, 1)
    efi = (code, variables) if code is not None and variables is not None else None
    skip = {"TMPDIR", "TEMPDIR", "TMP", "TEMP", "NIX_BUILD_TOP", "PWD", "OLDPWD", "SHLVL", "_"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update({"TMPDIR": "/run/tmp", "NIX_BUILD_TOP": "/run/tmp", "HOME": "/run/tmp"})
    xchg = Path(os.environ["NIX_BUILD_TOP"]) / "xchg"
    try:
        return run_in_vm(command, disk, mem_mib=mem, xchg=xchg, efi=efi, env=env, cwd="/run/tmp")
    except BuildError as exc:
        print(f"VM stand-in: {exc}", file=sys.stderr)
        return 1


sys.exit(main(sys.argv[2:]))
