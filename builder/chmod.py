"""rsync's --chmod: parse a contents entry's `mode` and compute the mode rsync -a gives each file and directory.

nixpkgs' nixos/lib/make-disk-image.nix copies every `contents` entry with
`rsync -a --no-o --no-g --chmod=$mode`, so `mode` is an rsync --chmod string, not just an octal number.
This follows rsync 3.5.0 (RsyncProject/rsync chmod.c: parse_chmod, tweak_mode), checked against the real
rsync by tests/test_chmod.py:
- a comma-separated list of clauses, applied in order; no empty clause, no surrounding space;
- a clause is `[DF]*` + an octal number <= 07777, which replaces all twelve permission bits, or
  `[DFugoa]*` (not both D and F) + one operator `-+=` + `[rwxXst]*` or a single `[ugo]` (that class's
  rwx bits, copied); D limits a clause to directories, F to everything else;
- X is x for directories and for files whose source had any x bit (before any clause applied);
- without u/g/o/a the bits are masked by rsync's umask: Nix builders run with umask 022, so that is the
  umask used here, never the builder's own;
- `s` sets setuid for u, setgid for g, both for a, and setuid when no class or only o is named (a `t`
  before it is then dropped); `t` sets the sticky bit;
- `=` clears the named classes' rwx (their set-id bits only when `s` or `t` is given or a class is copied):
  "=" alone leaves only the set-id and sticky bits, "o=" takes everything from others.
rsync applies the clauses to the sender's mode as it reads the file list (flist.c, recv_file_entry) and,
with -p (part of -a), keeps the result as is: generator.c calls dest_mode() (rsync.c) only without -p, so
the umask plays no other part. Symlinks are left alone. A string rsync refuses ("Invalid argument passed
to --chmod") makes nixpkgs' build fail, and is refused here.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass

from . import rules

# Nix builders run with this umask (nix's builder sets it before exec); rsync masks class-less clauses by it.
BUILD_UMASK = 0o022
CHMOD_BITS = 0o7777

# The whole language rsync's parse_chmod accepts, as a regex with the same verdict for every string.
# Written with constructs POSIX ERE (Nix's builtins.match, nix/args), ECMA (JSON Schema) and
# Python agree on; anchored by each user (fullmatch, builtins.match, ^...(?![\s\S]) in the schema).
CLAUSE_REGEX = rules.pattern("chmodClause")  # builder/rules.json, which nix/args reads too
MODE_REGEX = rf"{CLAUSE_REGEX}(,{CLAUSE_REGEX})*"
ALLOWED = 'an rsync --chmod string such as "0644", "u+x", "a=r,u+w" or "D755,F644"'

_WHO = {"u": 0o100, "g": 0o010, "o": 0o001, "a": 0o111}
_SETID = {"u": 0o4000, "g": 0o2000, "o": 0, "a": 0o6000}
_WHAT = {"r": 4, "w": 2, "x": 1, "X": 1}


class ChmodError(ValueError):
    """A --chmod string rsync refuses."""


@dataclass(frozen=True)
class Clause:
    """One parsed clause, in rsync's AND/OR form plus the copy-from-class part."""

    mode_and: int
    mode_or: int
    copy_from: int  # 0o100, 0o010 or 0o001 for u/g/o on the right of the operator; 0 for none
    copy_to: int  # the classes copied into (0o111 for all)
    copy_mask: int  # CHMOD_BITS, or ~umask when no class was named
    subtract: bool
    x_keep: bool  # X: no x for files without any x bit
    dirs_only: bool
    files_only: bool

    def applies_to(self, is_dir: bool) -> bool:
        """Whether a D/F restriction lets this clause touch a directory (is_dir) or other file."""
        return not (self.dirs_only and not is_dir) and not (self.files_only and is_dir)


@dataclass(frozen=True)
class ChmodRules:
    """A parsed --chmod string (its text kept for messages and the spec)."""

    text: str
    clauses: tuple[Clause, ...]

    def apply(self, mode: int) -> int:
        """The mode rsync -a --chmod=text gives a copy of a file or directory whose source has st_mode `mode`."""
        is_dir = stat.S_ISDIR(mode)
        had_x = mode & 0o111
        kind = mode & ~CHMOD_BITS
        perms = mode & CHMOD_BITS
        for c in self.clauses:
            if not c.applies_to(is_dir):
                continue
            copied = 0
            if c.copy_from:
                shift = {0o100: 6, 0o010: 3, 0o001: 0}[c.copy_from]
                copied = (c.copy_to * ((perms >> shift) & 7)) & c.copy_mask
            perms &= c.mode_and
            perms |= c.mode_or & ~0o111 if c.x_keep and not had_x and not is_dir else c.mode_or
            perms = perms & (CHMOD_BITS - copied) if c.subtract else perms | copied
        return kind | perms


def _clause(text: str, umask: int) -> Clause:
    """Parse one comma-free clause as rsync's parse_chmod state machine does; ChmodError if it refuses it."""
    m = re.fullmatch(r"([DFugoa]*)(?:([-+=])([rwxXstugo]*)|([0-7]+))", text)
    if m is None:
        raise ChmodError(text)
    head, op, tail, octal = m.groups()
    if "D" in head and "F" in head:
        raise ChmodError(text)
    dirs_only, files_only = "D" in head, "F" in head
    who = "".join(ch for ch in head if ch in _WHO)
    if octal is not None:
        value = int(octal, 8)
        if who or value > CHMOD_BITS:
            raise ChmodError(text)
        return Clause(0, value, 0, 0, CHMOD_BITS, False, False, dirs_only, files_only)
    copy_from = 0
    if tail in ("u", "g", "o"):
        copy_from = _WHO[tail]
    elif any(ch in "ugo" for ch in tail):
        raise ChmodError(text)
    where = 0
    setid = 0
    for ch in who:
        where |= _WHO[ch]
        setid |= _SETID[ch]
    what = 0
    special = 0
    for ch in tail if not copy_from else "":
        if ch in _WHAT:
            what |= _WHAT[ch]
        elif ch == "s":  # rsync: without u/g/a, s means setuid and replaces a t given before it
            special = special | setid if setid else 0o4000
        else:  # "t"
            special |= 0o1000
    if where:
        bits, copy_mask = where * what, CHMOD_BITS
    else:
        where = 0o111
        bits, copy_mask = (where * what) & ~umask, ~umask & CHMOD_BITS
    if op == "+":
        mode_and, mode_or = CHMOD_BITS, bits | special
    elif op == "-":
        mode_and, mode_or = CHMOD_BITS - bits - special, 0
    else:
        cleared = where * 7 + (setid if special else 0) + (_setid_of(where) if copy_from else 0)
        mode_and, mode_or = CHMOD_BITS & ~cleared, bits | special
    return Clause(mode_and, mode_or, copy_from, where, copy_mask, op == "-", "X" in tail, dirs_only, files_only)


def _setid_of(where: int) -> int:
    """The set-id/sticky bit each class owns (u: setuid, g: setgid, o: sticky), for `=` copying a class."""
    return (0o4000 if where & 0o100 else 0) | (0o2000 if where & 0o010 else 0) | (0o1000 if where & 0o001 else 0)


def parse(text: str, umask: int = BUILD_UMASK) -> ChmodRules:
    """Parse an rsync --chmod string; ChmodError (naming the string) for anything rsync refuses."""
    try:
        if not text:
            raise ChmodError(text)
        return ChmodRules(text, tuple(_clause(part, umask) for part in text.split(",")))
    except ChmodError:
        raise ChmodError(f"{text!r} is not {ALLOWED} (rsync: Invalid argument passed to --chmod)") from None
