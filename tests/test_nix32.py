"""Nix base-32 (builder/staging/store.py) against the real `nix hash`, for every digest length Nix uses."""

from __future__ import annotations

import os
import subprocess

import pytest

from builder.staging.store import nix32, nix32_to_hex

NIX = ["nix", "--extra-experimental-features", "nix-command"]


@pytest.mark.parametrize("algo,size", [("md5", 16), ("sha1", 20), ("sha256", 32), ("sha512", 64)])
def test_nix32_matches_nix_hash(algo: str, size: int) -> None:
    for digest in (bytes(size), b"\xff" * size, os.urandom(size), os.urandom(size)):
        res = subprocess.run([*NIX, "hash", "to-base32", f"{algo}:{digest.hex()}"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert nix32(digest) == res.stdout.strip()
        assert nix32_to_hex(res.stdout.strip()) == digest.hex()


@pytest.mark.parametrize("text", ["", "e" * 52, "0" * 51 + "u", "0" * 51 + " "])
def test_nix32_rejects_what_is_not_nix_base32(text: str) -> None:
    with pytest.raises(ValueError, match="not a Nix base-32 string"):
        nix32_to_hex(text)
