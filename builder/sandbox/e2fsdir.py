"""The directory library (e2fsdir.c, built with the package as builder.sandbox._e2fsdir) mkfs.ext4 -d runs with.

Preloaded into mkfs.ext4 only, it adds and looks up directory entries without scanning the directory, so
populating a directory takes time linear in its size (libext2fs 1.47.0 scans it for every entry); it places
each entry where libext2fs would, so the image's bytes are the same. MDI_E2FS_DIR=none leaves mkfs as it is
(tests compare the two).
"""

from __future__ import annotations

from functools import cache

from .preload import built_library

# Path of the library to preload into mkfs.ext4, or "none"; default: the one built with the package.
DIR_ENV = "MDI_E2FS_DIR"


@cache
def dir_library() -> str | None:
    """The directory library to preload into mkfs.ext4 (builder.sandbox._e2fsdir), if any."""
    return built_library(DIR_ENV, "_e2fsdir", "e2fsdir")
