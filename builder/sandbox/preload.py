"""LD_PRELOAD libraries built with the package (setuptools ext-modules), each chosen by an environment setting."""

from __future__ import annotations

import importlib.util
import os

from ..errors import UserError


def built_library(setting: str, module: str, what: str) -> str | None:
    """The library the setting names (a file, or "none" for no library), else builder.sandbox.<module> if built.

    A setting naming no file is the user's error (exit 2), found before any work (pipeline.check_environment).
    """
    chosen = os.environ.get(setting)
    if chosen == "none":
        return None
    if chosen:
        if not os.path.isfile(chosen):
            raise UserError(f"{setting}={chosen!r} is not a file (give the built {what} library, or 'none')")
        if not preloadable(chosen):
            raise UserError(f"{setting}={chosen!r}: LD_PRELOAD splits paths at spaces and colons; give a path "
                            "without them, or 'none'")
        return chosen
    found = importlib.util.find_spec(f"{__package__}.{module}")
    if found is None or not found.origin or not os.path.isfile(found.origin) or not preloadable(found.origin):
        return None  # not built, or installed where the loader cannot be given it: e2fsprogs runs without
    return found.origin


def preloadable(path: str) -> bool:
    """Whether LD_PRELOAD can name path: the dynamic loader splits its value at spaces and colons."""
    return not any(c in path for c in " \t\n:")


def preload_list(*libraries: str | None) -> str:
    """An LD_PRELOAD value loading these in order (empty or None entries, e.g. an unset LD_PRELOAD, left out)."""
    return ":".join(filter(None, libraries))
