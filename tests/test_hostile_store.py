"""A store that no Nix could have made: the image gets what each path's NAR describes, or the build is refused.

A Nix store path is what its NAR can express (Nix's src/libutil/archive.cc): regular files, executable or
not, directories and symlinks. Nix's canonicalisePathMetaData (src/libstore/posix-fs-canonicalise.cc)
gives every non-symlink mode 0444, or 0555 when owner-executable or a directory, and removes extended
attributes (ACLs, capabilities, user.*). Store paths with every kind of odd metadata are made here as root
under the real /nix/store and registered through a closureInfo copy; the image is read with debugfs
(`stat`, `ea_list`). Store paths holding a FIFO, socket or device node are refused, naming the file.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.forged_store import forged, spec_with
from tests.support.imagecheck import debugfs, inode_facts, part_offset
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setuid files, capabilities and device nodes need root")


@pytest.fixture
def odd_path() -> Iterator[Callable[[str], Path]]:
    """Make forged store paths (removed afterwards): odd_path(name) returns a fresh path for the test to fill."""
    with ExitStack() as stack:
        yield lambda name: stack.enter_context(forged(name))


def prepare(spec: Path, image: Path) -> subprocess.CompletedProcess[str]:
    """`python -m builder prepare SPEC --image IMAGE` as its own process."""
    return subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value (version 2; (tag, perm, id) entries), as setfacl writes it."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


NO_ID = 0xFFFFFFFF
# user::rw- user:1000:r-- group::r-- mask::r-- other::r--
ACL = posix_acl((0x01, 6, NO_ID), (0x02, 4, 1000), (0x04, 4, NO_ID), (0x10, 4, NO_ID), (0x20, 4, NO_ID))

# (name in the store path, file or directory, its mode, extended attributes, its mode in the image: what
# `nix-store --restore` of its NAR gives)
ODD: list[tuple[str, str, int, dict[str, bytes], int]] = [
    ("setuid", "file", 0o4755, {}, 0o100555),
    ("setgid-plain", "file", 0o2644, {}, 0o100444),
    ("everything", "file", 0o7777, {}, 0o100555),
    ("private", "file", 0o600, {}, 0o100444),
    ("group-exec-only", "file", 0o454, {}, 0o100444),
    ("sticky-dir", "dir", 0o1777, {}, 0o040555),
    ("writable-dir", "dir", 0o755, {}, 0o040555),
    ("user-xattr", "file", 0o444, {"user.mdi": b"forged"}, 0o100444),
    ("acl", "file", 0o444, {"system.posix_acl_access": ACL}, 0o100444),
    ("capability", "file", 0o555, {}, 0o100555),  # security.capability set with setcap below
]


def make_odd(path: Path, kind: str, mode: int, xattrs: dict[str, bytes]) -> None:
    """A file or directory with these mode bits and extended attributes."""
    if kind == "dir":
        path.mkdir()
    else:
        path.write_text("x")
    for name, value in xattrs.items():
        os.setxattr(path, name, value)
    os.chmod(path, mode)


def test_store_files_get_the_metadata_of_their_nar(make_spec: SpecFactory, fixture_spec: Path,
                                                   odd_path: Callable[[str], Path], tmp_path: Path) -> None:
    """Without canonicalisation mkfs.ext4 -d copied every mode bit and extended attribute (exit 0)."""
    top = odd_path("metadata")
    top.mkdir()
    (top / "ok").write_text("a canonical file")
    os.chmod(top / "ok", 0o444)
    for name, kind, mode, xattrs, _ in ODD:
        make_odd(top / name, kind, mode, xattrs)
    subprocess.run(["setcap", "cap_net_raw+ep", str(top / "capability")], check=True)
    assert os.listxattr(top / "capability") == ["security.capability"]
    assert "system.posix_acl_access" in os.listxattr(top / "acl")
    os.chmod(top, 0o2775)  # the top directory itself too
    image = tmp_path / "odd.img"
    done = prepare(spec_with(make_spec, fixture_spec, [top], tmp_path), image)
    assert done.returncode == 0, done.stderr[-3000:]
    offset = part_offset(image, 2)
    assert inode_facts(image, offset, str(top))["mode"] == 0o040555
    assert inode_facts(image, offset, f"{top}/ok")["mode"] == 0o100444
    for name, _, _, _, image_mode in ODD:
        path = f"{top}/{name}"
        assert inode_facts(image, offset, path)["mode"] == image_mode, name
        listed = debugfs(image, offset, f'ea_list "{path}"')
        assert "=" not in listed, (name, listed)  # ea_list prints name = "value" for each attribute
    assert "Extended attributes:" not in debugfs(image, offset, f'stat "{top}/capability"')
    assert subprocess.run(["e2fsck", "-fn", f"{image}?offset={offset}"], capture_output=True).returncode == 0


def test_an_only_nix_store_image_gets_them_too(make_spec: SpecFactory, fixture_spec: Path,
                                               odd_path: Callable[[str], Path], tmp_path: Path) -> None:
    """onlyNixStore: the store is the image's root, so image paths drop the store directory."""
    top = odd_path("only-store")
    top.write_text("x")
    os.chmod(top, 0o6755)
    os.setxattr(top, "user.mdi", b"forged")
    image = tmp_path / "store.img"
    spec = spec_with(make_spec, fixture_spec, [top], tmp_path, onlyNixStore=True, contents=[], label="nix-store",
                     partitionTableType="none")
    done = prepare(spec, image)
    assert done.returncode == 0, done.stderr[-3000:]
    assert inode_facts(image, 0, f"/{top.name}")["mode"] == 0o100555
    assert "=" not in debugfs(image, 0, f'ea_list "/{top.name}"')


def test_other_filesystems_refuse_what_they_cannot_canonicalise(make_spec: SpecFactory, fixture_spec: Path,
                                                               odd_path: Callable[[str], Path], tmp_path: Path) -> None:
    """mkfs.btrfs --rootdir copies modes and extended attributes as they are; the build is refused, naming the file."""
    top = odd_path("btrfs")
    top.mkdir()
    (top / "tool").write_text("x")
    os.chmod(top / "tool", 0o4755)
    os.chmod(top, 0o555)
    done = prepare(spec_with(make_spec, fixture_spec, [top], tmp_path, fsType="btrfs", additionalSpace="128M"),
                   tmp_path / "x.img")
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"store file '{top}/tool' has mode 4755 (Nix gives 0555)" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.img").exists()


def make_special(path: Path, kind: str) -> list[socket.socket]:
    """A FIFO, socket, or character/block device node at path; sockets returned to be closed."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return [sock]
    else:
        os.mknod(path, 0o600 | (stat.S_IFCHR if kind == "char-device" else stat.S_IFBLK), os.makedev(1, 5))
    return []


KINDS = {"fifo": "a FIFO", "socket": "a socket", "char-device": "a character device", "block-device": "a block device"}


@pytest.mark.parametrize("where", ["inside", "top-level"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_store_path_holding_what_no_nar_can_is_refused(kind: str, where: str, make_spec: SpecFactory,
                                                         fixture_spec: Path, odd_path: Callable[[str], Path],
                                                         tmp_path: Path) -> None:
    """Before, a FIFO, socket or device node in the store was copied into the image (exit 0)."""
    top = odd_path(f"special-{kind}-{where}")
    if where == "inside":
        top.mkdir()
        (top / "sub").mkdir()
        special = top / "sub" / "node"
    else:
        special = top
    sockets = make_special(special, kind)
    try:
        image = tmp_path / "x.img"
        done = prepare(spec_with(make_spec, fixture_spec, [top], tmp_path), image)
    finally:
        for s in sockets:
            s.close()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"system.closureInfo: store file '{special}' is {KINDS[kind]}" in done.stderr, done.stderr[-3000:]
    assert "only regular files, directories and symlinks" in done.stderr
    assert not image.exists()



# Nix leaves these on store files (src/libstore/posix-fs-canonicalise.cc, ignoredAcls); settable as root on
# ext4 without SELinux (system.nfs4_acl only on NFSv4).
LABEL = b"system_u:object_r:nix_store_t:s0\0"


@pytest.mark.parametrize("shim", ["loaded", "none"])
def test_host_labels_are_not_forgery_and_stay_out_of_the_image(shim: str, make_spec: SpecFactory, fixture_spec: Path,
                                                              odd_path: Callable[[str], Path], tmp_path: Path) -> None:
    """On an SELinux host every store file has security.selinux: the build was refused on btrfs/xfs/erofs/squashfs
    and logged a line per file on ext4. Now ext4 leaves them out (the stat shim, or debugfs without it)."""
    top = odd_path(f"labelled-{shim}")
    top.mkdir()
    for i in range(40):
        (top / f"f{i}").write_text("x")
        os.chmod(top / f"f{i}", 0o444)
        os.setxattr(top / f"f{i}", "security.selinux", LABEL)
    os.setxattr(top / "f0", "security.csm", b"x")
    os.chmod(top, 0o555)
    os.setxattr(top, "security.selinux", LABEL)
    image = tmp_path / "labelled.img"
    env = {"MDI_STAT_SHIM": "none"} if shim == "none" else {}
    done = subprocess.run([sys.executable, "-m", "builder", "prepare",
                           str(spec_with(make_spec, fixture_spec, [top], tmp_path)), "--image", str(image)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(str(top)) == 0, done.stderr[-3000:]  # no line per file
    assert "41 store files carry the build host's security.csm, security.selinux" in done.stderr, done.stderr[-3000:]
    offset = part_offset(image, 2)
    for path in (str(top), f"{top}/f0", f"{top}/f39"):
        listed = debugfs(image, offset, f'ea_list "{path}"')
        assert "=" not in listed and "security" not in listed, (path, listed)
        assert inode_facts(image, offset, path)["mode"] in (0o040555, 0o100444)


@pytest.mark.parametrize("fs_type", ["squashfs", "erofs", "btrfs"])
def test_host_labels_do_not_refuse_other_filesystems(fs_type: str, make_spec: SpecFactory, fixture_spec: Path,
                                                     odd_path: Callable[[str], Path], tmp_path: Path) -> None:
    """Labels alone are not a forged store: squashfs and erofs are built without any attribute; mkfs.btrfs
    copies them all, so btrfs is refused naming the label (it was refused as a forged store before)."""
    top = odd_path(f"labelled-{fs_type}")
    top.write_text("labelled")
    os.chmod(top, 0o444)
    os.setxattr(top, "security.selinux", LABEL)
    image = tmp_path / "x.img"
    store_only = {} if fs_type == "btrfs" else {"onlyNixStore": True, "contents": [], "partitionTableType": "none"}
    done = prepare(spec_with(make_spec, fixture_spec, [top], tmp_path, fsType=fs_type, additionalSpace="128M",
                             label="nix-store", **store_only), image)
    assert "Traceback" not in done.stderr
    if fs_type == "btrfs":
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"store file '{top}' (and 0 more) carries the build host's security.selinux" in done.stderr
        assert not image.exists()
        return
    assert done.returncode == 0, done.stderr[-3000:]
    if fs_type == "erofs":
        facts = subprocess.run(["dump.erofs", f"--path=/{top.name}", str(image)], capture_output=True, text=True,
                               check=True).stdout
        assert "Xattr size: 0" in facts, facts
    else:
        facts = subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True, text=True, check=True).stdout
        assert "Xattrs are not stored" in facts, facts
