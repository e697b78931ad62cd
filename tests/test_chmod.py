"""contents' `mode` is an rsync --chmod string, judged against the real rsync (DESIGN §5a).

nixpkgs copies each entry with `rsync -a --no-o --no-g --chmod=MODE`. Checked here: the builder's parser
(builder/chmod.py) takes exactly the strings rsync takes and computes the modes rsync gives; the Nix
argument check, the JSON Schema and the spec loader give rsync's verdict on every string; and an image
built with `python -m builder prepare`, as root and as nobody, holds per file and directory the mode real
rsync gives when run as nixpkgs runs it (read back with debugfs; both builds are the same bytes).
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from builder import chmod
from builder.errors import SpecError
from builder.spec import SCHEMA_PATH, load_spec_document
from tests.fixtures.system import fixture_system_spec
from tests.support.digest import sha256
from tests.support.fscheck import checker, extract, owners_and_modes
from tests.support.imagecheck import e2fsck_clean
from tests.support.specs import spec_doc

REPO = Path(__file__).resolve().parent.parent
NIX_UMASK = 0o022  # the umask Nix gives builders, under which nixpkgs' rsync runs

# The calls real users make, each rule of the grammar, and the corners of rsync's parser.
VALID = [
    "0644", "755", "u+x", "a=r,u+w", "D755,F644", "go-w", "Da+X", "a-x,u+X", "u=rwX,go=rX", "=", "o=",
    "Du+rwx,Fgo-w", "0", "7777", "00000644", "DD755", "uD+x", "ugo=rwx", "+", "D-", "-w", "+w", "=rx", "+X",
    "g=u", "u-g", "o+u", "+s", "a+s", "o+s", "+ts", "+st", "a=s", "Dg+s,Fu+s", "a+t", "u=rwx,g=rx,o=",
]
INVALID = [
    "",  # empty
    "u",  # no operator
    "rwx",  # bits without an operator
    "a+q",  # not a permission letter
    "DF+x",  # both D and F
    "FDu+x",
    "u755",  # octal after a class
    "8",  # not an octal digit
    "0648",
    "10000",  # octal above 07777
    "u+x,",  # empty clause
    ",u+x",
    "u+x,,g+w",
    "u+x-w",  # a second operator
    "u+gx",  # a copied class with bits
    "u+gg",
    "g=uo",
    "0644\n",  # trailing newline
    " 0644",
    "u+X ",
    "+1",
    "0u",
    "0o644",
    "644,",
]


def rsync_argv(mode: str | None) -> list[str]:
    """The flags nixpkgs' make-disk-image.nix passes rsync for a contents entry."""
    return ["rsync", "-a", "--no-o", "--no-g", *([f"--chmod={mode}"] if mode is not None else [])]


def make_tree(base: Path, owner: tuple[int, int] | None = None) -> dict[str, Path]:
    """Sources of varied modes: a tree (0700/0555/setgid/sticky dirs, setuid files, a symlink), a file, a glob set.

    The glob set's *.conf matches a file, an executable and a directory, and leaves a non-match.
    """
    tree, glob_dir, tool = base / "tree", base / "globsrc", base / "tool"
    modes: dict[Path, int] = {tree: 0o750, glob_dir: 0o755, tool: 0o750}
    files = {"f644": 0o644, "f600": 0o600, "x755": 0o755, "x700": 0o700, "r444": 0o444, "gx610": 0o610,
             "suid": 0o4755, "sticky": 0o1644}
    dirs = {"d700": 0o700, "d555": 0o555, "dsgid": 0o2755, "dsticky": 0o1777, "d700/deep": 0o711}
    for d in (tree, glob_dir, glob_dir / "c.conf"):
        d.mkdir(parents=True)
    for name, mode in dirs.items():
        (tree / name).mkdir()
        modes[tree / name] = mode
        (tree / name / "i.txt").write_text(name)
        modes[tree / name / "i.txt"] = 0o640
    for name, mode in files.items():
        (tree / name).write_text(name)
        modes[tree / name] = mode
    (tree / "link").symlink_to("f644")
    tool.write_text("#!/bin/sh\n")
    for name, mode in {"a.conf": 0o644, "b.conf": 0o755, "skip.txt": 0o644, "c.conf/inner": 0o600}.items():
        (glob_dir / name).write_text(name)
        modes[glob_dir / name] = mode
    modes[glob_dir / "c.conf"] = 0o700
    for path in [base, *sorted(modes, key=lambda p: -len(p.parts))]:
        if owner is not None:
            os.lchown(path, *owner)
        if path in modes:
            os.chmod(path, modes[path])
    os.lchown(tree / "link", *(owner or (0, 0)))
    return {"tree": tree, "tool": tool, "glob": glob_dir}


def tree_modes(root: Path) -> dict[str, int]:
    """Every entry below root (root excluded) as relative path -> st_mode, read with lstat."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mode
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """make_tree in a private directory (root reads it)."""
    return make_tree(tmp_path_factory.mktemp("chmod-src"))


def rsync_copy(mode: str, src: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    """rsync a directory's contents (trailing slash) into dest, as nixpkgs does for a directory source."""
    return subprocess.run([*rsync_argv(mode), f"{src}/", str(dest)], capture_output=True, text=True,
                          umask=NIX_UMASK)


def generated_modes(count: int, seed: int) -> list[str]:
    """Random strings from the grammar's pieces, valid and not, for the comparison with rsync."""
    rng = random.Random(seed)
    pieces = ["D", "F", "u", "g", "o", "a", "+", "-", "=", "r", "w", "x", "X", "s", "t", "0", "7", "5", "8", ","]
    out = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(count)]
    for _ in range(count):
        clauses = []
        for _ in range(rng.randint(1, 3)):
            head = rng.choice(["", "D", "F"])
            if rng.random() < 0.3:
                clauses.append(head + "".join(rng.choice("01234567") for _ in range(rng.randint(1, 5))))
            else:
                tail = "".join(rng.sample("rwxXst", rng.randint(0, 3))) if rng.random() < 0.8 else rng.choice("ugo")
                clauses.append(head + "".join(rng.sample("ugoa", rng.randint(0, 2))) + rng.choice("+-=") + tail)
        out.append(",".join(clauses))
    return out


def test_parser_and_regex_match_rsync(sources: dict[str, Path], tmp_path: Path) -> None:
    """Every string: rsync's verdict = the parser's = MODE_REGEX's; every mode rsync gives = ChmodRules.apply.

    VALID and INVALID are checked to be rsync's own verdicts, so the Nix test below can use them as such.
    """
    source_modes = tree_modes(sources["tree"])
    source_modes["."] = os.lstat(sources["tree"]).st_mode
    regex = re.compile(chmod.MODE_REGEX)
    problems = []
    for i, mode in enumerate([*VALID, *INVALID, *generated_modes(60, 1)]):
        dest = tmp_path / f"d{i}"
        res = rsync_copy(mode, sources["tree"], dest)
        if res.returncode != 0:
            assert "Invalid argument passed to --chmod" in res.stderr, res.stderr
        try:
            rules: chmod.ChmodRules | None = chmod.parse(mode)
        except chmod.ChmodError as exc:
            assert "rsync --chmod string" in str(exc)
            rules = None
        if (mode in VALID and res.returncode != 0) or (mode in INVALID and res.returncode == 0):
            problems.append(f"{mode!r} is in the wrong table: rsync exits {res.returncode}")
        verdicts = (res.returncode == 0, rules is not None, regex.fullmatch(mode) is not None)
        if len(set(verdicts)) != 1:
            problems.append(f"{mode!r}: rsync, parser, regex accept: {verdicts}")
            continue
        if rules is None:
            continue
        got = {**tree_modes(dest), ".": os.lstat(dest).st_mode}
        for path, src_mode in source_modes.items():
            want = src_mode if stat.S_ISLNK(src_mode) else rules.apply(src_mode)
            if got[path] != want:
                problems.append(f"{mode!r} {path}: rsync {got[path]:o}, builder {want:o}")
    assert VALID and INVALID and problems == []


def nix_verdicts(modes: list[str]) -> list[bool]:
    """Whether nix/args's normalize accepts each mode in a contents entry (one nix-instantiate run)."""
    expr = f"""
let
  A = import {REPO}/nix/args;
  entry = m: {{ source = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-pkg"; target = "/t"; mode = m; }};
  args = m: {{ pkgs = {{ }}; lib = {{ }}; config = {{ }}; contents = [ (entry m) ]; }};
  ok = m: (builtins.tryEval (builtins.deepSeq (A.normalize {{ args = args m; }}) true)).success;
in map ok (builtins.fromJSON {json.dumps(json.dumps(modes))})"""
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--option", "substituters", "",
                           "--expr", expr], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: list[bool] = json.loads(done.stdout)
    return result


@pytest.mark.nix
def test_nix_schema_and_loader_agree_with_rsync(fixture_spec: Path) -> None:
    """One table through nix-instantiate (nix/args), the JSON Schema and the spec loader: rsync's verdicts."""
    modes = [*VALID, *INVALID]
    base = spec_doc(fixture_spec)
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    rows = []
    for mode, nix_ok in zip(modes, nix_verdicts(modes), strict=True):
        doc = {**base, "contents": [{**base["contents"][0], "mode": mode}]}
        try:
            load_spec_document(doc)
            loader_ok = True
        except SpecError as exc:
            assert "$.contents[0].mode" in str(exc) and "rsync --chmod string" in str(exc), str(exc)
            loader_ok = False
        rows.append((mode, nix_ok, validator.is_valid(doc), loader_ok, mode in VALID))
    assert [r for r in rows if len(set(r[1:])) != 1] == []


@pytest.mark.nix
def test_nix_message_says_what_is_allowed() -> None:
    expr = (f'(import {REPO}/nix/args).normalize {{ args = {{ pkgs = {{ }}; lib = {{ }}; config = {{ }}; '
            'contents = [ { source = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-pkg"; target = "/t"; '
            'mode = "u+q"; } ]; }; }')
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--option", "substituters", "", "--expr", expr],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert 'contents[0].mode = "u+q"' in done.stderr
    assert 'an rsync --chmod string such as "0644", "u+x"' in done.stderr


def test_schema_pattern_is_the_parsers_language() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$defs"]["rsyncChmod"]["pattern"] == rf"^(?:{chmod.MODE_REGEX})(?![\s\S])"
    # nix/args builds its mode pattern from the same rules.json clause.
    rules = json.loads((REPO / "builder" / "rules.json").read_text())
    assert rules["patterns"]["chmodClause"] == chmod.CLAUSE_REGEX
    checks = (REPO / "nix" / "args" / "checks.nix").read_text()
    assert 'modeRegex = "${pattern.chmodClause}(,${pattern.chmodClause})*";' in checks


# -- images: the builder's modes against real rsync run as nixpkgs runs it ---------------------------------

IMAGE_MODES: list[str | None] = [
    None, "0644", "755", "u+x", "a=r,u+w", "D755,F644", "go-w", "Da+X", "a-x,u+X", "u=rwX,go=rX", "=", "o=",
    "Du+rwx,Fgo-w", "0", "g=u", "a+s,+t", "Dg+s,Fu+s",
]

# nixpkgs' make-disk-image.nix contents loop (current master), run by bash with the real rsync.
NIXPKGS_LOOP = r"""
set -eu
umask 022
root=$1
shift
while [ $# -gt 0 ]; do
  source=$1 target=$2 mode=$3
  shift 3
  if [ -n "$mode" ]; then
    rsync_chmod_flags="--chmod=$mode"
  else
    rsync_chmod_flags=""
  fi
  rsync_flags="-a --no-o --no-g $rsync_chmod_flags"
  if [[ "$source" =~ '*' ]]; then
    mkdir -p $root/$target
    for fn in $source; do
      rsync $rsync_flags "$fn" $root/$target/
    done
  else
    mkdir -p $root/$(dirname $target)
    if [ -e $root/$target ]; then
      echo "duplicate entry $target -> $source"
      exit 1
    elif [ -d $source ]; then
      rsync $rsync_flags $source/ $root/$target
    else
      rsync $rsync_flags $source $root/$target
    fi
  fi
done
"""


def image_modes(image: Path, paths: list[str]) -> dict[str, int]:
    """st_mode (type and permission bits) of each path in the ext4 image, from `debugfs -R "stat PATH"`."""
    out = {}
    for path in paths:
        res = subprocess.run(["debugfs", "-R", f'stat "{path}"', str(image)], capture_output=True, text=True)
        m = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", res.stdout)
        assert m is not None, f"{path}: {res.stderr}"
        kind = {"regular": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK}[m.group(1)]
        out[path] = kind | int(m.group(2), 8)
    return out


@dataclass(frozen=True)
class Shared:
    """A world-readable directory outside pytest's private tree: sources owned by nobody, specs, images."""

    root: Path
    sources: dict[str, Path]

    def contents(self, modes: list[str | None]) -> list[dict[str, Any]]:
        """Three entries per mode: the tree (directory source), the tool (file source), the glob set."""
        out = []
        for i, mode in enumerate(modes):
            for kind, source in (("tree", str(self.sources["tree"])), ("tool", str(self.sources["tool"])),
                                 ("glob", f"{self.sources['glob']}/*.conf")):
                out.append({"source": source, "target": f"/m{i}/{kind}", "mode": mode, "user": None, "group": None})
        return out

    def reference(self, contents: list[dict[str, Any]], name: str) -> dict[str, int]:
        """Run nixpkgs' loop with the real rsync into a fresh root; the st_mode of everything it made."""
        root = self.root / name
        root.mkdir()
        args = [str(x) for c in contents for x in (c["source"], c["target"], c["mode"] or "")]
        res = subprocess.run(["bash", "-c", NIXPKGS_LOOP, "nixpkgs-loop", str(root), *args],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return {"/" + p: m for p, m in tree_modes(root).items()}

    def spec(self, base: dict[str, Any], name: str, contents: list[dict[str, Any]], **overrides: Any) -> Path:
        """base with these contents and overrides, its closure-info copied here: a spec nobody can build."""
        info = self.root / f"{name}-closure-info"
        shutil.copytree(base["system"]["closureInfo"], info)
        for dirpath, _, filenames in os.walk(info):
            os.chmod(dirpath, 0o755)
            for file in filenames:
                os.chmod(os.path.join(dirpath, file), 0o644)
        doc = {**base, "contents": contents, "system": {**base["system"], "closureInfo": str(info)}, **overrides}
        spec = self.root / f"{name}.json"
        spec.write_text(json.dumps(doc))
        os.chmod(spec, 0o644)
        return spec


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    """The Shared directory for this module, removed afterwards (modes opened first: some entries are 0000)."""
    root = Path("/tmp") / f"mdi-chmod-{os.getpid()}"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    nobody = pwd.getpwnam("nobody")
    try:
        yield Shared(root, make_tree(root / "src", (nobody.pw_uid, nobody.pw_gid)))
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], capture_output=True)
        shutil.rmtree(root)


def prepare(spec: Path, image: Path, user: str | None, env: dict[str, str] | None = None) -> None:
    """`python -m builder prepare` as root or as another user."""
    argv = [sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def ext4_case(shared: Shared, fixture_spec: Path) -> tuple[Path, Path, dict[str, int]]:
    """(spec, image prepared as root, rsync's modes) for IMAGE_MODES in an ext4 without partition table."""
    contents = shared.contents(IMAGE_MODES)
    spec = shared.spec(spec_doc(fixture_spec), "ext4", contents, partitionTableType="none", additionalSpace="1M")
    image = shared.root / "ext4-root.img"
    prepare(spec, image, None)
    return spec, image, shared.reference(contents, "ext4-rsync")


def test_image_modes_are_rsyncs(ext4_case: tuple[Path, Path, dict[str, int]]) -> None:
    """Every file and directory of every entry (and the parents made for them) has the mode rsync gave it."""
    _, image, want = ext4_case
    assert len(want) > 300
    assert image_modes(image, sorted(want)) == want
    assert e2fsck_clean(image, 0).returncode == 0


@pytest.mark.parametrize("env", [{}, {"MDI_STAGE_STORE": "copy"}], ids=["namespace", "no-namespace"])
def test_nobody_builds_the_same_image(shared: Shared, ext4_case: tuple[Path, Path, dict[str, int]],
                                      env: dict[str, str]) -> None:
    """As nobody (no root to open a 0644 directory or read a 0000 file), with mkfs in a user namespace or not."""
    spec, root_image, _ = ext4_case
    image = shared.root / f"ext4-nobody-{len(env)}.img"
    prepare(spec, image, "nobody", env)
    assert os.stat(image).st_uid != 0
    assert sha256(image) == sha256(root_image)


# Modes the build user could not read or write through, set-id and sticky bits, X: for btrfs and xfs.
FS_MODES: list[str | None] = [None, "=", "D644,F0", "a+s,+t", "Dg+s,Fu+s", "a-x,u+X", "go-w"]


@pytest.mark.slow
@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_btrfs_and_xfs_modes_are_rsyncs(fs: str, shared: Shared, fixture_spec: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The modes reach btrfs (sorted copy in a namespace, fakeroot state without) and xfs (protofile).

    Built as root, as nobody, and as nobody without user namespaces (btrfs then takes inode numbers from
    the build's filesystem, so only the first two are compared byte for byte).
    """
    if fs == "xfs":  # the fixture system: its store names have no whitespace, which xfs protofiles cannot name
        base = spec_doc(fixture_system_spec(tmp_path_factory.mktemp("xfs-system"), "efi", fsType="xfs",
                                            installBootLoader=False))
    else:
        base = {**spec_doc(fixture_spec), "fsType": "btrfs"}
    contents = shared.contents(FS_MODES)
    # A UUID of its own: the kernel refuses to mount a second xfs with the UUID of one mounted (other tests).
    spec = shared.spec(base, fs, contents, partitionTableType="none", rootFSUID="6d64692d-6368-6d6f-642d-746573747321")
    want = {p: stat.S_IMODE(m) for p, m in shared.reference(contents, f"{fs}-rsync").items()}
    images = []
    for user, env in ((None, {}), ("nobody", {}), ("nobody", {"MDI_STAGE_STORE": "copy"})):
        image = shared.root / f"{fs}-{user}-{len(env)}.img"
        prepare(spec, image, user, env)
        assert checker(fs, image).returncode == 0
        got = owners_and_modes(extract(fs, image, tmp_path_factory.mktemp(f"{fs}-extract")))
        assert {p: got[p][2] for p in want} == want, (user, env)
        images.append(image)
    assert sha256(images[0]) == sha256(images[1])
