"""The checksum library (e2fscrc.c, built with the package as builder.sandbox._e2fscrc) e2fsprogs runs with.

Preloaded into mkfs.ext4, debugfs, e2fsck and tune2fs, it computes their CRC-32C checksums with the CPU's
crc32 instruction: the same checksums (the library checks that against libext2fs before using it), so the
same image bytes, in less time. MDI_E2FS_CRC=none leaves e2fsprogs as it is (tests compare the two).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

from ..errors import UserError

# Path of the library to preload into e2fsprogs, or "none"; default: the one built with the package.
CRC_ENV = "MDI_E2FS_CRC"


@cache
def crc_library() -> str | None:
    """The checksum library to preload into e2fsprogs, if any (a bad MDI_E2FS_CRC is the user's: exit 2)."""
    chosen = os.environ.get(CRC_ENV)
    if chosen == "none":
        return None
    if chosen:
        if not os.path.isfile(chosen):
            raise UserError(f"{CRC_ENV}={chosen!r} is not a file (give the built e2fscrc library, or 'none')")
        return chosen
    found = importlib.util.find_spec(f"{__package__}._e2fscrc")
    return found.origin if found is not None and found.origin and os.path.isfile(found.origin) else None


def with_crc_library(env: dict[str, str]) -> dict[str, str]:
    """env with the checksum library added to LD_PRELOAD (after what is there already), when there is one."""
    library = crc_library()
    if library is None:
        return env
    return {**env, "LD_PRELOAD": ":".join(filter(None, [env.get("LD_PRELOAD"), library]))}
