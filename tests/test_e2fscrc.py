"""The checksum library e2fsprogs runs with (builder/sandbox/e2fscrc.c): libext2fs' checksums, the same image bytes.

The oracle is Debian's libext2fs itself: its own ext2fs_crc32c_le for the function, and mkfs.ext4,
debugfs, e2fsck and tune2fs without the library for the images.
"""

from __future__ import annotations

import os
import platform
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

# Compares the library's ext2fs_crc32c_le with libext2fs' own at every alignment (addresses inside one
# buffer) and many lengths. How the process finds libext2fs is argv[2]: "preloaded", as e2fsprogs runs (the
# library in LD_PRELOAD, libext2fs after it in the global scope); "private", libext2fs loaded before it
# with RTLD_LOCAL (out of RTLD_NEXT's reach); "alone", the library choosing before any libext2fs is loaded
# (it then checks the instruction against the CRC's definition, and libext2fs is loaded only to compare).
COMPARE = r"""
import ctypes, random, sys
library, how = sys.argv[1], sys.argv[2]
signature = (ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t])
def function(lib):
    f = lib.ext2fs_crc32c_le
    f.restype, f.argtypes = signature
    return f
if how == "alone":
    ours = ctypes.CDLL(library)
    mine = function(ours)
    mine(0, None, 0)  # chooses now, with no libext2fs in the process
    real = function(ctypes.CDLL("libext2fs.so.2"))
else:
    real = function(ctypes.CDLL("libext2fs.so.2", mode=ctypes.RTLD_GLOBAL if how == "preloaded" else 0))
    ours = ctypes.CDLL(library)
    mine = function(ours)
rng = random.Random(7)
data = ctypes.create_string_buffer(rng.randbytes(70000), 70000)
base = ctypes.addressof(data)
checked = 0
for start in range(16):
    for length in list(range(0, 300)) + [4096, 4096 + 7, 65536 + 3]:
        crc = rng.getrandbits(32)
        if real(crc, base + start, length) != mine(crc, base + start, length):
            sys.exit(f"differs at address offset {start}, length {length}, crc {crc:#x}")
        checked += 1
check = ctypes.create_string_buffer(b"123456789", 9)
standard = mine(0xFFFFFFFF, ctypes.addressof(check), 9) ^ 0xFFFFFFFF  # CRC-32C's published check value
distinct = ctypes.cast(real, ctypes.c_void_p).value != ctypes.cast(mine, ctypes.c_void_p).value
print(checked, ours.e2fscrc_uses_instruction(), distinct, hex(standard))
"""
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="the library defines nothing elsewhere")


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


@x86_64_only
@pytest.mark.parametrize("how", ["preloaded", "private", "alone"])
def test_checksums_are_libext2fs_own(library: str, how: str) -> None:
    env = e2fscrc.with_crc_library(dict(os.environ)) if how == "preloaded" else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", COMPARE, library, how], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    checked, uses_instruction, distinct, standard = res.stdout.split()
    # libext2fs' function against the library's, and the check value every CRC-32C gives for "123456789"
    assert (int(checked), distinct, standard) == (16 * 303, "True", "0xe3069283")
    # On this CPU the instruction must be what computed them (else the library would only slow e2fsprogs).
    assert uses_instruction == ("1" if cpu_has_crc32_instruction() else "0")


@x86_64_only
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


E2FSPROGS_WRITERS = {"mkfs.ext4", "e2fsck", "tune2fs", "debugfs"}


def preloads_of(argv: list[str], env: dict[str, str] | None) -> tuple[str, str] | None:
    """(tool, LD_PRELOAD it runs with) when argv runs e2fsprogs' mkfs, e2fsck, tune2fs or a writing debugfs.

    LD_PRELOAD is the environment's or, through env(1) inside the namespace helper's argv, the argument's.
    """
    for i, arg in enumerate(argv):
        tool = os.path.basename(arg)
        if tool in E2FSPROGS_WRITERS and (tool != "debugfs" or "-w" in argv[i:]):
            given = [a.split("=", 1)[1] for a in argv[:i] if a.startswith("LD_PRELOAD=")]
            return tool, given[-1] if given else (env or os.environ).get("LD_PRELOAD", "")
    return None


@x86_64_only
@pytest.mark.slow
def test_every_e2fsprogs_tool_runs_with_the_library(library: str, make_spec: SpecFactory, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare (mkfs probes, mkfs -d, debugfs, e2fsck) and the settling after the VM (tune2fs, e2fsck, debugfs)."""
    from builder.pipeline import prepare_image
    from builder.spec import load_spec

    seen: list[tuple[str, str]] = []
    real_run = subprocess.run

    def recording(argv: list[str], *args: object, **kwargs: object) -> object:
        found = preloads_of(list(argv), kwargs.get("env"))  # type: ignore[arg-type]
        if found:
            seen.append(found)
        return real_run(argv, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", recording)
    image = tmp_path / "efi.img"
    prepare_image(load_spec(make_spec(partitionTableType="efi", bootSize="128M")), image, tmp_path / "work")
    (tmp_path / "scratch").mkdir()
    settle_ext(image, part_offset(image, ROOT_PARTITION["efi"]), 1700000000, tmp_path / "scratch")
    assert {tool for tool, _ in seen} == E2FSPROGS_WRITERS
    assert [(tool, preload) for tool, preload in seen if library not in preload.split(":")] == []


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


def test_a_path_the_loader_would_split_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    odd = tmp_path / "a b:c.so"
    odd.write_bytes(b"")
    res = subprocess.run([sys.executable, "-m", "builder", "prepare", str(make_spec()), "--image",
                          str(tmp_path / "x.img")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, e2fscrc.CRC_ENV: str(odd)})
    assert res.returncode == 2, res.stderr
    assert e2fscrc.CRC_ENV in res.stderr and "spaces and colons" in res.stderr
    assert not (tmp_path / "x.img").exists()


@pytest.mark.slow
def test_a_library_the_loader_refuses_changes_nothing(make_spec: SpecFactory, tmp_path: Path) -> None:
    """ld.so only warns about a file it cannot preload; debugfs' error parsing must not take that for a failure."""
    not_elf = tmp_path / "not-elf.so"
    not_elf.write_text("not a library\n")
    spec = make_spec(partitionTableType="efi", bootSize="128M")
    prepare(spec, tmp_path / "refused.img", tmp_path / "work", MDI_E2FS_CRC=str(not_elf))
    prepare(spec, tmp_path / "stock.img", tmp_path / "work", MDI_E2FS_CRC="none")
    assert sha256(tmp_path / "refused.img") == sha256(tmp_path / "stock.img")
