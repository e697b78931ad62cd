"""A closure made of this Debian machine's own files, so compression (qcow2-compressed) sees real data.

The synthetic closure (bench/closure.py) is PRNG bytes, which no compressor shrinks. A NixOS closure is
mostly ELF (libraries, executables, kernel modules), text (scripts, Python, docs, configuration) and
some already-compressed files (man pages, firmware, modules as .ko.xz). This generator copies such files
from fixed Debian directories into store paths: every directory of a source (a package's docs, a
locale, a Python package; split one level down while it holds more than GROUP_MAX) or every group of
files with the same stem (libssl.so.3 and libssl.so → "libssl") becomes one store path. Each
source's groups are taken in the order of their names' sha256 (a spread-out sample of it, not the
alphabet's first entries), the sources in proportion to their size (the one least used so far goes
next) until the target is reached, so every size has about the same mix. The selection depends only
on the files present; `file_list_sha256` in the manifest names it. Nix's canonical metadata (modes
0444/0555, mtime 1) and a real closureInfo, as for the synthetic closure.

Known difference from NixOS: Debian's kernel modules are uncompressed .ko (NixOS ships .ko.xz, which
does not compress further), so this closure compresses somewhat better than a NixOS system would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .closure import LOGICAL_STORE, Closure, _canonicalise, _write_closure_info, tree_counts
from .nar import nar_hash_size, nix32

GENERATOR_VERSION = 1
# (directory on this machine, tag in store path names, where its entries go inside a store path)
SOURCES = (
    ("/usr/lib/x86_64-linux-gnu", "lib", "lib"),
    ("/usr/bin", "bin", "bin"),
    ("/usr/share/doc", "doc", "share/doc"),
    ("/usr/share/man", "man", "share/man"),
    ("/usr/share/locale", "locale", "share/locale"),
    ("/usr/lib/python3.11", "python", "lib/python3.11"),
    ("/usr/lib/modules", "modules", "lib/modules"),
    ("/usr/lib/gcc", "gcc", "lib/gcc"),
    ("/usr/lib/llvm-14", "llvm", "lib/llvm-14"),
)
_NAME_CHARS = re.compile(r"[^A-Za-z0-9+._?=-]")
GROUP_MAX = 4 << 20  # a directory holding more is split into groups of its entries


@dataclass(frozen=True)
class Group:
    """Top-level entries of one source that become one store path."""

    source: str
    tag: str
    subdir: str
    key: str
    entries: tuple[str, ...]
    size: int  # bytes of regular files

    @property
    def name(self) -> str:
        """The store path's name, without the hash."""
        return f"{_NAME_CHARS.sub('_', self.key).lstrip('.') or 'x'}-{self.tag}"


def _tree_size(path: str) -> int:
    """Bytes of regular files at or under path (symlinks not followed)."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def source_groups(source: str, tag: str, subdir: str, rel: str = "") -> list[Group]:
    """The store path groups of one source directory (or of its subdirectory rel), in sha256 order of their keys.

    A directory becomes one group, unless it holds more than GROUP_MAX bytes: then its entries are
    grouped the same way, one level down. Files are grouped by stem. No groups when the source is missing.
    """
    base = os.path.join(source, rel)
    if not os.path.isdir(base):
        return []
    groups: list[Group] = []
    keys: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(base)):
        path, relentry = os.path.join(base, entry), os.path.join(rel, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            if _tree_size(path) > GROUP_MAX:
                groups += source_groups(source, tag, subdir, relentry)
            else:
                keys.setdefault(relentry, []).append(relentry)
        else:
            keys.setdefault(os.path.join(rel, re.split(r"[.\-_]", entry)[0] or entry), []).append(relentry)
    groups += [Group(source, tag, subdir, key, tuple(entries),
                     sum(_tree_size(os.path.join(source, e)) for e in entries)) for key, entries in keys.items()]
    return sorted(groups, key=lambda g: hashlib.sha256(g.key.encode()).digest())


def select(groups: dict[str, list[Group]], target: int) -> list[Group]:
    """Groups taken from every source in proportion to its size until `target` bytes (or all of them),
    leaving out any that would overshoot the target by more than 10% + GROUP_MAX."""
    groups = {s: [g for g in gs if g.size] for s, gs in groups.items()}  # symlinks alone weigh nothing
    totals = {s: max(1, sum(g.size for g in gs)) for s, gs in groups.items()}
    taken = {s: 0 for s in groups}
    nexts = {s: 0 for s in groups}
    chosen: list[Group] = []
    total = 0
    while total < target:
        open_sources = [s for s in groups if nexts[s] < len(groups[s])]
        if not open_sources:
            break
        source = min(open_sources, key=lambda s: (taken[s] / totals[s], s))
        group = groups[source][nexts[source]]
        nexts[source] += 1
        if total + group.size > target + target // 10 + GROUP_MAX:
            continue  # one huge file (libLLVM) would overshoot a small target: leave it out
        taken[source] += group.size
        total += group.size
        chosen.append(group)
    return chosen


def _inside(link: str, target: str, top: str) -> bool:
    """Whether a relative symlink at `link` pointing to `target` stays inside directory `top`."""
    if os.path.isabs(target):
        return False
    resolved = os.path.normpath(os.path.join(os.path.dirname(link), target))
    return resolved == top or resolved.startswith(top + os.sep)


def _copy_entry(src: str, dest: str, top: str) -> None:
    """Copy a file, a symlink that stays inside the store path, or a directory tree of them; skip the rest."""
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o555 if st.st_mode & 0o111 else 0o444)
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(src)
        if _inside(dest, target, top):
            os.symlink(target, dest)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dest)
        for name in sorted(os.listdir(src)):
            _copy_entry(os.path.join(src, name), os.path.join(dest, name), top)


def store_name(name: str) -> str:
    """`<hash>-<name>` with a hash derived from the name (well-formed, not a real output hash)."""
    digest = hashlib.sha256(f"mdi-bench-debian/{GENERATOR_VERSION}/{name}".encode()).digest()[:20]
    return f"{nix32(digest)}-{name}"


def generate_debian(directory: Path, target: int) -> Closure:
    """Write a closure of about `target` bytes of this machine's files into `directory` (must not exist)."""
    store = directory / "root/nix/store"
    store.mkdir(parents=True)
    groups = {src: source_groups(src, tag, sub) for src, tag, sub in SOURCES}
    chosen = select(groups, target)
    listing = hashlib.sha256()
    paths: list[str] = []
    seen: set[str] = set()
    for group in chosen:
        name = group.name
        while name in seen:  # two keys that sanitise alike
            name += "_"
        seen.add(name)
        path = store_name(name)
        top = store / path
        where = top / group.subdir
        where.mkdir(parents=True)
        for entry in group.entries:
            (where / entry).parent.mkdir(parents=True, exist_ok=True)
            _copy_entry(os.path.join(group.source, entry), str(where / entry), str(top))
            listing.update(f"{group.source}/{entry}\0".encode())
        paths.append(path)
    toplevel = store_name("nixos-system-bench-debian-25.11")
    top = store / toplevel
    top.mkdir()
    (top / "nixos-version").write_text("25.11.bench-debian\n")
    for link, path in zip(("sw", "etc", "kernel-modules"), paths, strict=False):
        os.symlink(f"{LOGICAL_STORE}/{path}", top / link)
    refs: dict[str, list[str]] = {p: [] for p in paths}
    refs[toplevel] = sorted(paths)
    all_paths = [*paths, toplevel]
    _canonicalise(store)
    nar = {name: nar_hash_size(store / name) for name in all_paths}
    _write_closure_info(directory / "closure-info", str(store), all_paths, refs, nar)
    _write_closure_info(directory / "closure-info-nix", LOGICAL_STORE, all_paths, refs, nar)
    manifest: dict[str, Any] = {
        "generator": "debian",
        "generator_version": GENERATOR_VERSION,
        "sources": [s for s, _, _ in SOURCES if groups[s]],
        "target_bytes": target,
        "toplevel": toplevel,
        "store_paths": len(all_paths),
        "file_list_sha256": listing.hexdigest(),
        "counts": tree_counts(store),
        "total_nar_size": sum(s for _, s in nar.values()),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Closure(directory, manifest)
