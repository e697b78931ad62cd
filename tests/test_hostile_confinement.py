"""Confinement: no contents entry writes outside the image, whatever symlinks, loops or special files it meets.

Each case runs a real `python -m builder build` and snapshots the host trees it could reach (the
sources, a victim directory that symlinks point at) before and after: names, types, sizes, modes,
mtimes and link targets must be unchanged. Cases the builder accepts are then read back from the
image with debugfs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.imagecheck import part_offset
from tests.support.specs import SpecFactory, spec_doc

REPO = Path(__file__).resolve().parent.parent


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a host tree: per path its type, mode, size, mtime, link target, content hash."""
    facts: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            facts[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, link, digest)
    return facts


def entry(source: Path | str, target: str) -> dict[str, Any]:
    """One contents entry without owner or mode."""
    return {"source": str(source), "target": target, "mode": None, "user": None, "group": None}


class World:
    """A private host area: sources, a victim directory outside everything, and the build's output."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.victim = root / "victim"
        self.out = root / "out"
        self.tmp = root / "tmp"
        for d in (self.src, self.victim, self.tmp):
            d.mkdir()
        (self.victim / "keep.txt").write_text("must stay as it is\n")

    def build(self, spec: Path) -> subprocess.CompletedProcess[str]:
        """Run the builder; assert the sources and the victim are untouched and TMPDIR is left empty."""
        before = (snapshot(self.src), snapshot(self.victim))
        res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(self.out)],
                             cwd=self.root, capture_output=True, text=True,
                             env=dict(os.environ, TMPDIR=str(self.tmp), PYTHONPATH=str(REPO)))
        assert (snapshot(self.src), snapshot(self.victim)) == before, "the build changed a host tree"
        assert os.listdir(self.tmp) == []
        assert "Traceback" not in res.stderr, res.stderr
        return res


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A fresh private host area."""
    yield World(tmp_path)


def test_target_through_a_symlink_from_a_source_tree_is_refused(world: World, make_spec: SpecFactory) -> None:
    tree = world.src / "tree"
    tree.mkdir()
    (tree / "out").symlink_to(world.victim)  # absolute link to a host directory
    (world.src / "evil").write_text("evil\n")
    spec = make_spec(partitionTableType="legacy",
                     contents=[entry(tree, "/srv/tree"), entry(world.src / "evil", "/srv/tree/out/evil")])
    res = world.build(spec)
    assert res.returncode == 2, res.stderr
    assert "contents[1].target '/srv/tree/out/evil': 'srv/tree/out' is a symlink in the image" in res.stderr
    assert not (world.victim / "evil").exists()
    assert not world.out.joinpath("fixture.img").exists()


def test_target_through_a_relative_escaping_symlink_is_refused(world: World, make_spec: SpecFactory) -> None:
    (world.src / "up").symlink_to("../../../../../../../../" + str(world.victim).lstrip("/"))
    (world.src / "evil").write_text("evil\n")
    spec = make_spec(partitionTableType="legacy",
                     contents=[entry(world.src / "up", "/srv/up"), entry(world.src / "evil", "/srv/up/evil")])
    res = world.build(spec)
    assert res.returncode == 2, res.stderr
    assert "'srv/up' is a symlink in the image" in res.stderr
    assert not (world.victim / "evil").exists()


def test_target_into_the_nix_state_symlinks_is_refused(world: World, make_spec: SpecFactory) -> None:
    """The builder's own /nix/var/nix/profiles/system link must not be replaced or written through."""
    (world.src / "evil").write_text("evil\n")
    spec = make_spec(partitionTableType="legacy",
                     contents=[entry(world.src / "evil", "/nix/var/nix/profiles/system/evil")])
    res = world.build(spec)
    assert res.returncode == 2, res.stderr
    assert "contents[0]: '/nix/var/nix' is written by the builder" in res.stderr, res.stderr


@pytest.mark.parametrize("target", ["/nix", "/nix/var", "/nix/var/nix/db", "/etc", "/root"])
def test_symlink_over_a_path_the_builder_writes_is_refused(target: str, world: World, make_spec: SpecFactory,
                                                           fixture_spec: Path) -> None:
    """A contents symlink at /nix, /etc... would make the builder's own writes (store placeholders, Nix
    database, /etc/NIXOS, channel links) land in the host directory it points to."""
    link = world.src / "link"
    link.symlink_to(world.victim)
    spec = make_spec(partitionTableType="legacy", copyChannel=target == "/root",
                     system={**spec_doc(fixture_spec)["system"],
                             "channel": spec_doc(fixture_spec)["system"]["toplevel"] if target == "/root" else None},
                     contents=[entry(link, target)])
    res = world.build(spec)
    assert sorted(os.listdir(world.victim)) == ["keep.txt"]
    assert res.returncode == 2, res.stderr
    if target == "/nix/var/nix/db":  # inside the builder's own state: refused before the link matters
        assert "contents[0]: '/nix/var/nix' is written by the builder" in res.stderr, res.stderr
    elif target == "/nix":  # holds the store: refused when the spec is loaded
        assert '$.contents[0].target: "/nix" is not allowed: it is or holds /nix/store' in res.stderr, res.stderr
    else:
        assert f"contents[0]: {target!r} is a symlink in the image" in res.stderr, res.stderr


def test_symlinks_in_sources_are_copied_as_links_never_followed(world: World, make_spec: SpecFactory) -> None:
    tree = world.src / "tree"
    tree.mkdir()
    (tree / "abs").symlink_to(world.victim / "keep.txt")
    (tree / "rel-escape").symlink_to("../../../../../etc/shadow")
    (tree / "loop-a").symlink_to("loop-b")
    (tree / "loop-b").symlink_to("loop-a")
    (tree / "self").symlink_to("self")
    (world.src / "top-loop").symlink_to("top-loop")
    spec = make_spec(partitionTableType="legacy",
                     contents=[entry(tree, "/srv/tree"), entry(world.src / "top-loop", "/srv/top-loop")])
    res = world.build(spec)
    assert res.returncode == 0, res.stderr
    image = world.out / "fixture.img"
    dump = world.root / "dump"
    dump.mkdir()
    for path in ("/srv/tree", "/srv/top-loop"):
        done = subprocess.run(["debugfs", "-R", f"rdump {path} {dump}", f"{image}?offset={part_offset(image, 1)}"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for name, target in [("abs", str(world.victim / "keep.txt")), ("rel-escape", "../../../../../etc/shadow"),
                         ("loop-a", "loop-b"), ("loop-b", "loop-a"), ("self", "self")]:
        assert os.readlink(dump / "tree" / name) == target
    assert os.readlink(dump / "top-loop") == "top-loop"


def test_source_through_a_symlink_loop_is_refused(world: World, make_spec: SpecFactory) -> None:
    (world.src / "loop").symlink_to("loop")
    spec = make_spec(partitionTableType="legacy", contents=[entry(world.src / "loop" / "x", "/srv/x")])
    res = world.build(spec)
    assert res.returncode == 2, res.stderr
    assert f"contents[0].source {str(world.src / 'loop' / 'x')!r}" in res.stderr


@pytest.mark.parametrize("kind", ["fifo", "socket", "char-device", "block-device"])
@pytest.mark.parametrize("where", ["top", "in-tree"])
def test_special_files_in_sources_are_refused(kind: str, where: str, world: World, make_spec: SpecFactory) -> None:
    parent = world.src / "tree" if where == "in-tree" else world.src
    parent.mkdir(exist_ok=True)
    special = parent / f"special-{kind}"
    if kind == "fifo":
        os.mkfifo(special)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(special))
        sock.close()
    else:
        assert os.geteuid() == 0, "mknod needs root"
        os.mknod(special, (stat.S_IFCHR if kind == "char-device" else stat.S_IFBLK) | 0o600, os.makedev(1, 3))
    source = world.src / "tree" if where == "in-tree" else special
    spec = make_spec(partitionTableType="legacy", contents=[entry(source, "/srv/x")])
    res = world.build(spec)
    assert res.returncode == 2, res.stderr
    assert f"contents[0].source: {str(special)!r} is a device node, socket or FIFO" in res.stderr
    assert not world.out.joinpath("fixture.img").exists()


# ---- host files that describe the build host, not an image (docs/trust.md) ------------------------------------

@pytest.mark.parametrize(("source", "shown"), [
    ("/proc/self/environ", "/proc"),  # the builder's own environment
    ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys"),
    ("/dev/null", "/dev"),
    ("link-to-proc/self/environ", "/proc"),  # through a symlink to /proc
    ("link-to-dev/zero", "/dev"),
    ("glob-of-proc", "/proc"),  # a glob matching a file there
])
def test_sources_under_proc_sys_dev_are_refused(source: str, shown: str, world: World, make_spec: SpecFactory) -> None:
    """As root, contents of /proc/self/environ landed in the image with the builder's environment (exit 0)."""
    (world.src / "link-to-proc").symlink_to("/proc")
    (world.src / "link-to-dev").symlink_to("/dev")
    if source == "glob-of-proc":
        path = "/proc/self/cmd*"
        named = "/proc/self/cmdline"
    else:
        path = source if source.startswith("/") else str(world.src / source)
        named = path
    spec = make_spec(partitionTableType="legacy", contents=[entry(path, "/srv/x")])
    res = world.build(spec)
    assert res.returncode == 2, res.stderr
    assert f"error: contents[0].source: {named!r} is under {shown}" in res.stderr, res.stderr
    assert "docs/trust.md" in res.stderr
    assert not world.out.exists()


@pytest.mark.parametrize("source", ["/proc/self/environ", "link-to-proc/self/environ"])
def test_a_config_file_under_proc_is_refused(source: str, world: World, make_spec: SpecFactory) -> None:
    """configFile = /proc/self/environ (a regular file to stat) was copied to /etc/nixos/configuration.nix."""
    (world.src / "link-to-proc").symlink_to("/proc")
    path = source if source.startswith("/") else str(world.src / source)
    res = world.build(make_spec(partitionTableType="legacy", configFile=path))
    assert res.returncode == 2, res.stderr
    assert f"error: configFile: {path!r} is under /proc" in res.stderr, res.stderr
    assert not world.out.exists()


def test_a_symlink_to_proc_is_copied_as_a_link(world: World, make_spec: SpecFactory) -> None:
    """A source that is itself a symlink is placed as the link (not followed), so it may point anywhere."""
    (world.src / "environ").symlink_to("/proc/self/environ")
    res = world.build(make_spec(partitionTableType="legacy", contents=[entry(world.src / "environ", "/srv/env")]))
    assert res.returncode == 0, res.stderr
    image = world.out / "fixture.img"
    listing = subprocess.run(["debugfs", "-R", "stat /srv/env", f"{image}?offset={part_offset(image, 1)}"],
                             capture_output=True, text=True).stdout
    assert "Type: symlink" in listing and 'Fast link dest: "/proc/self/environ"' in listing, listing


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting proc needs root")
@pytest.mark.parametrize("fstype", ["proc", "sysfs"])
def test_a_kernel_view_mounted_inside_a_source_tree_is_refused(fstype: str, world: World,
                                                               make_spec: SpecFactory) -> None:
    """A chroot's proc under a contents directory passed the /proc prefix check and the builder copied from it
    (here a vanishing /proc/<pid> ended that with a bare ENOENT); now it is refused, naming the mount."""
    tree = world.src / "chroot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("chroot\n")
    (tree / "proc").mkdir()
    subprocess.run(["mount", "-t", fstype, fstype, str(tree / "proc")], check=True)
    try:
        spec = make_spec(partitionTableType="legacy", contents=[entry(tree, "/srv/chroot")])
        res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(world.out)],
                             cwd=world.root, capture_output=True, text=True,
                             env=dict(os.environ, TMPDIR=str(world.tmp), PYTHONPATH=str(REPO)))
    finally:
        subprocess.run(["umount", str(tree / "proc")], check=True)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"contents[0].source: '{tree}/proc' is on a {fstype} mount" in res.stderr, res.stderr[-3000:]
    assert not world.out.joinpath("fixture.img").exists()
