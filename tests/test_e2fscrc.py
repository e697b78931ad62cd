"""The checksum library e2fsprogs runs with (builder/sandbox/e2fscrc.c): libext2fs' checksums, the same image bytes.

The oracle is Debian's libext2fs itself: its own ext2fs_crc32c_le for the function, and mkfs.ext4,
debugfs, e2fsck and tune2fs without the library for the images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.sandbox import e2fscrc
from builder.vm.settle import settle_ext
from tests.support.digest import sha256
from tests.support.imagecheck import part_offset
from tests.support.specs import SpecFactory

REPO = Path(__file__).parent.parent
LAYOUTS = ["legacy", "legacy+boot", "legacy+gpt", "efi", "efixbootldr", "hybrid", "none"]
ROOT_PARTITION = {"legacy": 1, "legacy+boot": 2, "legacy+gpt": 2, "efi": 2, "efixbootldr": 3, "hybrid": 3}

# Compares the library's ext2fs_crc32c_le with libext2fs' own over every alignment and many lengths. The
# process runs with the library preloaded, as e2fsprogs does, so that it finds libext2fs' function next.
COMPARE = r"""
import ctypes, os, random, sys
real = ctypes.CDLL("libext2fs.so.2", mode=ctypes.RTLD_GLOBAL).ext2fs_crc32c_le
ours = ctypes.CDLL(sys.argv[1])
mine = ours.ext2fs_crc32c_le
for f in (real, mine):
    f.restype, f.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
rng = random.Random(7)
data = rng.randbytes(70000)
checked = 0
for start in range(16):
    for length in list(range(0, 300)) + [4096, 4096 + 7, 65536 + 3]:
        crc = rng.getrandbits(32)
        piece = data[start:start + length]
        if real(crc, piece, length) != mine(crc, piece, length):
            sys.exit(f"differs at start {start}, length {length}, crc {crc:#x}")
        checked += 1
distinct = ctypes.cast(real, ctypes.c_void_p).value != ctypes.cast(mine, ctypes.c_void_p).value
print(checked, ours.e2fscrc_uses_instruction(), distinct)
"""


@pytest.fixture(scope="module")
def library() -> str:
    """The library built with the package (pip install -e . builds it)."""
    found = e2fscrc.crc_library()
    assert found is not None, "the checksum library is not built (pip install -e . builds builder/sandbox/_e2fscrc*.so)"
    return found


def cpu_has_crc32_instruction() -> bool:
    """SSE4.2 in /proc/cpuinfo's flags (the instruction the library uses on x86-64)."""
    flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    return any(" sse4_2" in line for line in flags)


def test_checksums_are_libext2fs_own(library: str) -> None:
    res = subprocess.run([sys.executable, "-c", COMPARE, library], capture_output=True, text=True,
                         env=e2fscrc.with_crc_library(dict(os.environ)))
    assert res.returncode == 0, res.stdout + res.stderr
    checked, uses_instruction, distinct = res.stdout.split()
    assert (int(checked), distinct) == (16 * 303, "True")  # libext2fs' function against the library's
    # On this CPU the instruction must be what computed them (else the library would only slow e2fsprogs).
    assert uses_instruction == ("1" if cpu_has_crc32_instruction() else "0")


def test_mkfs_takes_its_checksums_from_the_library(library: str, tmp_path: Path) -> None:
    """The dynamic linker binds libext2fs' own calls to the library, not only mkfs's (LD_DEBUG=bindings)."""
    image = tmp_path / "x.img"
    image.write_bytes(b"")
    os.truncate(image, 64 << 20)
    env = e2fscrc.with_crc_library({**os.environ, "LD_DEBUG": "bindings"})
    res = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    bound = [line for line in res.stderr.splitlines() if "`ext2fs_crc32c_le'" in line]
    assert any("libext2fs.so" in line.split(" to ")[0] and library in line.split(" to ")[1] for line in bound), bound


def test_with_crc_library_keeps_what_was_preloaded(library: str) -> None:
    env = e2fscrc.with_crc_library({"LD_PRELOAD": "/lib/first.so"})
    assert env["LD_PRELOAD"] == f"/lib/first.so:{library}"


def prepare(spec: Path, image: Path, work: Path, **settings: str | None) -> None:
    """`python -m builder prepare` with these environment settings (None: unset)."""
    env = dict(os.environ)
    for key, value in settings.items():
        env.pop(key, None)
        if value is not None:
            env[key] = value
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image), "--work",
                          str(work)], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_images_are_the_bytes_of_stock_e2fsprogs(make_spec: SpecFactory, tmp_path: Path) -> None:
    """Every layout, with and without the stat shim: the same sha256 with the library as without it."""
    differing = []
    for layout in LAYOUTS:
        spec = make_spec(partitionTableType=layout, bootSize="128M")
        for shim in (None, "none"):
            digests = []
            for crc in (None, "none"):
                image = tmp_path / f"{layout}-{shim}-{crc}.img"
                prepare(spec, image, tmp_path / "work", MDI_STAT_SHIM=shim, MDI_E2FS_CRC=crc)
                digests.append(sha256(image))
                image.unlink()
            if digests[0] != digests[1]:
                differing.append((layout, shim))
    assert differing == []


@pytest.mark.slow
def test_settling_gives_the_bytes_of_stock_e2fsprogs(make_spec: SpecFactory, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The deterministic settling after the VM (tune2fs, e2fsck -fyD, debugfs) writes the same bytes with it."""
    image = tmp_path / "efi.img"
    prepare(make_spec(partitionTableType="efi", bootSize="128M"), image, tmp_path / "work", MDI_E2FS_CRC=None)
    offset = part_offset(image, ROOT_PARTITION["efi"])
    digests = []
    for crc in (None, "none"):
        copy = tmp_path / f"settled-{crc}.img"
        shutil.copyfile(image, copy)
        e2fscrc.crc_library.cache_clear()
        if crc is None:
            monkeypatch.delenv(e2fscrc.CRC_ENV, raising=False)
        else:
            monkeypatch.setenv(e2fscrc.CRC_ENV, crc)
        scratch = tmp_path / f"scratch-{crc}"
        scratch.mkdir()
        settle_ext(copy, offset, 1700000000, scratch)
        digests.append(sha256(copy))
    e2fscrc.crc_library.cache_clear()
    assert digests[0] == digests[1]
    fsck = subprocess.run(["e2fsck", "-fn", f"{tmp_path / 'settled-None.img'}?offset={offset}"], capture_output=True,
                          text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_a_library_that_is_not_a_file_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(make_spec()), "--image",
                          str(tmp_path / "x.img")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, e2fscrc.CRC_ENV: str(tmp_path / "missing.so")})
    assert res.returncode == 2, res.stderr
    assert e2fscrc.CRC_ENV in res.stderr and "missing.so" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x.img").exists()
