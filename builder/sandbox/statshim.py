"""The stat shim (statshim.c, built with the package as builder.sandbox._statshim): which library to preload.

mkfs.ext4 -d copies owners and times from the files it reads; preloaded, the shim shows it every file as
owned by root with atime/ctime at the epoch (builder/fs/ext.py checks on the image that it took).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

from ..errors import BuildError

# Path of the stat shim to preload into mkfs, or "none" for the debugfs pass; default: the one built with the package.
SHIM_ENV = "MDI_STAT_SHIM"


@cache
def stat_shim() -> str | None:
    """The stat shim library to preload into mkfs (built with the package as builder.sandbox._statshim), if any."""
    chosen = os.environ.get(SHIM_ENV)
    if chosen == "none":
        return None
    if chosen:
        if not os.path.isfile(chosen):
            raise BuildError(f"{SHIM_ENV}={chosen!r} is not a file (give the built statshim library, or 'none')")
        return chosen
    found = importlib.util.find_spec(f"{__package__}._statshim")
    return found.origin if found is not None and found.origin and os.path.isfile(found.origin) else None
