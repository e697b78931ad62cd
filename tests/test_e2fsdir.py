"""The directory library (builder/sandbox/e2fsdir.c) preloaded into the real mkfs.ext4 -d: the same bytes as
without it, without scanning directories, and it really takes libext2fs' calls (LD_DEBUG=bindings).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
import subprocess
from pathlib import Path

import pytest

from builder.sandbox.e2fsdir import DIR_ENV, dir_library
from builder.sandbox.preload import preload_list
from builder.sandbox.statshim import stat_shim

UUID = "0d1f5e0c-3f6a-4a57-9a51-8a1e4c2b7d10"
FAKE_TIME = "1700000000"
ENTRIES = 1500


@pytest.fixture(scope="module")
def library() -> str:
    """The built library (the package's build makes it)."""
    lib = dir_library()
    assert lib is not None and os.path.isfile(lib), f"{DIR_ENV}: the directory library was not built"
    return lib


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory of ENTRIES files and directories with names of many lengths (so an entry can fit in an
    earlier block's room: where libext2fs puts it is not simply the last block), plus small ones."""
    root = tmp_path_factory.mktemp("e2fsdir") / "tree"
    big = root / "big"
    big.mkdir(parents=True)
    rng = random.Random(7)
    for i in range(ENTRIES):
        name = f"e{i:05d}" + "x" * rng.randrange(0, 200)
        if i % 7 == 0:
            (big / name).mkdir()
            (big / name / "inner").write_text("x")
        else:
            (big / name).write_text("")
    (big / f"e00000{'x' * 20}-hardlink").hardlink_to(big / next(p for p in sorted(os.listdir(big)) if
                                                             (big / p).is_file()))
    (root / "small").mkdir()
    (root / "small" / "file").write_text("small\n")
    return root


def mkfs(tree: Path, image: Path, preload: str | None, trace: Path | None = None) -> None:
    """mkfs.ext4 -d tree into image (fixed UUID, seed and time), optionally preloaded and under strace.

    With the stat shim, as the builder runs it: mkfs reading the tree changes its directories' atimes.
    """
    image.unlink(missing_ok=True)
    image.write_bytes(b"")
    os.truncate(image, 256 << 20)
    shim = stat_shim()
    assert shim is not None
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME, MDI_SHIM_EPOCH=FAKE_TIME,
               LD_PRELOAD=preload_list(shim, preload))
    argv = ["mkfs.ext4", "-q", "-F", "-U", UUID, "-E", f"hash_seed={UUID}", "-d", str(tree), str(image)]
    if trace:
        argv = ["strace", "-f", "-c", "-e", "trace=pread64", "-o", str(trace), *argv]
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    # The lifetime-writes counter counts what mkfs wrote, which is all the library changes (fewer rewrites).
    res = subprocess.run(["debugfs", "-w", "-R", "ssv kbytes_written 0", str(image)], capture_output=True,
                         text=True, env=dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME))
    assert res.returncode == 0, res.stderr


def preads(trace: Path) -> int:
    """pread64 calls strace -c counted."""
    rows = [line.split() for line in trace.read_text().splitlines() if line.endswith(" pread64")]
    assert rows, trace.read_text()
    return int(rows[0][3])  # % time, seconds, usecs/call, calls, [errors,] syscall


def superblock_fields(image: Path) -> set[int]:
    """Byte offsets of s_kbytes_written (0x178, 8 bytes) and s_checksum (0x3fc, 4) in every superblock copy
    (dumpe2fs: the primary at byte 1024, the backups at the blocks it lists)."""
    out = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True, check=True).stdout
    block = int(re.search(r"^Block size:\s+(\d+)", out, re.M)[1])  # type: ignore[index]
    starts = [1024] + [int(b) * block for b in re.findall(r"Backup superblock at (\d+)", out)]
    return {start + off for start in starts for off in [*range(0x178, 0x180), *range(0x3FC, 0x400)]}


def test_same_bytes_as_libext2fs_alone(library: str, tree: Path, tmp_path: Path) -> None:
    """Byte for byte but the lifetime-writes counter of the backup superblocks (and their checksums): mkfs
    writes fewer kB with the library; the builder zeroes the primary's, but the backups keep what mkfs wrote."""
    stock, preloaded = tmp_path / "stock.img", tmp_path / "preloaded.img"
    mkfs(tree, stock, None)
    mkfs(tree, preloaded, library)
    fsck = subprocess.run(["e2fsck", "-fn", str(preloaded)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    cmp = subprocess.run(["cmp", "-l", str(stock), str(preloaded)], capture_output=True, text=True)
    differing = {int(line.split()[0]) - 1 for line in cmp.stdout.splitlines()}
    assert differing - superblock_fields(stock) == set()


def test_directory_is_not_scanned_for_each_entry(library: str, tree: Path, tmp_path: Path) -> None:
    """libext2fs alone reads the big directory's blocks again for every entry; with the library mkfs reads
    fewer blocks than there are entries."""
    mkfs(tree, tmp_path / "stock.img", None, tmp_path / "stock.trace")
    mkfs(tree, tmp_path / "preloaded.img", library, tmp_path / "preloaded.trace")
    assert preads(tmp_path / "stock.trace") > 20 * ENTRIES
    assert preads(tmp_path / "preloaded.trace") < ENTRIES


def test_mkfs_and_libext2fs_call_the_library(library: str, tree: Path, tmp_path: Path) -> None:
    """ext2fs_link and ext2fs_lookup, called from mke2fs (populate_fs) and from inside libext2fs (ext2fs_mkdir,
    ext2fs_namei), bind to the preloaded definitions."""
    image = tmp_path / "small.img"
    image.write_bytes(b"")
    os.truncate(image, 64 << 20)
    env = dict(os.environ, LD_PRELOAD=library, LD_DEBUG="bindings")
    res = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree / "small"), str(image)], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for caller in ("mkfs.ext4", "libext2fs.so.2"):
        for symbol in ("ext2fs_link", "ext2fs_lookup"):
            pattern = (rf"binding file \S*{re.escape(caller)} \[0\] to {re.escape(library)} \[0\]: "
                       rf"normal symbol `{symbol}'")
            assert re.search(pattern, res.stderr), f"{caller} does not call the library's {symbol}"


def test_the_debugfs_pass_finds_paths_without_scanning(library: str, tree: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's debugfs pass (builder/fs/ext.py normalize) sets a mode on every entry of the big
    directory by path: with the library debugfs reads fewer blocks than there are entries, where libext2fs'
    lookup alone reads the directory again for each; the same bytes either way, e2fsck -fn clean."""
    from builder.fs import ext
    from builder.sandbox import e2fsdir
    from builder.staging.contents import ModeFix

    names = sorted(os.listdir(tree / "big"))
    fixes = [ModeFix(f"/big/{name}", stat.S_IFMT(os.lstat(tree / "big" / name).st_mode) | 0o750) for name in names]
    params = ext.Ext4Params(label="x", uuid=UUID, hash_seed=UUID, inodes=4096, fake_time=int(FAKE_TIME))
    counts, digests = [], []
    real_run = subprocess.run
    for setting in (None, "none"):
        image = tmp_path / f"{setting}.img"
        mkfs(tree, image, library)
        e2fsdir.dir_library.cache_clear()
        if setting:
            monkeypatch.setenv(DIR_ENV, setting)
        trace = tmp_path / f"{setting}.trace"

        def traced(argv: list[str], *args: object, trace: Path = trace, **kwargs: object) -> object:
            if argv[:1] == ["debugfs"]:
                argv = ["strace", "-f", "-c", "-e", "trace=pread64", "-o", str(trace), *argv]
            return real_run(argv, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(subprocess, "run", traced)
        ext.normalize(image, 0, [], int(FAKE_TIME), tmp_path, params, every_inode=False, modes=fixes)
        monkeypatch.setattr(subprocess, "run", real_run)
        monkeypatch.delenv(DIR_ENV, raising=False)
        e2fsdir.dir_library.cache_clear()
        counts.append(preads(trace))
        digests.append(hashlib.sha256(image.read_bytes()).hexdigest())
        modes = subprocess.run(["debugfs", "-R", f"stat /big/{names[-1]}", str(image)], capture_output=True,
                               text=True).stdout
        assert "Mode:  0750" in modes, modes  # debugfs prints the permission bits
        assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0
    assert counts[0] < ENTRIES < 20 * ENTRIES < counts[1], counts
    assert digests[0] == digests[1]
