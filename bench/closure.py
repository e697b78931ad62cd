"""Deterministic synthetic Nix store closure shaped like a NixOS system, plus its closureInfo files.

The tree is `<dir>/root/nix/store/<hash>-<name>/...`: many small files, a few large ones, symlinks
inside and across store paths, executables, empty files and hard-linked duplicates across store paths
(as auto-optimise-store leaves them), with Nix's canonical metadata (modes 0444/0555, mtime 1).
Contents come from a seeded PRNG. Store path hashes are random but well-formed (not derived from
the contents as real ones are); narHash and narSize are real (computed from the tree), so
`nix-store --verify --check-contents` accepts the registration.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .nar import NIX32_ALPHABET, nar_hash_size

GENERATOR_VERSION = 1
MiB = 1 << 20
LOGICAL_STORE = "/nix/store"
_WRITE_CHUNK = 4 * MiB
_MAX_FILE = 96 * MiB
_DUP_MAX = 256 * 1024


@dataclass(frozen=True)
class Kind:
    """A family of store paths: how many files, how big, where they go and what else they hold."""

    name: str
    weight: float
    count_median: float  # files per path (log-normal)
    count_sigma: float
    size_median: float  # bytes per file (log-normal)
    size_sigma: float
    exec_share: float
    link_share: float  # symlinks per file
    dirs: tuple[str, ...]
    exts: tuple[str, ...]


KINDS = (
    Kind("lib", 26, 10, 0.9, 9000, 2.1, 0.03, 0.3, ("lib", "share/doc", "libexec"), (".so", ".a", ".la", "")),
    Kind("bin", 18, 6, 1.0, 24000, 1.9, 0.7, 0.12, ("bin", "share/man/man1", "share/doc"), ("", ".1.gz", ".sh")),
    Kind("python", 8, 120, 0.8, 2600, 1.6, 0.01, 0.01, ("lib/python3.12/site-packages",), (".py", ".pyc", ".pyi")),
    Kind("data", 10, 120, 1.1, 1400, 1.6, 0.0, 0.08, ("share",), (".mo", ".xml", ".png", ".svg", ".txt", "")),
    Kind("dev", 8, 40, 1.0, 3500, 1.3, 0.0, 0.05, ("include", "lib/pkgconfig", "lib/cmake"), (".h", ".pc", ".cmake")),
    Kind("etc", 18, 3, 0.8, 700, 1.2, 0.35, 0.8, ("etc", "lib/systemd/system", "bin"), (".service", ".conf", "")),
    Kind("big", 1.6, 3, 0.6, 6 * MiB, 1.1, 0.2, 0.3, ("lib", "lib/firmware", "share"), (".so", ".bin", ".img")),
)
SINGLE_FILE_SHARE = 0.08  # store paths that are one regular file (scripts, patches, configs)
NAMES = (
    "glibc", "gcc-lib", "systemd", "linux", "linux-firmware", "python3", "perl", "openssl", "coreutils",
    "bash", "util-linux", "ncurses", "zlib", "xz", "zstd", "bzip2", "libffi", "sqlite", "nix", "curl",
    "libxml2", "icu", "dbus", "kmod", "shadow", "pam", "iproute2", "iptables", "openssh", "e2fsprogs",
    "dosfstools", "grub", "mesa", "libdrm", "llvm", "gnutls", "nettle", "gmp", "mpfr", "readline",
    "gettext", "tzdata", "cacert", "glib", "pcre2", "expat", "libcap", "acl", "attr", "lvm2", "cryptsetup",
    "json-c", "libuuid", "nss", "krb5", "libidn2", "libunistring", "findutils", "gnugrep", "gnused",
    "gawk", "diffutils", "less", "man-db", "groff", "texinfo", "nano", "vim", "htop", "procps", "psmisc",
    "kbd", "console-setup", "fontconfig", "freetype", "harfbuzz", "libpng", "libjpeg", "unit-script",
    "etc-fstab", "X-Restart-Triggers", "system-units", "user-units", "nixos-manual", "man-paths",
)
OUTPUTS = ("", "", "", "-lib", "-bin", "-man", "-dev", "-doc")
SYLLABLES = ("ab", "ac", "al", "ba", "be", "cor", "da", "de", "el", "en", "fa", "gi", "ho", "io", "ka",
             "li", "lo", "ma", "ne", "no", "or", "pa", "qu", "ra", "sa", "se", "ti", "to", "un", "va", "xe", "zy")


@dataclass(frozen=True)
class Closure:
    """A generated closure on disk: the tree, its closureInfo directories and what it holds."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def root(self) -> Path:
        """The directory holding nix/store (what mkfs.ext4 -d and cp -a read)."""
        return self.directory / "root"

    @property
    def store_dir(self) -> Path:
        """The store directory on this machine (the spec's storeDir)."""
        return self.root / "nix/store"

    @property
    def closure_info(self) -> Path:
        """closureInfo with host paths under store_dir (for the builder's spec)."""
        return self.directory / "closure-info"

    @property
    def closure_info_nix(self) -> Path:
        """closureInfo with the logical /nix/store paths (for nix-store --store ROOT --load-db)."""
        return self.directory / "closure-info-nix"

    @property
    def toplevel(self) -> Path:
        """The system store path (host path)."""
        return self.store_dir / str(self.manifest["toplevel"])


class _Generator:
    """Writes one closure; every random choice comes from one seeded PRNG, in a fixed order."""

    def __init__(self, store: Path, target: int, seed: int) -> None:
        self.store = store
        self.target = target
        self.rng = random.Random(f"mdi-bench/{GENERATOR_VERSION}/{seed}/{target}")
        self.written = 0  # bytes of distinct regular files
        self.paths: list[str] = []
        self.refs: dict[str, list[str]] = {}
        self.dup_pool: list[tuple[Path, int]] = []
        self.hashes: set[str] = set()

    def word(self, parts: int) -> str:
        """A pronounceable random name."""
        return "".join(self.rng.choice(SYLLABLES) for _ in range(parts))

    def store_name(self, base: str, versioned: bool = True) -> str:
        """A fresh `<32 nix32 chars>-<name>` store path name."""
        while True:
            h = "".join(self.rng.choice(NIX32_ALPHABET) for _ in range(32))
            if h not in self.hashes:
                self.hashes.add(h)
                break
        if not versioned:
            return f"{h}-{base}"
        version = f"{self.rng.randint(0, 12)}.{self.rng.randint(0, 40)}.{self.rng.randint(0, 9)}"
        return f"{h}-{base}-{version}{self.rng.choice(OUTPUTS)}"

    def lognormal(self, median: float, sigma: float) -> float:
        """A log-normal draw with the given median."""
        return self.rng.lognormvariate(math.log(median), sigma)

    def write_file(self, path: Path, size: int, executable: bool) -> None:
        """Create a regular file of PRNG bytes (or hard-link a duplicate) with Nix's canonical mode."""
        if not executable and 0 < size <= _DUP_MAX and self.dup_pool and self.rng.random() < 0.09:
            source, _ = self.rng.choice(self.dup_pool)
            os.link(source, path)
            return
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, _WRITE_CHUNK)
                f.write(self.rng.randbytes(n))
                left -= n
            os.fchmod(f.fileno(), 0o555 if executable else 0o444)
        self.written += size
        if not executable and 0 < size <= _DUP_MAX and len(self.dup_pool) < 4096 and self.rng.random() < 0.2:
            self.dup_pool.append((path, size))

    def file_size(self, kind: Kind) -> int:
        """A file size for this kind: some empty files, a heavy tail, capped."""
        if self.rng.random() < 0.02:
            return 0
        return min(_MAX_FILE, int(self.lognormal(kind.size_median, kind.size_sigma)))

    def unique(self, directory: Path, stem: str) -> Path:
        """A path in directory that does not exist yet, based on stem."""
        candidate = directory / stem
        n = 1
        while os.path.lexists(candidate):
            candidate = directory / f"{stem}-{n}"
            n += 1
        return candidate

    def populate(self, top: Path, kind: Kind, refs: list[str]) -> None:
        """Fill one store path directory with files, subdirectories and symlinks."""
        dirs: list[Path] = []
        for d in kind.dirs:
            dirs.append(top / d)
            (top / d).mkdir(parents=True, exist_ok=True)
        count = max(1, int(self.lognormal(kind.count_median, kind.count_sigma)))
        files: list[Path] = []
        for _ in range(count):
            if self.rng.random() < 0.12:
                parent = self.unique(self.rng.choice(dirs), self.word(2))
                parent.mkdir()
                dirs.append(parent)
            parent = self.rng.choice(dirs)
            executable = self.rng.random() < kind.exec_share
            path = self.unique(parent, self.word(self.rng.randint(1, 3)) + self.rng.choice(kind.exts))
            self.write_file(path, self.file_size(kind), executable)
            files.append(path)
        links = int(count * kind.link_share + self.rng.random())
        for _ in range(links):
            parent = self.rng.choice(dirs)
            if refs and self.rng.random() < 0.4:
                target = f"{LOGICAL_STORE}/{self.rng.choice(refs)}/{self.rng.choice(kind.dirs)}/{self.word(2)}"
            else:
                target = os.path.relpath(self.rng.choice(files), parent)
            os.symlink(target, self.unique(parent, self.word(2) + self.rng.choice(kind.exts)))

    def add_path(self) -> None:
        """Create the next store path with references to earlier ones."""
        refs = self.rng.sample(self.paths, min(len(self.paths), self.rng.randint(0, 6)))
        if self.rng.random() < SINGLE_FILE_SHARE:
            name = self.store_name(self.rng.choice(NAMES) + self.rng.choice(("-script", ".patch", ".conf")))
            self.write_file(self.store / name, int(self.lognormal(1500, 1.2)), self.rng.random() < 0.5)
        else:
            kind = self.rng.choices(KINDS, weights=[k.weight for k in KINDS])[0]
            name = self.store_name(self.rng.choice(NAMES))
            (self.store / name).mkdir()
            self.populate(self.store / name, kind, refs)
            if self.rng.random() < 0.5:
                refs.append(name)
        self.paths.append(name)
        self.refs[name] = refs

    def add_toplevel(self) -> str:
        """The system path: scripts, links into the closure, and references to every unreferenced path."""
        referenced = {r for refs in self.refs.values() for r in refs}
        roots = [p for p in self.paths if p not in referenced]
        name = self.store_name("nixos-system-bench-25.11", versioned=False)
        top = self.store / name
        top.mkdir()
        for script in ("init", "activate", "dry-activation"):
            self.write_file(top / script, int(self.lognormal(6000, 0.5)), True)
        (top / "nixos-version").write_text("25.11.bench\n")
        os.chmod(top / "nixos-version", 0o444)
        for link in ("kernel", "initrd", "sw", "etc", "firmware", "systemd", "kernel-modules"):
            os.symlink(f"{LOGICAL_STORE}/{self.rng.choice(self.paths)}", top / link)
        self.paths.append(name)
        self.refs[name] = roots
        return name


def _canonicalise(store: Path) -> None:
    """Give directories mode 0555 and every object mtime 1, as Nix does, bottom-up."""
    for dirpath, dirnames, filenames in os.walk(store, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            if name in dirnames and not os.path.islink(p):
                os.chmod(p, 0o555)
            os.utime(p, (1, 1), follow_symlinks=False)
        if dirpath != str(store):
            os.chmod(dirpath, 0o555)
            os.utime(dirpath, (1, 1))


def tree_counts(store: Path) -> dict[str, int]:
    """Count what the tree holds, by lstat: files, dirs, symlinks, hard links, executables and bytes."""
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "executables": 0, "empty_files": 0, "large_files": 0,
              "hardlinked_inodes": 0, "extra_links": 0, "inodes": 0, "apparent_bytes": 0, "file_bytes": 0,
              "du_bytes": 0}
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode):
                counts["dirs"] += 1
            elif stat.S_ISLNK(st.st_mode):
                counts["symlinks"] += 1
            else:
                counts["files"] += 1
            if st.st_ino in seen:
                counts["extra_links"] += 1
                continue
            seen.add(st.st_ino)
            counts["inodes"] += 1
            counts["apparent_bytes"] += st.st_size
            counts["du_bytes"] += st.st_blocks * 512
            if stat.S_ISREG(st.st_mode):
                counts["executables"] += bool(st.st_mode & 0o100)
                counts["empty_files"] += st.st_size == 0
                counts["hardlinked_inodes"] += st.st_nlink > 1
                counts["large_files"] += st.st_size >= MiB
                counts["file_bytes"] += st.st_size
    return counts


def _write_closure_info(directory: Path, store_dir: str, names: list[str], refs: dict[str, list[str]],
                        nar: dict[str, tuple[str, int]]) -> None:
    """Write store-paths, registration and total-nar-size as pkgs.closureInfo does, for one store dir."""
    directory.mkdir()
    ordered = sorted(names)
    (directory / "store-paths").write_text("".join(f"{store_dir}/{n}\n" for n in ordered))
    lines: list[str] = []
    for n in ordered:
        nar_hash, nar_size = nar[n]
        lines += [f"{store_dir}/{n}", nar_hash, str(nar_size), "", str(len(refs[n]))]
        lines += [f"{store_dir}/{r}" for r in sorted(refs[n])]
    (directory / "registration").write_text("\n".join(lines) + "\n")
    (directory / "total-nar-size").write_text(f"{sum(s for _, s in nar.values())}\n")


def generate(directory: Path, target: int, seed: int) -> Closure:
    """Write a fresh closure of about `target` bytes of distinct file data into `directory` (must not exist)."""
    store = directory / "root/nix/store"
    store.mkdir(parents=True)
    gen = _Generator(store, target, seed)
    while gen.written < target:
        gen.add_path()
    toplevel = gen.add_toplevel()
    _canonicalise(store)
    nar = {name: nar_hash_size(store / name) for name in gen.paths}
    _write_closure_info(directory / "closure-info", str(store), gen.paths, gen.refs, nar)
    _write_closure_info(directory / "closure-info-nix", LOGICAL_STORE, gen.paths, gen.refs, nar)
    manifest: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "target_bytes": target,
        "toplevel": toplevel,
        "store_paths": len(gen.paths),
        "counts": tree_counts(store),
        "total_nar_size": sum(s for _, s in nar.values()),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Closure(directory, manifest)


def _remove(path: Path) -> None:
    """Delete a tree even where Nix-style read-only directories would stop an unprivileged user."""
    os.chmod(path, 0o755)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path)


def remove_tree(path: Path) -> None:
    """Delete a generated or copied tree (read-only directories included) if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        _remove(path)


def generate_dirs(directory: Path, per_dir: int, dirs: int) -> Closure:
    """A closure of one store path holding `dirs` directories of `per_dir` empty files (bench --closure
    dirs-one: one directory of 20000; dirs-spread: 100 of 200): what populating a big directory costs."""
    store = directory / "root/nix/store"
    store.mkdir(parents=True)
    name = f"{'0' * 32}-dirs-{dirs}x{per_dir}"
    for d in range(dirs):
        where = store / name / "share" / f"d{d:03d}"
        where.mkdir(parents=True)
        for i in range(per_dir):
            (where / f"{d * per_dir + i:08d}-an-entry-name-of-typical-length.txt").write_bytes(b"")
    _canonicalise(store)
    nar = {name: nar_hash_size(store / name)}
    _write_closure_info(directory / "closure-info", str(store), [name], {name: []}, nar)
    _write_closure_info(directory / "closure-info-nix", LOGICAL_STORE, [name], {name: []}, nar)
    manifest: dict[str, Any] = {"generator": f"dirs {dirs}x{per_dir}", "toplevel": name, "store_paths": 1,
                                "counts": tree_counts(store), "total_nar_size": nar[name][1]}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Closure(directory, manifest)


# dirs-one / dirs-spread: the same 20000 entries in one directory and in 100 of 200 (--sizes is ignored).
DIRS_SHAPES = {"dirs-one": (20000, 1), "dirs-spread": (200, 100)}
CLOSURE_KINDS = ("synthetic", "debian", *DIRS_SHAPES)


def ensure_closure(work: Path, target: int, seed: int, label: str, kind: str = "synthetic") -> Closure:
    """The cached closure for (target, seed) or of this machine's files (kind "debian", bench.debian_closure),
    generated once under work/closures."""
    from .debian_closure import GENERATOR_VERSION as DEBIAN_VERSION
    from .debian_closure import generate_debian

    name = (f"{label}-seed{seed}-v{GENERATOR_VERSION}" if kind == "synthetic" else f"{kind}-v1" if kind in DIRS_SHAPES
            else f"{label}-debian-v{DEBIAN_VERSION}")
    directory = work / "closures" / name
    manifest_file = directory / "manifest.json"
    if manifest_file.exists():
        return Closure(directory, json.loads(manifest_file.read_text()))
    partial = directory.with_name(directory.name + ".partial")
    remove_tree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if kind == "synthetic":
        generate(partial, target, seed)
    elif kind in DIRS_SHAPES:
        generate_dirs(partial, *DIRS_SHAPES[kind])
    else:
        generate_debian(partial, target)
    remove_tree(directory)
    partial.rename(directory)
    # closure-info holds absolute host paths: regenerate it for the final location.
    for info in ("closure-info", "closure-info-nix"):
        _rewrite_prefix(directory / info, str(partial), str(directory))
    return Closure(directory, json.loads(manifest_file.read_text()))


def _rewrite_prefix(info: Path, old: str, new: str) -> None:
    """Replace a directory prefix in closureInfo files after the closure moved."""
    for name in ("store-paths", "registration"):
        f = info / name
        f.write_text(f.read_text().replace(old + "/", new + "/"))
