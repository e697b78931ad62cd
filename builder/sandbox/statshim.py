"""The stat shim (statshim.c, built with the package as builder.sandbox._statshim): which library to preload.

mkfs.ext4 -d copies owners and times from the files it reads; preloaded, the shim shows it every file as
owned by root with atime/ctime at the epoch (builder/fs/ext.py checks on the image that it took).
"""

from __future__ import annotations

from functools import cache

from .preload import built_library

# Path of the stat shim to preload into mkfs, or "none" for the debugfs pass; default: the one built with the package.
SHIM_ENV = "MDI_STAT_SHIM"


@cache
def stat_shim() -> str | None:
    """The stat shim library to preload into mkfs (built with the package as builder.sandbox._statshim), if any."""
    return built_library(SHIM_ENV, "_statshim", "statshim")
