"""The build VM's initramfs: static busybox, the kernel modules it needs and an /init, cached per kernel."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import rules
from ..errors import BuildError

# What the build VM needs: virtio disk and 9p shares, FAT with its code pages, EFI variables, and the
# writable root filesystems finalize mounts (their kernel modules in builder/rules.json).
VM_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_rng", "9pnet_virtio", "9p", "crc32c_generic",
    "vfat", "nls_cp437", "nls_iso8859-1", "nls_ascii", "efivarfs",
    *dict.fromkeys(f.kernel_module for f in rules.fs_types().values() if not f.read_only),
)
BUSYBOX = Path("/bin/busybox")

# /init of the build VM: the guest nixpkgs' vmTools.runInLinuxVM gives its builder, and no more.
# vmTools' stage 1 (pkgs/build-support/vm/default.nix, nixpkgs 25.11) mounts a fresh tmpfs as the new
# root and makes only /dev (with shm and pts), the store (shared from the host), /tmp (1777), /run,
# /var/run -> /run, /tmp/xchg (the exchange directory), /proc, /sys and /etc with mtab -> /proc/mounts,
# hosts and a root line in passwd; its stage 2 links /bin/sh to bash and runs the builder in /tmp with
# PATH from the derivation's inputs, writing its status to /tmp/xchg/in-vm-exit. Here the "inputs" are
# host directories listed in xchg/host-paths, bound read-only at their own paths from the host's root
# (shared read-only over 9p and mounted outside the guest's root, at /host of the initramfs), and the
# links in xchg/host-links (such as /lib64 -> usr/lib64 for the dynamic loader, /bin/sh -> bash).
# Nothing else of the host is there: no /mnt, /home, /root, /srv or /media, no host /tmp.
# Kept here (not in templates/) because it is part of the VM, not of the image.
VM_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "vm-init: $*"; reboot -f; }
mkdir -p /proc /sys /dev /host /xchg /fs
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do insmod "$m" 2>/dev/null || true; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host ||
  fail "cannot mount the host root over 9p"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xchg /xchg || fail "cannot mount the exchange directory"
bind_ro() {
  mkdir -p "$2" && mount -o bind "$1" "$2" && mount -o remount,bind,ro "$2" || fail "cannot bind $1 at $2"
}
mount -t tmpfs -o mode=755 none /fs
mkdir -p /fs/dev
mount -o bind /dev /fs/dev
mkdir -p /fs/dev/shm /fs/dev/pts
mount -t tmpfs -o mode=1777 none /fs/dev/shm
mount -t devpts none /fs/dev/pts
store=$(cat /xchg/store-dir)
bind_ro "/host$store" "/fs$store"
mkdir -p /fs/tmp /fs/run /fs/var
mount -t tmpfs -o mode=1777 none /fs/tmp
mount -t tmpfs -o mode=755 none /fs/run
ln -sfn /run /fs/var/run
mkdir -p /fs/tmp/xchg
mount -o move /xchg /fs/tmp/xchg
mkdir -p /fs/proc /fs/sys
mount -t proc none /fs/proc
mount -t sysfs none /fs/sys
mkdir -p /fs/etc
ln -sf /proc/mounts /fs/etc/mtab
echo "127.0.0.1 localhost" > /fs/etc/hosts
echo "root:x:0:0:System administrator:/root:/bin/sh" > /fs/etc/passwd
while IFS= read -r path; do
  [ -n "$path" ] && bind_ro "/host$path" "/fs$path"
done < /fs/tmp/xchg/host-paths
while IFS=' ' read -r link target; do
  [ -n "$link" ] && mkdir -p "/fs${link%/*}" && ln -s "$target" "/fs$link"
done < /fs/tmp/xchg/host-links
echo "vm-init: running /tmp/xchg/command.sh"
chroot /fs /bin/sh -c 'cd /tmp && exec /bin/sh /tmp/xchg/command.sh' </dev/null
status=$?
echo "$status" > /fs/tmp/xchg/in-vm-exit
echo "vm-init: command exited with status $status"
sync
umount /fs/tmp/xchg
reboot -f
"""


@dataclass(frozen=True)
class Kernel:
    """A host kernel image and its module tree, used to boot the build VM."""

    version: str
    image: Path
    modules: Path


def host_kernel() -> Kernel:
    """The newest /boot/vmlinuz-* that has a module tree (Debian's linux-image-amd64 has 9p)."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists():
            found.append(Kernel(version, image, modules))
    if not found:
        raise BuildError("no kernel for the build VM: install linux-image-amd64 (needs /boot/vmlinuz-* and "
                         "/lib/modules/<version>/modules.dep)")
    return max(found, key=lambda k: [int(p) if p.isdigit() else 0 for p in k.version.replace("-", ".").split(".")])


def module_load_order(modules: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for wanted and their dependencies, dependencies first; built-in modules are left out."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    by_name = {_module_name(path): path for path in deps}
    builtin = {_module_name(p) for p in (modules / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in reversed(deps[path]):
            visit(dep)
        if path not in order:
            order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise BuildError(f"kernel module {name!r} is missing from {modules}")
        visit(by_name[key])
    return [modules / p for p in order]


def _module_name(path: str) -> str:
    """Module name of a modules.dep path: kernel/fs/9p/9p.ko -> 9p (dashes as underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One newc cpio record (owner root, mtime 0, so the archive is reproducible)."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_cpio(files: dict[str, tuple[int, bytes]], char_devices: dict[str, tuple[int, int]]) -> bytes:
    """A newc archive of regular files, symlinks (S_IFLNK mode, target as data) and char devices."""
    dirs: set[str] = set()
    for name in [*files, *char_devices]:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    records = [_cpio_entry(d, stat.S_IFDIR | 0o755, ino=i + 1) for i, d in enumerate(sorted(dirs))]
    base = len(records) + 1
    for i, (name, (mode, data)) in enumerate(sorted(files.items())):
        records.append(_cpio_entry(name, mode, data, ino=base + i))
    base += len(files)
    for i, (name, rdev) in enumerate(sorted(char_devices.items())):
        records.append(_cpio_entry(name, stat.S_IFCHR | 0o600, rdev=rdev, ino=base + i))
    records.append(_cpio_entry("TRAILER!!!", 0))
    return b"".join(records)


def cache_dir() -> Path:
    """Where built initramfs files are kept: $XDG_CACHE_HOME/make-disk-image (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "make-disk-image"


def vm_initramfs(kernel: Kernel) -> Path:
    """The build VM's initramfs for this kernel, built once and cached (keyed by kernel, init and modules)."""
    if not BUSYBOX.exists():
        raise BuildError(f"{BUSYBOX} is missing: install busybox-static for the build VM")
    modules = module_load_order(kernel.modules, VM_MODULES)
    key = hashlib.sha256("\n".join([kernel.version, VM_INIT, *map(str, modules)]).encode()).hexdigest()[:16]
    target = cache_dir() / f"vm-initramfs-{kernel.version}-{key}.cpio.gz"
    if target.exists():
        return target
    files: dict[str, tuple[int, bytes]] = {
        "init": (stat.S_IFREG | 0o755, VM_INIT.encode()),
        "bin/busybox": (stat.S_IFREG | 0o755, BUSYBOX.read_bytes()),
    }
    for i, path in enumerate(modules):
        files[f"modules/{i:02d}-{path.name}"] = (stat.S_IFREG | 0o644, path.read_bytes())
    archive = gzip.compress(build_cpio(files, {"dev/console": (5, 1), "dev/null": (1, 3)}), mtime=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    partial.write_bytes(archive)
    partial.replace(target)
    return target
