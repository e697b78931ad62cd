"""Hostile names: contents sources and targets land exactly as named or are refused clearly; none runs as code.

The image is built by `python -m builder build` (cwd: a private directory, so a relative `touch` from an
injected command would leave a canary file there) and read back with debugfs (`rdump` of the whole
root as root keeps names byte for byte, owners and modes). The in-VM finalize script is rendered with
`finalize --print` from a spec full of hostile values, checked with `bash -n`, and then executed with a
PATH holding only logging stubs: every command it would run records its exact argv instead of acting.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.imagecheck import e2fsck_clean, extract_root, part_offset
from tests.support.specs import SpecFactory, spec_doc

REPO = Path(__file__).resolve().parent.parent
CANARIES = ("canary-dollar", "canary-tick", "canary-semi", "canary-pipe", "canary-and", "canary-grub",
            "canary-device", "canary-config", "canary-out", "canary-label")

# Target base names under /srv/ (each also names its source file, so sources are hostile too).
HOSTILE = [
    "with space",
    "quote'single",
    'quote"double',
    "$(touch canary-dollar)",
    "`touch canary-tick`",
    "x; touch canary-semi",
    "x | touch canary-pipe",
    "x && touch canary-and",
    "new\nline",
    "tab\there",
    "-rf",
    "--help",
    "star*name",
    "back\\slash",
    "percent%s%n",
    "L" * 255,
]
DEEP = "/srv/deep/" + "/".join(["d" * 250] * 15) + "/leaf"  # 3,785 bytes: deep but within PATH_MAX
# Names inside a source directory (bytes: not all are UTF-8).
TREE_NAMES = [b"bad\xffbyte", b"\xe9t\xe9-latin1", b"-dash", b"new\nline-in-tree", b"$(touch canary-dollar)"]


def builder(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the builder CLI with cwd as working directory."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env)


def no_canaries(*dirs: Path) -> list[Path]:
    """Canary files an injected command would have created (whole file name equal to a canary)."""
    found = []
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            found += [Path(dirpath) / n for n in dirnames + filenames if n in CANARIES]
    return found


def entry(source: Path, target: str, user: str | None = None, group: str | None = None) -> dict[str, Any]:
    """One contents entry."""
    return {"source": str(source), "target": target, "mode": None, "user": user, "group": group}


@pytest.fixture(scope="module")
def hostile_build(make_spec: SpecFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Build a legacy raw image whose contents are all hostile names; return (private dir, image, root dump)."""
    private = tmp_path_factory.mktemp("hostile")
    src = private / "src"
    src.mkdir()
    contents = []
    for i, name in enumerate(HOSTILE):
        source = src / name.replace("*", "+")  # a `*` in a source means a glob; in a target it is just a name
        source.write_text(f"content {i}\n")
        # A newline cannot be given a numeric owner (debugfs commands are lines): that case is refused, below.
        owner = (None, None) if "\n" in name else ("1234", "5678")
        contents.append(entry(source, f"/srv/{name}", *owner))
    (src / "deep-src").write_text("deep\n")
    contents.append(entry(src / "deep-src", DEEP))
    tree = src / "tree"
    tree.mkdir()
    for i, raw in enumerate(TREE_NAMES):
        with open(os.path.join(os.fsencode(tree), raw), "w") as f:
            f.write(f"tree {i}\n")
    contents.append(entry(tree, "/srv/tree"))
    owned_tree = src / "owned-tree"
    owned_tree.mkdir()
    with open(os.path.join(os.fsencode(owned_tree), b"owned\xffbyte"), "w") as f:
        f.write("owned\n")
    contents.append(entry(owned_tree, "/srv/owned-tree", "4321", "8765"))
    spec = make_spec(partitionTableType="legacy", contents=contents, label="l$(touch x)'\"`")
    cwd = private / "cwd"
    cwd.mkdir()
    out = private / "out"
    res = builder(["build", str(spec), "--out", str(out)], cwd)
    assert res.returncode == 0, res.stderr
    image = out / "fixture.img"
    dump = extract_root(image, part_offset(image, 1), private / "dump")
    return private, image, dump


def test_every_hostile_target_lands_exactly(hostile_build: tuple[Path, Path, Path]) -> None:
    _, _, dump = hostile_build
    srv = dump / "srv"
    expected = {*HOSTILE, "deep", "tree", "owned-tree"}
    assert set(os.listdir(srv)) == expected
    for i, name in enumerate(HOSTILE):
        path = srv / name
        assert path.read_text() == f"content {i}\n", name
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == ((0, 0) if "\n" in name else (1234, 5678)), name
    assert (dump / DEEP.lstrip("/")).read_text() == "deep\n"


def test_tree_names_keep_their_bytes(hostile_build: tuple[Path, Path, Path]) -> None:
    _, _, dump = hostile_build
    tree = os.fsencode(dump / "srv" / "tree")
    assert sorted(os.listdir(tree)) == sorted(TREE_NAMES)
    for i, raw in enumerate(TREE_NAMES):
        with open(os.path.join(tree, raw)) as f:
            assert f.read() == f"tree {i}\n"
    owned = os.path.join(os.fsencode(dump / "srv" / "owned-tree"), b"owned\xffbyte")
    st = os.lstat(owned)
    assert (st.st_uid, st.st_gid) == (4321, 8765)


def test_label_is_data(hostile_build: tuple[Path, Path, Path]) -> None:
    _, image, _ = hostile_build
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", "-O", str(part_offset(image, 1)), str(image)],
                         capture_output=True, text=True, check=True).stdout
    assert out == "l$(touch x)'\"`\n"


def test_hostile_image_passes_e2fsck(hostile_build: tuple[Path, Path, Path]) -> None:
    _, image, _ = hostile_build
    fsck = e2fsck_clean(image, part_offset(image, 1))
    assert fsck.returncode == 0, fsck.stdout


def test_no_canary_anywhere(hostile_build: tuple[Path, Path, Path]) -> None:
    private, _, _ = hostile_build
    assert no_canaries(private, REPO) == []


REFUSED: list[tuple[str, str, list[str]]] = [
    ("component-256-bytes", "/srv/" + "x" * 256, ["$.contents[0].target", "longer than 255 bytes"]),
    ("path-over-4096", "/srv/" + "/".join(["d" * 200] * 21),
     ["$.contents[0].target", "is 4225 characters long (allowed: at most 4096)"]),
    ("dotdot", "/srv/../../etc/passwd", ["$.contents[0].target", "'..'"]),
    ("nul", "/srv/a\u0000b", ["$.contents[0].target"]),
]


@pytest.mark.parametrize(("target", "fragments"), [pytest.param(t, f, id=i) for i, t, f in REFUSED])
def test_unusable_targets_are_refused(target: str, fragments: list[str], make_spec: SpecFactory,
                                      fixture_spec: Path, tmp_path: Path) -> None:
    source = spec_doc(fixture_spec)["contents"][0]["source"]
    spec = make_spec(contents=[entry(Path(source), target)])
    res = builder(["build", str(spec), "--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_path_too_long_to_stage_is_refused(make_spec: SpecFactory, tmp_path: Path) -> None:
    """A target within the schema's 4096 bytes that cannot be created once under the staging root."""
    (tmp_path / "f").write_text("x\n")
    target = "/srv/" + "/".join(["d" * 254] * 16)[:4080]
    res = builder(["build", str(make_spec(contents=[entry(tmp_path / "f", target)])), "--out",
                   str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "contents[0]" in res.stderr and "File name too long" in res.stderr
    assert "Traceback" not in res.stderr


def test_newline_in_tree_with_numeric_owner_is_refused(make_spec: SpecFactory, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "new\nline").write_text("x\n")
    res = builder(["build", str(make_spec(contents=[entry(tree, "/srv/tree", "1", "1")])), "--out",
                   str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "contents[0].target: '/srv/tree/new\\nline' holds a newline" in res.stderr
    assert "Traceback" not in res.stderr


def test_spec_that_is_not_utf8_is_refused(fixture_spec: Path, tmp_path: Path) -> None:
    """Nix writes a non-UTF-8 string into the JSON as raw bytes: refused as a spec problem, not a crash."""
    text = fixture_spec.read_bytes().replace(b'"/plain.txt"', b'"/plain-\xff.txt"')
    spec = tmp_path / "spec.json"
    spec.write_bytes(text)
    res = builder(["build", str(spec), "--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "cannot read spec file" in res.stderr and "utf-8" in res.stderr
    assert "Traceback" not in res.stderr


# ---- the in-VM script ------------------------------------------------------------------------------------

STUBBED = ["mkdir", "ln", "cat", "mount", "umount", "mountpoint", "chroot", "nixos-enter", "cp", "tune2fs", "sed",
           "debugfs", "sync", "dirname", "sleep", "true", "false", "tr", "awk", "dd", "find", "sort", "rm", "touch",
           "mktemp"]


def stub_path(where: Path, log: Path) -> Path:
    """A directory of stubs, one per command, each appending its argv (NUL-separated, one record per line)."""
    where.mkdir()
    for name in STUBBED:
        stub = where / name
        # mktemp answers with a fresh directory under the stubs' own area, so redirections into it work.
        answer = f"d={shlex.quote(str(where))}/tmp.$$; /bin/mkdir -p \"$d\"; echo \"$d\"\n" if name == "mktemp" else ""
        stub.write_text(f"#!/bin/bash\nprintf '%s\\0' {shlex.quote(name)} \"$@\" >> {shlex.quote(str(log))}\n"
                        f"printf '\\n' >> {shlex.quote(str(log))}\n{answer}exit 0\n")
        stub.chmod(0o755)
    return where


def calls(log: Path) -> list[list[str]]:
    """The recorded commands, each as its argv."""
    records = log.read_bytes().split(b"\0\n")
    return [[a.decode() for a in r.split(b"\0")] for r in records if r]


HOSTILE_TARGETS = ["/srv/$(touch canary-dollar)", "/srv/`touch canary-tick`", "/srv/a b; touch canary-semi",
                   "/srv/-rf", "/srv/quote'single\"double", "/srv/new\nline"]
HOSTILE_CONFIG = "/etc/cfg $(touch canary-config) `touch canary-config`.nix"
HOSTILE_GRUB = "/dev/disk/by-id/$(touch canary-grub)`touch canary-grub`"
HOSTILE_DEVICE = "/dev/vd'a$(touch canary-device)"


@pytest.mark.parametrize("enter", ["chroot", "nixos-enter"])
def test_rendered_finalize_script_treats_every_value_as_data(enter: str, make_spec: SpecFactory, fixture_spec: Path,
                                                              tmp_path: Path) -> None:
    source = spec_doc(fixture_spec)["contents"][0]["source"]
    contents = [entry(Path(source), t, "fixtureuser", "nogroup") for t in HOSTILE_TARGETS]
    spec = make_spec(contents=contents, configFile=HOSTILE_CONFIG, installBootLoader=True, enterCommand=enter,
                     bootLoader={"grubDevices": [HOSTILE_GRUB, "nodev"]})
    printed = builder(["finalize", str(spec), "--print", "--device", HOSTILE_DEVICE], tmp_path)
    assert printed.returncode == 0, printed.stderr
    script = tmp_path / "finalize.sh"
    script.write_text(printed.stdout)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr

    log = tmp_path / "calls.log"
    stubs = stub_path(tmp_path / "stubs", log)
    run = subprocess.run(["/bin/bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": str(stubs), "TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert "finalize: done" in run.stdout
    assert no_canaries(tmp_path) == []
    recorded = calls(log)
    # Every hostile target reaches chown as exactly one argument, unchanged.
    chowns = [c[c.index("chown"):] for c in recorded if "chown" in c]
    assert [c[1:] for c in chowns] == [["-R", "fixtureuser:nogroup", t] for t in HOSTILE_TARGETS]
    assert not [c for c in recorded if c[0] == "cp"], "configFile is placed by prepare, not by the VM script"
    assert ["ln", "-sfn", HOSTILE_DEVICE, HOSTILE_GRUB] in recorded
    mounts = [c for c in recorded if c[0] == "mount"]
    assert any(c[-2:] == [HOSTILE_DEVICE + "2", "/mnt"] for c in mounts), mounts
    assert any(c[-2:] == [HOSTILE_DEVICE + "1", "/mnt/boot"] and "vfat" in c for c in mounts), mounts


def test_out_dir_and_image_path_are_data_for_post_vm(make_spec: SpecFactory, tmp_path: Path) -> None:
    """$diskImage reaches postVM through the environment: an output path full of shell syntax stays a path."""
    out = tmp_path / "out $(touch canary-out) `touch canary-out` 'q' \"dq\" ; touch canary-out"
    post = 'test -f "$diskImage"; printf %s "$diskImage" > "$(dirname "$diskImage")/seen"'
    res = builder(["build", str(make_spec(postVM=post)), "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (out / "seen").read_text() == str(out / "fixture.img")
    assert (out / "nix-support" / "hydra-build-products").read_text() == f"file raw-image {out / 'fixture.img'}\n"
    assert no_canaries(tmp_path) == []
    assert json.loads(json.dumps(str(out))) == str(out)
