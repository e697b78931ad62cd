"""A file's SHA-256, the one way tests and benchmarks compare images byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (images are gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
