"""builder.inspection: on hand-made images with known values, and on prepared fixture images against DESIGN §3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder import rules
from builder.disk.convert import convert
from builder.errors import UserError
from builder.spec import load_spec
from builder.tools.inspect import inspect_image
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent
TABLE_TYPES = tuple(rules.tables())
MiB = 1024 * 1024
GPT_TAIL = 33 * 512  # backup GPT: 32 sectors of entries + 1 header

ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_GRUB = "21686148-6449-6E6F-744E-656564454649"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# nixpkgs' deterministic GUIDs. Its disk GUID lacks a digit; this is what sgdisk makes of it (builder/disk/layout.py,
# checked against sgdisk itself in tests/test_partition_tables.py).
DISK_GUID = "97FD5997-F390-0B4A-A3F8-D106C1723AEA"
PART1_GUID = "1C06F03B-704E-4657-B9CD-681A087A2FDC"
PART2_GUID = "970C694F-AFD0-4B99-B750-CDB7A329AB6F"
ROOT = "root"  # stands for the root partition's end (the disk end, less the backup GPT on these small disks)

# DESIGN §3 with the fixture's bootSize (64M; 128M for efixbootldr), which nixpkgs' round_to_nearest turns
# into ends at 65 and 129 MiB: number, start, end, type, GPT name, fs type, fs label, deterministic
# partition GUID ("rootGPUID" for the root). hybrid's bios_grub ends a sector past 1 MiB, as parted puts
# nixpkgs' `mkpart no-fs 0 1024KiB`.
EXPECTED: dict[str, list[tuple[int, int, int | str, str, str | None, str | None, str | None, str | None]]] = {
    "legacy": [(1, MiB, ROOT, "83", None, "ext4", "nixos", None)],
    "legacy+boot": [(1, MiB, 65 * MiB, "FAT", None, "vfat", "BOOT", None),
                    (2, 65 * MiB, ROOT, "83", None, "ext4", "nixos", None)],
    "legacy+gpt": [(1, MiB, 2 * MiB, BIOS_GRUB, "no-fs", None, None, PART1_GUID),
                   (2, 2 * MiB, ROOT, LINUX, "primary", "ext4", "nixos", "rootGPUID")],
    "efi": [(1, 8 * MiB, 65 * MiB, ESP, "ESP", "vfat", "ESP", PART1_GUID),
            (2, 65 * MiB, ROOT, LINUX, "primary", "ext4", "nixos", "rootGPUID")],
    "efixbootldr": [(1, 8 * MiB, 100 * MiB, ESP, "ESP", "vfat", "ESP", PART1_GUID),
                    (2, 100 * MiB, 129 * MiB, XBOOTLDR, "BOOT", "vfat", "BOOT", PART2_GUID),
                    (3, 129 * MiB, ROOT, LINUX, "ROOT", "ext4", "nixos", "rootGPUID")],
    "hybrid": [(1, 8 * MiB, 65 * MiB, ESP, "ESP", "vfat", "ESP", PART1_GUID),
               (2, 34 * 512, MiB + 512, BIOS_GRUB, "no-fs", None, None, PART2_GUID),
               (3, 65 * MiB, ROOT, LINUX, "primary", "ext4", "nixos", "rootGPUID")],
    "none": [],
}
FAT_MBR_TYPES = {"b", "c", "e", "6"}  # FAT32 (CHS/LBA), FAT16 LBA, FAT16


def prepare(spec: Path, image: Path) -> None:
    """Run the real CLI: python -m builder prepare SPEC --image IMAGE."""
    subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)], check=True,
                   cwd=REPO, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def prepared(make_spec: SpecFactory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every table type: (spec path, prepared raw image) of the closure fixture."""
    out = {}
    for table in TABLE_TYPES:
        extra = {"bootSize": "128M"} if table == "efixbootldr" else {}  # its ESP alone ends at 100 MiB
        spec = make_spec(partitionTableType=table, **extra)
        image = tmp_path_factory.mktemp("prepared") / "image.raw"
        prepare(spec, image)
        out[table] = (spec, image)
    return out


@pytest.mark.nix
@pytest.mark.parametrize("table", TABLE_TYPES)
def test_prepared_image_matches_the_spec(table: str, prepared: dict[str, tuple[Path, Path]]) -> None:
    spec_path, image = prepared[table]
    spec = load_spec(spec_path)
    report = inspect_image(image)
    size = image.stat().st_size
    assert report["format"] == "raw" and report["virtualSize"] == size
    gpt = table not in ("legacy", "legacy+boot", "none")
    assert report["table"] == ("gpt" if gpt else None if table == "none" else "dos")
    # parted ends a GPT's root partition at the last usable sector only on disks of at most 200 MiB (larger
    # ones end 1 MiB early, tests/test_partition_tables.py): these auto-sized images are that small.
    assert not gpt or size <= 200 * MiB
    root_end = size - GPT_TAIL if gpt else size
    parts = sorted(report["partitions"], key=lambda p: p["number"])
    assert len(parts) == len(EXPECTED[table])
    for part, (number, start, end, ptype, name, fs, label, guid) in zip(parts, EXPECTED[table], strict=True):
        assert (part["number"], part["start"], part["end"]) == (number, start, root_end if end == ROOT else end)
        if ptype == "FAT":
            assert part["type"] in FAT_MBR_TYPES and part["bootable"] is True
        else:
            assert part["type"] == ptype
        assert (part["name"], part["fsType"], part["label"]) == (name, fs, label)
        if gpt:
            assert part["guid"] == (spec.root_gpuid if guid == "rootGPUID" else guid)
        if fs == "vfat":
            assert part["freeBytes"] > 0
    if gpt:
        assert report["diskGuid"] == DISK_GUID
    root = report["root"]
    assert (root["fsType"], root["label"], root["uuid"]) == ("ext4", "nixos", spec.root_fsuid)
    assert root["offset"] == (EXPECTED[table][-1][1] if EXPECTED[table] else 0)
    assert root["blockSize"] == 4096
    assert root["blockCount"] * 4096 <= root_end - root["offset"]
    if table == "none":
        assert root["blockCount"] * 4096 == size
    assert root["freeBytes"] >= spec.additional_space, "auto size leaves at least additionalSpace free"
    assert root["freeBytes"] < spec.additional_space + 8 * MiB, "auto size is tight"


@pytest.mark.nix
def test_deterministic_images_are_identical(prepared: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    spec, first = prepared["efi"]
    again = tmp_path / "again.raw"
    prepare(spec, again)
    assert inspect_image(again) == inspect_image(first)
    subprocess.run(["cmp", str(first), str(again)], check=True)


@pytest.mark.nix
@pytest.mark.parametrize("fmt", ["qcow2-compressed", "vpc", "vhdx"])
def test_build_is_reproducible_in_every_pinned_format(fmt: str, prepared: dict[str, tuple[Path, Path]],
                                                      tmp_path: Path) -> None:
    spec_path, raw = prepared["efi"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**json.loads(spec_path.read_text()), "format": fmt}))
    images = []
    for run in ("a", "b"):
        done = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(tmp_path / run)],
                              check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        images.append(Path(done.stdout.strip()))
    subprocess.run(["cmp", str(images[0]), str(images[1])], check=True)
    assert {**inspect_image(images[0]), "format": "raw"} == inspect_image(raw)


@pytest.mark.nix
def test_non_deterministic_images_get_fresh_guids(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(deterministic=False, rootFSUID=None)
    reports = []
    for run in ("a.raw", "b.raw"):
        prepare(spec, tmp_path / run)
        reports.append(inspect_image(tmp_path / run))
    a, b = reports
    assert a["diskGuid"] != b["diskGuid"] and DISK_GUID not in (a["diskGuid"], b["diskGuid"])
    assert a["partitions"][-1]["guid"] != b["partitions"][-1]["guid"]
    assert a["root"]["uuid"] != b["root"]["uuid"]


@pytest.mark.nix
def test_converted_image_inspects_like_the_raw(prepared: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    spec_path, image = prepared["hybrid"]
    raw = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(raw)], check=True)
    doc = json.loads(spec_path.read_text())
    (tmp_path / "spec.json").write_text(json.dumps({**doc, "format": "vmdk"}))
    vmdk = convert(load_spec(tmp_path / "spec.json"), raw, tmp_path / "out")
    from_raw, from_vmdk = inspect_image(image), inspect_image(vmdk)
    assert from_vmdk["format"] == "vmdk"
    assert {**from_vmdk, "format": "raw"} == from_raw


def handmade_gpt(path: Path) -> dict[str, Any]:
    """A 40 MiB GPT image with known GUIDs, names and filesystems, made with sfdisk, mkfs.vfat and mkfs.ext4."""
    with path.open("wb") as f:
        f.truncate(40 * MiB)
    script = (
        "label: gpt\nlabel-id: 11111111-2222-3333-4444-555555555555\n"
        f"start=2048, size=16384, type={ESP}, uuid=AAAAAAAA-0000-4000-8000-000000000001, name=\"EFI stuff\"\n"
        f"start=18432, size={81920 - 34 + 1 - 18432}, type={LINUX}, uuid=AAAAAAAA-0000-4000-8000-000000000002,"
        " name=root, attrs=LegacyBIOSBootable\n"
    )
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    subprocess.run(["mkfs.vfat", "-n", "MYESP", "-i", "12345678", "--offset", "2048", str(path), str(16384 // 2)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs_uuid = "01234567-89ab-cdef-0123-456789abcdef"
    blocks = (40 * MiB - GPT_TAIL - 18432 * 512) // 4096
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "handmade", "-U", fs_uuid,
                    "-E", f"offset={18432 * 512}", str(path), str(blocks)], check=True)
    dumped = subprocess.run(["dumpe2fs", "-h", f"{path}?offset={18432 * 512}"], check=True, capture_output=True,
                            text=True).stdout
    free = int(next(line.split(":")[1] for line in dumped.splitlines() if line.startswith("Free blocks:")))
    return {"blocks": blocks, "free": free, "uuid": fs_uuid}


def test_inspect_handmade_gpt_image(tmp_path: Path) -> None:
    image = tmp_path / "hand.img"
    known = handmade_gpt(image)
    report = inspect_image(image)
    assert (report["table"], report["diskGuid"]) == ("gpt", "11111111-2222-3333-4444-555555555555")
    assert report["virtualSize"] == 40 * MiB
    p1, p2 = report["partitions"]
    assert (p1["number"], p1["start"], p1["size"], p1["type"]) == (1, MiB, 8 * MiB, ESP)
    assert (p1["guid"], p1["name"], p1["fsType"], p1["label"], p1["uuid"]) == (
        "AAAAAAAA-0000-4000-8000-000000000001", "EFI stuff", "vfat", "MYESP", "1234-5678")
    assert p2["number"] == 2 and p2["start"] == 18432 * 512 and p2["end"] == 40 * MiB - GPT_TAIL
    assert p2["attrs"] == "LegacyBIOSBootable" and p2["name"] == "root"
    root = report["root"]
    assert (root["fsType"], root["label"], root["uuid"]) == ("ext4", "handmade", known["uuid"])
    assert (root["blockSize"], root["blockCount"], root["freeBlocks"]) == (4096, known["blocks"], known["free"])
    assert root["freeBytes"] == known["free"] * 4096


def test_inspect_qcow2_and_blank_images(tmp_path: Path) -> None:
    image = tmp_path / "hand.img"
    handmade_gpt(image)
    qcow2 = tmp_path / "hand.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)], check=True)
    assert {**inspect_image(qcow2), "format": "raw"} == inspect_image(image)
    blank = tmp_path / "blank.img"
    with blank.open("wb") as f:
        f.truncate(4 * MiB)
    report = inspect_image(blank)
    assert (report["table"], report["partitions"], report["root"]["fsType"]) == (None, [], None)
    with pytest.raises(UserError, match="no such file"):
        inspect_image(tmp_path / "missing.img")


def test_cli_inspect_prints_json(tmp_path: Path) -> None:
    image = tmp_path / "hand.img"
    handmade_gpt(image)
    done = subprocess.run([sys.executable, "-m", "builder", "inspect", str(image)], check=True,
                          stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert json.loads(done.stdout)["root"]["label"] == "handmade"
