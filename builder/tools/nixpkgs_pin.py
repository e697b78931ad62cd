"""Refresh nix/pin.json, the nixpkgs pin default.nix fetches, with nix-prefetch-github's answer."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BuildError, UserError
from ..process import run
from ..staging.store import NIX32_ALPHABET, nix32

# Nix's base-32 alphabet (no e, o, u, t), as in `nix hash to-base32`.
_REV = re.compile(r"[0-9a-f]{40}")  # whole-string matches (fullmatch): $ would let a trailing newline through
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def sri_to_nix32(sri: str) -> str:
    """Turn "sha256-<base64>" into the nix32 form fetchTarball accepts on every Nix version."""
    algo, _, b64 = sri.partition("-")
    if algo != "sha256":
        raise BuildError(f"nix-prefetch-github gave a {algo!r} hash, expected sha256: {sri!r}")
    try:
        digest = base64.b64decode(b64, validate=True)
    except ValueError:
        raise BuildError(f"nix-prefetch-github gave a malformed hash: {sri!r}") from None
    if len(digest) != 32:
        raise BuildError(f"nix-prefetch-github gave a hash of {len(digest)} bytes, expected 32: {sri!r}")
    return nix32(digest)


def _prefetch_command() -> str:
    """The nix-prefetch-github executable: on PATH, else next to this Python (its venv)."""
    found = shutil.which("nix-prefetch-github")
    if found:
        return found
    beside = Path(sys.executable).parent / "nix-prefetch-github"
    if beside.exists():
        return str(beside)
    raise UserError(
        "nix-prefetch-github is not installed (pip install nix-prefetch-github; nix shell nixpkgs#nix-prefetch-github)"
    )


def prefetch(owner: str, repo: str, rev: str) -> dict[str, Any]:
    """Ask nix-prefetch-github for the commit and NAR hash of owner/repo at rev (a branch, tag or commit)."""
    cmd = [_prefetch_command(), "--json", "--rev", rev, owner, repo]
    proc = run(cmd)
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BuildError(f"nix-prefetch-github printed no JSON: {proc.stdout[:500]!r}") from None
    if not isinstance(answer, dict):
        raise BuildError(f"nix-prefetch-github printed {type(answer).__name__}, expected an object")
    return answer


def pin_document(answer: dict[str, Any], owner: str, repo: str, branch: str) -> dict[str, str]:
    """The pin.json content from a prefetch answer (hash as SRI "hash" or nix32 "sha256")."""
    commit = answer.get("rev")
    if not isinstance(commit, str) or not _REV.fullmatch(commit):
        raise BuildError(f"nix-prefetch-github gave rev {commit!r}, expected a 40-digit commit id")
    sri = answer.get("hash")
    if isinstance(sri, str):
        sha256 = sri_to_nix32(sri)
    else:
        legacy = answer.get("sha256")
        if not isinstance(legacy, str) or not re.fullmatch(f"[{NIX32_ALPHABET}]{{52}}", legacy):
            raise BuildError(f"nix-prefetch-github gave no usable hash: {answer!r}")
        sha256 = legacy
        sri = None
    doc = {
        "owner": owner,
        "repo": repo,
        "branch": branch,
        "rev": commit,
        "url": f"https://github.com/{owner}/{repo}/archive/{commit}.tar.gz",
    }
    if sri is not None:
        doc["hash"] = sri
    doc["sha256"] = sha256
    return doc


def refresh_pin(file: Path, owner: str, repo: str, rev: str) -> None:
    """Prefetch owner/repo at rev and rewrite file atomically; a failed prefetch leaves it untouched."""
    for label, value in (("--owner", owner), ("--repo", repo), ("--rev", rev)):
        if not _NAME.fullmatch(value):
            raise UserError(f"{label} {value!r} is not allowed (letters, digits, '_', '.', '-')")
    branch = rev if not _REV.fullmatch(rev) else ""
    doc = pin_document(prefetch(owner, repo, rev), owner, repo, branch)
    if not branch:
        doc.pop("branch")
    # A fresh private name beside the file (O_EXCL), never one someone else could have planted a link at.
    fd, tmp = tempfile.mkstemp(dir=file.absolute().parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"{file}: {owner}/{repo} {doc['rev']} sha256 {doc['sha256']}")
