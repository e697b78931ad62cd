"""The image's Nix store side: closureInfo parsing, the Nix database, profiles and what nixos-install leaves."""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..inputfile import open_regular, read_at_most
from ..spec import Spec
from .measure import store_file_problem

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_BYTES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}

# Nix's local store schema, version 10 (src/libstore/schema.sql), as every Nix since 2.0 writes it.
DB_SCHEMA = """
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""


@dataclass(frozen=True)
class Registration:
    """One store path as closureInfo's registration file lists it."""

    path: str
    nar_hash: str
    nar_size: int
    deriver: str
    references: tuple[str, ...]


# Nix's base-32 digits mapped to int()'s base-32 digits; Nix writes the most significant digit first
# (of the digest read as a little-endian number), so the whole conversion is int(..., 32) and back.
_TO_INT32 = str.maketrans(NIX32_ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_FROM_INT32 = {i: c for i, c in enumerate(NIX32_ALPHABET)}


def nix32(digest: bytes) -> str:
    """Encode a digest in Nix's base-32, as nix-store, closureInfo and fetchTarball's sha256 print it."""
    length = (len(digest) * 8 - 1) // 5 + 1
    value = int.from_bytes(digest, "little")
    return "".join(_FROM_INT32[(value >> (5 * n)) & 0x1F] for n in range(length - 1, -1, -1))


def nix32_to_hex(text: str) -> str:
    """Decode Nix's base-32 hash encoding into lowercase hex (bits beyond the digest's length dropped)."""
    if not text or text.strip(NIX32_ALPHABET):
        raise ValueError(f"not a Nix base-32 string: {text!r}")
    length = len(text) * 5 // 8
    value = int(text.translate(_TO_INT32), 32) & ((1 << (8 * length)) - 1)
    return value.to_bytes(length, "little").hex()


def db_hash(nar_hash: str) -> str:
    """The narHash as Nix stores it in the database: '<algo>:<base16>'."""
    algo, sep, digest = nar_hash.partition(":")
    if not sep:  # nix-store --dump-db writes bare base-16 SHA-256
        algo, digest = "sha256", nar_hash
    if algo not in HASH_BYTES:
        raise ValueError(f"unsupported hash {nar_hash!r}")
    n = HASH_BYTES[algo]
    if len(digest) == 2 * n:
        return f"{algo}:{digest.lower()}"
    if len(digest) == (n * 8 - 1) // 5 + 1:
        return f"{algo}:{nix32_to_hex(digest)}"
    raise ValueError(f"hash {nar_hash!r} has an unexpected length")


# A store path's last component: 32 Nix base-32 digits, "-", a name of at most 211 characters that Nix allows
# (src/libstore/path.cc: letters, digits, "+-._?=", not starting with ".").
STORE_PATH_NAME = re.compile(r"[" + NIX32_ALPHABET + r"]{32}-[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}")
# narSize and the reference count: plain decimal digits (int() would also take " 5", "+5", "1_0" or "-5").
_COUNT = re.compile(r"[0-9]{1,19}")
MAX_NAR_SIZE = 2**63 - 1  # SQLite's integer
# The registration of 100 000 store paths with 20 references each is about 140 MB: a bound no closure meets,
# so that a registration that is /dev/zero cannot take all memory.
MAX_REGISTRATION_BYTES = 512 << 20


def store_path_problem(path: str, store_dir: str) -> str | None:
    """Why path is not a store path (a direct child of store_dir with a valid hash and name), or None."""
    prefix = store_dir + "/"
    if path.startswith(prefix) and STORE_PATH_NAME.fullmatch(path[len(prefix):]):
        return None
    return (f"{path!r} is not a store path (a direct child of {store_dir} named <32 Nix base-32 characters>-<name>, "
            "the name of letters, digits and +-._?=, not starting with '.')")


def parse_registration(text: str, source: str, store_dir: str) -> list[Registration]:
    """Parse nix-store --load-db input (closureInfo's registration); every entry is checked, by index and line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    regs: list[Registration] = []
    seen: set[str] = set()
    i = 0

    def refuse(why: str) -> UserError:
        return UserError(f"system.closureInfo: registration[{len(regs)}] (line {i + 1} of {source!r}): {why}")

    while i < len(lines):
        if len(lines) < i + 5:
            raise refuse("truncated entry (a path, its hash, narSize, deriver and reference count)")
        path, nar_hash, nar_size, deriver, count = lines[i:i + 5]
        why = store_path_problem(path, store_dir)
        if why:
            raise refuse(why)
        if path in seen:
            raise refuse(f"{path!r} is registered twice")
        if not _COUNT.fullmatch(nar_size) or int(nar_size) > MAX_NAR_SIZE:
            raise refuse(f"narSize {nar_size!r} is not allowed (a number of bytes, 0 to {MAX_NAR_SIZE})")
        if deriver and store_path_problem(deriver, store_dir):
            raise refuse(f"deriver {deriver!r} is neither empty nor a store path")
        if not _COUNT.fullmatch(count):
            raise refuse(f"reference count {count!r} is not a number")
        try:
            db_hash(nar_hash)
        except ValueError as exc:
            raise refuse(str(exc)) from None
        refs = tuple(lines[i + 5:i + 5 + int(count)])
        if len(refs) != int(count):
            raise refuse(f"truncated reference list ({len(refs)} of {count} references)")
        seen.add(path)
        regs.append(Registration(path, nar_hash, int(nar_size), deriver, refs))
        i += 5 + len(refs)
    return regs


def read_closure(spec: Spec) -> list[Registration]:
    """Read closureInfo's registration and check it covers the system, channel and additionalPaths."""
    info = Path(spec.closure_info)
    reg_file = info / "registration"
    try:
        with open_regular(reg_file) as f:
            data = read_at_most(f, MAX_REGISTRATION_BYTES)
        if len(data) > MAX_REGISTRATION_BYTES:
            raise UserError(f"system.closureInfo: {str(reg_file)!r} is larger than {MAX_REGISTRATION_BYTES} bytes "
                            "(not a closureInfo registration)")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"system.closureInfo: cannot read {str(reg_file)!r}: {exc}") from None
    regs = parse_registration(text, str(reg_file), spec.store_dir)
    paths = {r.path for r in regs}
    for r in regs:
        missing = [ref for ref in r.references if ref not in paths]
        if missing:
            raise UserError(f"system.closureInfo: the closure is not closed: {r.path} references {missing[0]!r}")
    wanted = [("system.toplevel", spec.toplevel)]
    if spec.channel:
        wanted.append(("system.channel", spec.channel))
    wanted += [(f"system.additionalPaths[{i}]", p) for i, p in enumerate(spec.additional_paths)]
    for field, path in wanted:
        if path not in paths:
            raise UserError(f"{field}: {path!r} is not in closureInfo's registration (the closure must include it)")
    if not os.path.isdir(spec.store_dir):
        raise UserError(f"system.storeDir: {spec.store_dir!r} is not a directory on this machine, so the closure "
                        "cannot be read from it (a host that has never run a Nix build has no /nix/store): build "
                        "where the closure is, or give the storeDir that holds it")
    for r in regs:
        try:
            mode = os.lstat(r.path).st_mode
        except FileNotFoundError:
            raise UserError(f"system.closureInfo: store path {r.path!r} does not exist on this machine") from None
        except OSError as exc:
            raise UserError(f"system.closureInfo: store path {r.path!r}: {exc.strerror}") from None
        why = store_file_problem(r.path, mode)  # the rest of each path is checked as it is measured
        if why:
            raise UserError(f"system.closureInfo: {why}")
    return sorted(regs, key=lambda r: r.path)


def write_db(root: Path, regs: list[Registration], registration_time: int) -> None:
    """Write the image's Nix database registering exactly the closure, in path order with a fixed time."""
    db_dir = root / "nix/var/nix/db"
    db_dir.mkdir(parents=True, exist_ok=True)
    db_file = db_dir / "db.sqlite"
    if db_file.exists():
        db_file.unlink()
    con = sqlite3.connect(db_file)
    try:
        # No fsync and no journal file: a build that fails midway discards the whole tree anyway. The file's
        # bytes after the vacuum are the same (the header records neither setting).
        con.execute("pragma synchronous = off")
        con.execute("pragma journal_mode = memory")
        con.executescript(DB_SCHEMA)
        ids: dict[str, int] = {}
        for r in regs:
            cur = con.execute(
                "insert into ValidPaths (path, hash, registrationTime, deriver, narSize) values (?, ?, ?, ?, ?)",
                (r.path, db_hash(r.nar_hash), registration_time, r.deriver or None, r.nar_size),
            )
            assert cur.lastrowid is not None
            ids[r.path] = cur.lastrowid
        for r in regs:
            for ref in sorted(set(r.references)):
                con.execute("insert into Refs (referrer, reference) values (?, ?)", (ids[r.path], ids[ref]))
        con.commit()
        con.execute("vacuum")
    finally:
        con.close()
    (db_dir / "schema").write_text("10")
    (db_dir / "big-lock").touch()
    for f in ("db.sqlite", "schema"):
        os.chmod(db_dir / f, 0o644)
    os.chmod(db_dir / "big-lock", 0o600)


def _link(target: str, path: Path) -> None:
    """Create a symlink path -> target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def write_nix_state(spec: Spec, root: Path, regs: list[Registration]) -> None:
    """What nixos-install --no-bootloader --no-root-passwd leaves: DB, profiles, channel links, /etc/NIXOS."""
    var = root / "nix/var/nix"
    for d in ("gcroots", "profiles/per-user/root", "temproots", "userpool", "db"):
        (var / d).mkdir(parents=True, exist_ok=True)
    _link("/nix/var/nix/profiles", var / "gcroots/profiles")
    write_db(root, regs, spec.source_date_epoch)
    _link(spec.toplevel, var / "profiles/system-1-link")
    _link("system-1-link", var / "profiles/system")
    if spec.channel:
        _link(spec.channel, var / "profiles/per-user/root/channels-1-link")
        _link("channels-1-link", var / "profiles/per-user/root/channels")
        defexpr = root / "root/.nix-defexpr"
        defexpr.mkdir(parents=True, exist_ok=True)
        os.chmod(defexpr, 0o700)
        _link("/nix/var/nix/profiles/per-user/root/channels", defexpr / "channels")
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    os.chmod(etc, 0o755)
    (etc / "NIXOS").touch()
    os.chmod(etc / "NIXOS", 0o644)
