"""The data library mkfs.ext4 -d runs with (builder/sandbox/e2fsdata.c): file data into the image in the kernel.

The oracle is stock e2fsprogs: the same builds with MDI_E2FS_DATA=none (mkfs reading and writing every
block itself) give the images' bytes; the kernel's FIEMAP (filefrag -v) and the filesystem's own free
space say whether blocks are shared; e2fsck -fn says the filesystem is sound.
"""

from __future__ import annotations

import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.sandbox import e2fsdata
from tests.support.digest import sha256
from tests.support.imagecheck import part_offset
from tests.support.specs import SpecFactory, spec_doc

REPO = Path(__file__).parent.parent
MiB = 1 << 20
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="the library defines nothing elsewhere")


@pytest.fixture(scope="module")
def library() -> str:
    found = e2fsdata.data_library()
    assert found is not None, "the data library is not built (pip install -e . builds builder/sandbox/_e2fsdata*.so)"
    return found


def awkward_tree(root: Path, big: int = 6 * MiB) -> Path:
    """Files whose data ends every way copy_file's blocks can: empty, tiny, tails under and at the tag's 16
    bytes, all-zero blocks inside data, sparse holes, hard links, and one big file; names in two dirs."""
    rng = random.Random(25)
    root.mkdir(parents=True)
    (root / "d").mkdir()
    (root / "empty").write_bytes(b"")
    (root / "tiny").write_bytes(b"hello")
    (root / "tail5").write_bytes(rng.randbytes(3 * 4096 + 5))
    (root / "tail15").write_bytes(rng.randbytes(4096 + 15))
    (root / "tail16").write_bytes(rng.randbytes(2 * 4096 + 16))
    (root / "whole").write_bytes(rng.randbytes(4 * 4096))
    (root / "zeros").write_bytes(bytes(10 * 4096))
    (root / "zero-tail").write_bytes(rng.randbytes(4096) + bytes(100))
    (root / "mixed").write_bytes(rng.randbytes(4096) + bytes(8192) + rng.randbytes(5000) + bytes(4096) + b"x")
    with open(root / "sparse", "wb") as f:
        f.write(rng.randbytes(10000))
        f.seek(4 * MiB)
        f.write(rng.randbytes(7000))
    (root / "d" / "big").write_bytes(rng.randbytes(big))
    os.link(root / "d" / "big", root / "big-link")
    for i in range(200):
        (root / "d" / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 20000)))
    return settle_times(root)


def settle_times(root: Path) -> Path:
    """Times no read can change: mkfs copies each file's atime into the image, and the kernel (relatime) moves
    an atime not after the mtime and ctime at the next read, so two mkfs runs over a new tree could record
    different atimes. An atime ten days ahead is after both, and is not a day old."""
    ahead = time.time_ns() + 10 * 86400 * 10**9
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(ahead, 10**18), follow_symlinks=False)
    return root


def contents_spec(make_spec: SpecFactory, tree: Path, **overrides: object) -> Path:
    """The fixture spec with tree added as contents at /srv/awkward (store paths as the fixture has them)."""
    doc = spec_doc(make_spec())
    entry = {"source": str(tree), "target": "/srv/awkward", "mode": None, "user": None, "group": None}
    return make_spec(contents=[*doc["contents"], entry], **overrides)


def prepare(spec: Path, image: Path, work: Path, data: str | None, files: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """`python -m builder prepare`, with the data library (data None) or with MDI_E2FS_DATA=data, and
    MDI_E2FS_DATA_FILES=files (None: the default, files of 64 KiB or more)."""
    env = {k: v for k, v in os.environ.items() if k not in (e2fsdata.DATA_ENV, e2fsdata.FILES_ENV)}
    if data is not None:
        env[e2fsdata.DATA_ENV] = data
    if files is not None:
        env[e2fsdata.FILES_ENV] = files
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image), "--work",
                          str(work)], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    return res


def data_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("[makeDiskImage] file data")]
    assert len(lines) == 1, stderr
    return lines[0]


@x86_64_only
@pytest.mark.slow
@pytest.mark.parametrize(("layout", "fs_type", "extra"), [
    ("efi", "ext4", {}), ("legacy", "ext4", {}), ("hybrid", "ext4", {}),
    ("none", "ext2", {"installBootLoader": False}), ("none", "ext3", {"installBootLoader": False}),
    ("none", "ext4", {"onlyNixStore": True, "installBootLoader": False, "contents": []}),
])
def test_images_are_the_bytes_of_mkfs_writing_the_data_itself(library: str, make_spec: SpecFactory,
                                                            tmp_path: Path, layout: str, fs_type: str,
                                                            extra: dict[str, object]) -> None:
    tree = awkward_tree(tmp_path / "tree")
    if "contents" in extra:
        spec = make_spec(partitionTableType=layout, fsType=fs_type, **extra)
    else:
        spec = contents_spec(make_spec, tree, partitionTableType=layout, fsType=fs_type, **extra)
    with_library = prepare(spec, tmp_path / "data.img", tmp_path / "w1", None, files="all")
    prepare(spec, tmp_path / "stock.img", tmp_path / "w2", "none")
    assert sha256(tmp_path / "data.img") == sha256(tmp_path / "stock.img")
    # On a disk: written past the image's page cache. In memory (tmpfs): copy_file_range from a file on the
    # image's filesystem (the staged tree, and the store where it is on that filesystem too), sendfile from
    # another (a store on disk).
    line = data_line(with_library.stderr)
    store = spec_doc(spec)["system"]["storeDir"]
    from_image_fs = "contents" not in extra or os.stat(store).st_dev == os.stat(tmp_path).st_dev
    way = ("written past the image's page cache (O_DIRECT)" if not in_memory(tmp_path) else
           "copied in the kernel (copy_file_range)" if from_image_fs else "copied in the kernel (sendfile)")
    assert way in line, line
    assert "read and written" not in line, line
    offset = 0 if layout == "none" else part_offset(tmp_path / "data.img", {"efi": 2, "legacy": 1, "hybrid": 3}[layout])
    fsck = subprocess.run(["e2fsck", "-fn", f"{tmp_path / 'data.img'}?offset={offset}"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def in_memory(path: Path) -> bool:
    """Whether path is on tmpfs (the library then copies in the kernel rather than write past a page cache)."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return kind.stdout.strip() in ("tmpfs", "ramfs")


def mkfs(library: str | None, source: Path, image: Path, report: Path | None = None, offset: int = MiB,
         block: int = 4096, name: Path | None = None, wrapper: tuple[str, ...] = (),
         **settings: str) -> subprocess.CompletedProcess[str]:
    """Stock mkfs.ext4 -d at offset (1 MiB) of a new sparse file, with the library (and its settings) or not;
    mkfs given the image by name (default: its own path), run under wrapper (e.g. strace)."""
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(96 * MiB)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1000000000", **settings}
    argv = [*wrapper, "mkfs.ext4", "-q", "-F", "-b", str(block), "-N", "2000", "-U",
            "6f0a44a8-2a4a-4f45-9b8e-61a0c5b1e3a1", "-E",
            f"offset={offset},nodiscard,hash_seed=6f0a44a8-2a4a-4f45-9b8e-61a0c5b1e3a1", "-d", str(source),
            str(name or image), "90000k"]
    if library:
        env["LD_PRELOAD"] = library
        env.update(MDI_DATA_IMAGE=str(image), MDI_DATA_OFFSET=str(offset),
                   MDI_DATA_REPORT=str(report or image.with_suffix(".rep")))
    return subprocess.run(argv, capture_output=True, text=True, env=env)


@x86_64_only
def test_raw_mkfs_output_is_the_same_bytes(library: str, tmp_path: Path) -> None:
    """Straight mkfs.ext4 -d, superblock included (its count of bytes written too), and the report adds up."""
    tree = awkward_tree(tmp_path / "tree")
    report = tmp_path / "report"
    res = mkfs(library, tree, tmp_path / "data.img", report)
    assert res.returncode == 0, res.stderr
    assert mkfs(None, tree, tmp_path / "stock.img").returncode == 0
    assert sha256(tmp_path / "data.img") == sha256(tmp_path / "stock.img")
    got = e2fsdata.read_report(report)
    assert got is not None
    blocks = [block for block in _blocks(tree) if block.strip(b"\0")]  # all-zero ones are holes
    moved = got.cloned + got.direct + got.copy_file_range + got.sendfile + got.read_write
    short = [b for b in blocks if len(b) < 16]
    assert (moved, got.mkfs) == (sum(map(len, blocks)) - sum(map(len, short)), sum(map(len, short)))
    assert got.mkfs >= 5 + 5 + 15  # tiny, tail5, tail15: ends under 16 bytes, which mkfs writes itself
    assert got.files == len({p.stat().st_ino for p in tree.rglob("*") if p.is_file() and p.stat().st_size})


@x86_64_only
def test_the_data_does_not_pass_through_the_images_page_cache(library: str, tmp_path: Path) -> None:
    """On a disk, a big file's data is written past the image's page cache: after mkfs (which fsyncs), the
    image's pages in memory (fincore) are its metadata and small files, not the 32 MiB of data."""
    if in_memory(tmp_path):
        pytest.skip(f"{tmp_path} is on tmpfs: the library copies in the kernel there")
    tree = awkward_tree(tmp_path / "tree", big=32 * MiB)
    image, report = tmp_path / "data.img", tmp_path / "report"
    res = mkfs(library, tree, image, report)
    assert res.returncode == 0, res.stderr
    got = e2fsdata.read_report(report)
    assert got is not None and got.direct >= 32 * MiB, got
    resident = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(image)],
                              capture_output=True, text=True, check=True)
    assert int(resident.stdout) < 8 * MiB, f"{int(resident.stdout)} bytes of the image in the page cache"


@x86_64_only
@pytest.mark.parametrize(("offset", "block"), [(MiB + 512, 4096), (MiB, 1024)])
def test_blocks_that_are_not_whole_pages_are_copied_in_the_kernel(library: str, tmp_path: Path, offset: int,
                                                                  block: int) -> None:
    """A filesystem at an offset that is no multiple of 4 KiB, or of 1 KiB blocks: a direct write would cover
    other blocks' bytes in the page, so the data goes by copy_file_range (sendfile on tmpfs), same bytes."""
    tree = awkward_tree(tmp_path / "tree")
    report = tmp_path / "report"
    res = mkfs(library, tree, tmp_path / "data.img", report, offset=offset, block=block)
    assert res.returncode == 0, res.stderr
    assert mkfs(None, tree, tmp_path / "stock.img", offset=offset, block=block).returncode == 0
    assert sha256(tmp_path / "data.img") == sha256(tmp_path / "stock.img")
    got = e2fsdata.read_report(report)
    assert got is not None and got.direct == 0 and got.copy_file_range + got.sendfile >= 6 * MiB, got


@x86_64_only
def test_what_follows_a_files_end_in_its_last_page_is_not_written(library: str, tmp_path: Path) -> None:
    """A file's last page can hold bytes after its end (stored through a shared mapping); stock mkfs reads up to
    the end and leaves zeros, and so must the direct writes, which give the disk whole pages."""
    import ctypes
    import mmap

    tree = tmp_path / "tree"
    tree.mkdir()
    victim = tree / "victim"
    victim.write_bytes(random.Random(7).randbytes(100100))
    settle_times(tree)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    with open(victim, "r+b") as f:
        addr = libc.mmap(None, 25 * 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        ctypes.memset(addr + 100100, ord("Z"), 25 * 4096 - 100100)  # past the end, inside the last page
        try:
            report = tmp_path / "report"
            res = mkfs(library, tree, tmp_path / "data.img", report)
            assert res.returncode == 0, res.stderr
            assert mkfs(None, tree, tmp_path / "stock.img").returncode == 0
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(25 * 4096))
    got = e2fsdata.read_report(report)
    assert got is not None and (got.direct or in_memory(tmp_path)), got
    assert b"ZZZZ" not in (tmp_path / "data.img").read_bytes()
    assert sha256(tmp_path / "data.img") == sha256(tmp_path / "stock.img")


@x86_64_only
def test_an_image_mkfs_opens_by_another_name_is_not_written_directly(library: str, tmp_path: Path) -> None:
    """Readahead is turned off on the descriptors mkfs opens by the image's name; opened by another (a symlink),
    the data goes by copy_file_range, the report says why, and the bytes are stock's."""
    tree = awkward_tree(tmp_path / "tree")
    image, report = tmp_path / "data.img", tmp_path / "report"
    (tmp_path / "other-name.img").symlink_to(image)
    res = mkfs(library, tree, image, report, name=tmp_path / "other-name.img")
    assert res.returncode == 0, res.stderr
    got = e2fsdata.read_report(report)
    assert got is not None and got.direct == 0 and got.copy_file_range + got.sendfile >= 6 * MiB, got
    if not in_memory(tmp_path):
        assert "mkfs was not seen opening the image" in e2fsdata.describe(got)
    assert mkfs(None, tree, tmp_path / "stock.img").returncode == 0
    assert sha256(image) == sha256(tmp_path / "stock.img")


@x86_64_only
def test_mkfs_reads_the_image_without_readahead(library: str, tmp_path: Path) -> None:
    """Each of mkfs' descriptors of the image gets POSIX_FADV_RANDOM (strace): its reads then make no large
    page-cache folio reaching into blocks a direct write fills, which the kernel could not drop after it."""
    tree = awkward_tree(tmp_path / "tree", big=4096)
    image = tmp_path / "x.img"
    trace = tmp_path / "trace"
    res = mkfs(library, tree, image, wrapper=("strace", "-f", "-e", "trace=openat,fadvise64", "-o", str(trace)))
    assert res.returncode == 0, res.stderr
    lines = trace.read_text().splitlines()
    opened = {m[1] for ln in lines if (m := re.search(rf'openat\(AT_FDCWD, "{re.escape(str(image))}", (?!.*O_DIRECT)'
                                                      r'.*\) = (\d+)$', ln))}
    random_fds = {m[1] for ln in lines if (m := re.search(r"fadvise64\((\d+), 0, 0, POSIX_FADV_RANDOM\) = 0", ln))}
    assert opened and opened <= random_fds, (opened, random_fds)


def _blocks(tree: Path) -> Iterator[bytes]:
    """Every 4 KiB block of every distinct file (hard links once), the last one as long as the file has it."""
    seen: set[int] = set()
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        if not path.is_file() or st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        data = path.read_bytes()
        yield from (data[i:i + 4096] for i in range(0, len(data), 4096))


@x86_64_only
def test_mkfs_binds_the_calls_to_the_library(library: str, tmp_path: Path) -> None:
    """The dynamic linker gives the library mkfs's and libext2fs' own calls (LD_DEBUG=bindings)."""
    tree = awkward_tree(tmp_path / "tree", big=4096)
    image = tmp_path / "x.img"
    res = mkfs(library, tree, image, LD_DEBUG="bindings")
    assert res.returncode == 0, res.stderr[-2000:]
    bound = {line.split("`")[1].split("'")[0] for line in res.stderr.splitlines()
             if " to " in line and library in line.split(" to ")[1]}
    assert {"pread64", "pwrite", "ext2fs_file_open", "ext2fs_file_close", "io_channel_write_blk64"} <= bound


@x86_64_only
def test_a_file_that_changes_meanwhile_fails_mkfs_naming_it(library: str, tmp_path: Path) -> None:
    """A source that grows between its first read and its copy is refused, not copied as it is by then."""
    tree = awkward_tree(tmp_path / "tree", big=32 * MiB)
    victim = tree / "d" / "big"
    stop = threading.Event()

    def grow() -> None:
        with open(victim, "ab", buffering=0) as f:
            while not stop.is_set():
                f.write(b"x")

    grower = threading.Thread(target=grow)
    grower.start()
    try:
        res = mkfs(library, tree, tmp_path / "x.img")
    finally:
        stop.set()
        grower.join()
    assert res.returncode != 0
    named = [f"{path}: the file changed while the image was being made" in res.stderr
             for path in (victim, tree / "big-link")]  # hard links: mkfs reads it under the name it meets first
    assert any(named), res.stderr


def xfs_mount(tmp_path: Path, size: int = 768 * MiB) -> Path:
    """A fresh XFS with reflink, loop-mounted (skipped with the reason when this machine cannot)."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed")
    disk, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    mnt.mkdir()
    with open(disk, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(disk)], check=True)
    res = subprocess.run(["mount", "-o", "loop", str(disk), str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot loop-mount an XFS here: {res.stderr.strip()}")
    return mnt


def used_bytes(mnt: Path) -> int:
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@x86_64_only
@pytest.mark.slow
def test_on_a_reflink_filesystem_the_image_shares_the_sources_blocks(library: str, make_spec: SpecFactory,
                                                                    tmp_path: Path) -> None:
    """Sources, build directory and image on one XFS: the data's extents are shared, the space used grows by
    little more than the metadata, and the image is the bytes a stock build gives."""
    mnt = xfs_mount(tmp_path)
    try:
        big = 64 * MiB
        tree = awkward_tree(mnt / "tree", big=big)
        spec = contents_spec(make_spec, tree, partitionTableType="efi")
        before = used_bytes(mnt)
        res = prepare(spec, mnt / "data.img", mnt / "work", None)
        grown = used_bytes(mnt) - before
        line = data_line(res.stderr)
        assert "shared with the source files' blocks (reflink)" in line, line
        # The fixture's store is on this machine's ext4, not the XFS: its large files are copied.
        assert "not shared: the store and the image are on different filesystems" in line, line
        frag = subprocess.run(["filefrag", "-v", str(mnt / "data.img")], capture_output=True, text=True, check=True)
        assert "shared" in frag.stdout, (line, frag.stdout[-600:])
        src = subprocess.run(["filefrag", "-v", str(tree / "d" / "big")], capture_output=True, text=True, check=True)
        assert "shared" in src.stdout
        stock = tmp_path / "stock.img"
        prepare(spec, stock, tmp_path / "work", "none")
        assert sha256(mnt / "data.img") == sha256(stock)
        # The stock image allocates every data block; this one adds what is not the tree's data.
        stock_alloc = os.stat(stock).st_blocks * 512
        assert grown < stock_alloc - big, (grown, stock_alloc)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@x86_64_only
@pytest.mark.slow
def test_across_filesystems_the_kernel_copies_and_the_log_says_why(library: str, make_spec: SpecFactory,
                                                                  tmp_path: Path) -> None:
    """The image in memory (tmpfs), the store and sources on this disk: no sharing, sendfile copies, and why."""
    shm = Path("/dev/shm")
    tree = awkward_tree(tmp_path / "tree")
    spec = contents_spec(make_spec, tree, partitionTableType="efi")
    image = Path(os.environ.get("MDI_MEMORY_DIR") or shm) / f"mdi-test-e2fsdata-{os.getpid()}.img"
    try:
        res = prepare(spec, image, tmp_path / "work", None, files="all")
        line = data_line(res.stderr)
        assert "copied in the kernel (sendfile)" in line and "copy_file_range" not in line, line
        assert "not shared: the store and the image are on different filesystems" in line, line
        prepare(spec, tmp_path / "stock.img", tmp_path / "work", "none")
        assert sha256(image) == sha256(tmp_path / "stock.img")
    finally:
        image.unlink(missing_ok=True)


@x86_64_only
def test_by_default_large_files_are_copied_in_the_kernel_and_small_ones_by_mkfs(library: str, make_spec: SpecFactory,
                                                                                tmp_path: Path) -> None:
    tree = awkward_tree(tmp_path / "tree")  # one file of 6 MiB, the others under 64 KiB
    spec = contents_spec(make_spec, tree)
    res = prepare(spec, tmp_path / "data.img", tmp_path / "w1", None)
    line = data_line(res.stderr)
    # This machine's ext4 shares no blocks: the data is written past the image's page cache (on a disk).
    way = "copied in the kernel" if in_memory(tmp_path) else "written past the image's page cache (O_DIRECT)"
    assert way in line and "files under 64 KiB" in line, line
    got = re.search(r"file data of (\d+) files", line)
    assert got and int(got[1]) >= 1, line
    prepare(spec, tmp_path / "stock.img", tmp_path / "w2", "none")
    assert sha256(tmp_path / "data.img") == sha256(tmp_path / "stock.img")


def test_a_files_setting_not_known_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(make_spec()), "--image",
                          str(tmp_path / "x.img")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, e2fsdata.FILES_ENV: "some"})
    assert res.returncode == 2, res.stderr
    assert f"{e2fsdata.FILES_ENV}='some'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.img").exists()


def test_without_the_library_the_log_says_mkfs_wrote_the_data(make_spec: SpecFactory, tmp_path: Path) -> None:
    res = prepare(make_spec(), tmp_path / "x.img", tmp_path / "work", "none")
    assert data_line(res.stderr).endswith(f"file data: read and written by mkfs.ext4 itself ({e2fsdata.DATA_ENV}=none)")


def test_a_library_that_is_not_a_file_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(make_spec()), "--image",
                          str(tmp_path / "x.img")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, e2fsdata.DATA_ENV: str(tmp_path / "missing.so")})
    assert res.returncode == 2, res.stderr
    assert e2fsdata.DATA_ENV in res.stderr and "missing.so" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.img").exists()


def test_the_report_reads_back_and_says_why_blocks_were_not_shared(tmp_path: Path) -> None:
    report = tmp_path / "r"
    report.write_text("small_files 2\nsmall_bytes 3072\nfiles 3\ncloned 0\ndirect 0\n"
                      "copy_file_range 0\nsendfile 8192\nread_write 0\nmkfs 5\nclone_errno 18\ndirect_skip 1\n"
                      "copy_file_range_errno 18\nsendfile_errno 0\n")
    got = e2fsdata.read_report(report)
    assert got is not None and got.sendfile == 8192
    assert e2fsdata.describe(got) == ("file data of 3 files, 8.0 KiB: 8.0 KiB copied in the kernel (sendfile); not "
                                      "shared: the store and the image are on different filesystems; not written "
                                      "directly: the image is in memory (tmpfs), where there is no page cache to "
                                      "pass by; 2 files under 64 KiB (3.0 KiB) written by mkfs; 5 B of file ends "
                                      "under 16 bytes written by mkfs")
    report.write_text("small_files 0\nsmall_bytes 0\nfiles 1\ncloned 0\ndirect 4096\ncopy_file_range 0\n"
                      "sendfile 0\nread_write 0\nmkfs 0\nclone_errno 95\ndirect_skip 0\ncopy_file_range_errno 0\n"
                      "sendfile_errno 0\n")
    assert e2fsdata.describe(e2fsdata.read_report(report)) == (
        "file data of 1 files, 4.0 KiB: 4.0 KiB written past the image's page cache (O_DIRECT); not shared: the "
        "image's filesystem does not share blocks (reflinks need XFS with reflink=1 or btrfs)")
    report.write_text("files 3\n")
    assert e2fsdata.read_report(report) is None


@pytest.mark.slow
def test_the_raw_intermediate_goes_beside_the_output_where_that_shares_the_stores_blocks(
        make_spec: SpecFactory, tmp_path: Path) -> None:
    """A converted format's raw image: in OUT when OUT and the store are one filesystem that clones (here a
    store directory on a loop-mounted XFS), not where OUT is another filesystem or one that does not clone."""
    import dataclasses

    from builder.disk.intermediate import intermediate_parent, shares_store_blocks
    from builder.output import output_dir
    from builder.spec import load_spec

    mnt = xfs_mount(tmp_path, 320 * MiB)
    try:
        (mnt / "store").mkdir()
        spec = dataclasses.replace(load_spec(make_spec(format="qcow2")), store_dir=str(mnt / "store"))
        assert shares_store_blocks(spec, mnt)
        with output_dir(mnt / "out") as output:
            parent = intermediate_parent(spec, tmp_path / "scratch", output)
            assert parent == output.staging and parent.parent == mnt / "out"
        ext4_store = dataclasses.replace(spec, store_dir=str(tmp_path))  # this machine's ext4 clones nothing
        assert not shares_store_blocks(ext4_store, tmp_path)
        assert not shares_store_blocks(spec, tmp_path)  # another filesystem than the store's
        with output_dir(tmp_path / "out") as output:
            assert intermediate_parent(ext4_store, tmp_path / "scratch", output) != output.staging_dir
            assert output.staging_dir is None  # not even made
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@x86_64_only
def test_a_big_file_is_mapped_a_window_at_a_time(library: str, tmp_path: Path) -> None:
    """The zero-block scan maps the source 8 MiB at a time: mkfs' peak RSS stays far below a 128 MiB file's size
    (the whole file mapped counts in RSS)."""
    tree = awkward_tree(tmp_path / "tree", big=128 * MiB)
    image = tmp_path / "x.img"
    with open(image, "wb") as f:
        f.truncate(256 * MiB)
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "offset=1048576,nodiscard", "-d", str(tree), str(image),
            "200000k"]
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "LD_PRELOAD": library, "MDI_DATA_IMAGE": str(image), "MDI_DATA_OFFSET": str(MiB),
           "MDI_DATA_REPORT": str(tmp_path / "report")}
    res = subprocess.run([sys.executable, "-c", measure, *argv], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    report = e2fsdata.read_report(tmp_path / "report")
    assert report is not None and report.direct + report.copy_file_range + report.cloned >= 128 * MiB
    assert int(res.stdout) < 48 * 1024, f"peak RSS {res.stdout.strip()} KiB"
