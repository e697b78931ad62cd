"""Package data: the rules and schema files next to the modules, and templates/ (the package builder.templates)."""

from __future__ import annotations

import importlib.resources
import json
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def data_file(name: str) -> Path:
    """A data file shipped in the builder package itself (rules.json, spec.schema.json)."""
    return PACKAGE_DIR / name


@cache
def json_file(name: str) -> Any:
    """A JSON data file of the package, parsed once."""
    return json.loads(data_file(name).read_text())


def template_dir() -> Path:
    """templates/: beside the package in a source checkout, else the installed package builder.templates.

    setuptools installs the repository's templates/ as builder.templates (pyproject's package-dir), under
    pip and under nixpkgs' buildPythonApplication alike. Code running from a checkout (PYTHONPATH=<repo>,
    as in the build VM, or an editable install) uses the checkout's own templates/.
    """
    beside = PACKAGE_DIR.parent / "templates"
    if (beside / "finalize.sh.j2").is_file():
        return beside
    return Path(str(importlib.resources.files("builder.templates").joinpath("finalize.sh.j2"))).parent
