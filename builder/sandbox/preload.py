"""LD_PRELOAD libraries built with the package (setuptools ext-modules), each chosen by an environment setting."""

from __future__ import annotations

import importlib.util
import os

from ..errors import UserError


def built_library(setting: str, module: str, what: str) -> str | None:
    """The library the setting names (a file, or "none" for no library), else builder.sandbox.<module> if built.

    A setting naming no file is the user's error (exit 2), found before any work (pipeline.check_settings).
    """
    chosen = os.environ.get(setting)
    if chosen == "none":
        return None
    if chosen:
        if not os.path.isfile(chosen):
            raise UserError(f"{setting}={chosen!r} is not a file (give the built {what} library, or 'none')")
        return chosen
    found = importlib.util.find_spec(f"{__package__}.{module}")
    return found.origin if found is not None and found.origin and os.path.isfile(found.origin) else None
