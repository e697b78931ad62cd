"""Spec files for tests: the factory type the `make_spec` fixture returns, and reading a spec back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SpecFactory = Callable[..., Path]


def spec_doc(path: Path) -> dict[str, Any]:
    """The JSON document of a spec file."""
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc
