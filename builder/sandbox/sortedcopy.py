"""Inside the build namespace: copy the staged root onto a fresh tmpfs in sorted order, then exec the mkfs tool.

mkfs.btrfs 6.2 --rootdir takes inode numbers from the source files (st_ino) and walks directories in
readdir order, so its output depends on the host filesystem. A tmpfs mounted in the private namespace
numbers inodes in creation order; creating entries in sorted name order makes both the numbers and the
walk the same on every machine. Hard links stay links, modes and mtimes are copied, and the contents'
numeric owners (lchown) and the modes the staged copies could not have (ModeFix, builder/staging/contents.py;
chmod, after the owners: a chown clears set-id bits) are applied, recorded by fakeroot, which this runs
under.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import stat
import sys

from .namespace import mount_binds


def _mount_tmpfs(target: str) -> None:
    """Mount a fresh tmpfs at target (allowed in a user namespace's own mount namespace)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, b"mode=0755") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def copy_sorted(src: str, dest: str) -> None:
    """Copy the tree at src into the existing directory dest, every directory's entries in byte order."""
    links: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result]] = []

    def walk(s: str, d: str) -> None:
        for name in sorted(os.listdir(s), key=os.fsencode):
            sp, dp = os.path.join(s, name), os.path.join(d, name)
            st = os.lstat(sp)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dp)
                walk(sp, dp)
                dirs.append((dp, st))
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], dp)
                continue
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(sp), dp)
            elif stat.S_ISREG(st.st_mode):
                shutil.copyfile(sp, dp, follow_symlinks=False)
                os.chmod(dp, stat.S_IMODE(st.st_mode))
            else:
                os.mknod(dp, st.st_mode, st.st_rdev)
            os.utime(dp, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
            if st.st_nlink > 1:
                links[key] = dp

    walk(src, dest)
    root = os.lstat(src)
    for d, st in [*dirs, (dest, root)]:
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_mtime_ns, st.st_mtime_ns))


def _main(args: list[str]) -> None:
    """Namespace side: binds, tmpfs, sorted copy, owners and modes, then exec the command."""
    bind_file, src, dest, owners_file, sep, *argv = args
    if sep != "--" or not argv:
        raise SystemExit("usage: python -m builder.sandbox.sortedcopy BINDS SRC DEST OWNERS -- COMMAND...")
    mount_binds(json.loads(open(bind_file).read()))
    _mount_tmpfs(dest)
    copy_sorted(src, dest)
    fixes = json.loads(open(owners_file).read())
    for image_path, uid, gid in fixes["owners"]:
        os.lchown(dest + image_path, uid, gid)
    for image_path, mode in fixes["modes"]:
        os.chmod(dest + image_path, stat.S_IMODE(mode))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
