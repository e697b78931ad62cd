"""The checksum library (e2fscrc.c, built with the package as builder.sandbox._e2fscrc) e2fsprogs runs with.

Preloaded into mkfs.ext4, debugfs, e2fsck and tune2fs, it computes their CRC-32C checksums with the CPU's
crc32 instruction: the same checksums (the library checks that against libext2fs before using it), so the
same image bytes, in less time. MDI_E2FS_CRC=none leaves e2fsprogs as it is (tests compare the two).
"""

from __future__ import annotations

from functools import cache

from .preload import built_library, preload_list

# Path of the library to preload into e2fsprogs, or "none"; default: the one built with the package.
CRC_ENV = "MDI_E2FS_CRC"


@cache
def crc_library() -> str | None:
    """The checksum library to preload into e2fsprogs (built with the package as builder.sandbox._e2fscrc), if any."""
    return built_library(CRC_ENV, "_e2fscrc", "e2fscrc")


def with_crc_library(env: dict[str, str]) -> dict[str, str]:
    """env with the checksum library added to LD_PRELOAD (after what is there already), when there is one."""
    library = crc_library()
    if library is None:
        return env
    return {**env, "LD_PRELOAD": preload_list(env.get("LD_PRELOAD"), library)}
