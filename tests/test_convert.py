"""builder.convert checked by qemu-img: every format checks clean, compares identical, is named as nixpkgs does."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from builder import rules
from builder.crc32c import crc32c
from builder.disk.convert import convert
from builder.disk.image_ids import fix_vmdk
from builder.errors import BuildError, UserError
from builder.spec import Spec, load_spec_document

FORMATS = tuple(rules.formats())

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
RAW_SIZE = 64 * MiB
ROOT_START = 10 * MiB
GUID = "F222513B-DED1-49FA-B591-20CE86A2FE7F"

EXTENSIONS = {
    "raw": "img", "qcow2": "qcow2", "qcow2-compressed": "qcow2", "vdi": "vdi", "vpc": "vhd",
    "vmdk": "vmdk", "vhdx": "vhdx", "qed": "qed", "qcow": "qcow", "parallels": "parallels",
}
# What `qemu-img info` calls the written format.
DRIVER = {**{f: f for f in FORMATS}, "qcow2-compressed": "qcow2"}
# Formats whose qemu-img driver implements `qemu-img check` (the others answer exit 63, "not supported").
CHECKABLE = {"qcow2", "qcow2-compressed", "vdi", "vmdk", "vhdx", "qed", "parallels"}


def convert_doc(**overrides: Any) -> dict[str, Any]:
    """A minimal valid spec document; convert reads only format, baseName and deterministic (and hashes all)."""
    doc: dict[str, Any] = {
        "specVersion": 1, "name": "convert-test", "baseName": "nixos", "format": "raw",
        "partitionTableType": "efi", "fsType": "ext4", "label": "nixos", "diskSize": 64,
        "additionalSpace": "512M", "bootSize": "9M", "contents": [], "installBootLoader": False,
        "touchEFIVars": False, "efiFirmware": None, "efiVariables": None, "configFile": None, "postVM": "",
        "memSize": 1024, "onlyNixStore": False, "deterministic": True, "rootGPUID": GUID, "rootFSUID": GUID,
        "copyChannel": False,
        "system": {"toplevel": "/nix/store/00000000000000000000000000000000-toplevel",
                   "closureInfo": "/nix/store/00000000000000000000000000000000-closure-info",
                   "channel": None, "additionalPaths": [], "storeDir": "/nix/store"},
        "bootLoader": {"grubDevices": []}, "sourceDateEpoch": 1700000000, "enterCommand": "chroot",
    }
    doc.update(overrides)
    return doc


def convert_spec(**overrides: Any) -> Spec:
    """A validated Spec with the overrides applied."""
    return load_spec_document(convert_doc(**overrides))


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB GPT disk with an ESP-typed p1 and an ext4 p2 holding a few files (made by sfdisk and mkfs.ext4)."""
    d = tmp_path_factory.mktemp("raw")
    tree = d / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("convert-test\n")
    (tree / "data").write_bytes(bytes(range(256)) * 4096 * 2)  # 2 MiB, compressible
    img = d / "disk.img"
    with img.open("wb") as f:
        f.truncate(RAW_SIZE)
    table = f"label: gpt\nstart=2048, size=16384, type=U\nstart={ROOT_START // 512}, size=100352, type=L\n"
    subprocess.run(["sfdisk", "-q", str(img)], input=table, text=True, check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "nixos", "-d", str(tree),
                    "-E", f"offset={ROOT_START}", str(img), str(100352 * 512 // 4096)], check=True)
    return img


def fresh_raw(raw_image: Path, where: Path) -> Path:
    """A private sparse copy of the shared raw image (convert moves or consumes its input)."""
    where.mkdir(parents=True, exist_ok=True)
    copy = where / "input.img"
    subprocess.run(["cp", "--sparse=always", str(raw_image), str(copy)], check=True)
    return copy


def qemu_img_json(*args: str) -> dict[str, Any]:
    """Run qemu-img with --output=json and parse it."""
    out = subprocess.run(["qemu-img", *args, "--output=json"], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_valid_and_identical_to_the_raw_image(fmt: str, raw_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    image = convert(convert_spec(format=fmt), fresh_raw(raw_image, tmp_path / "in"), out)
    assert image == out / f"nixos.{EXTENSIONS[fmt]}"
    assert sorted(p.name for p in out.iterdir()) == sorted([image.name, "nix-support"]), "no temporary left over"
    info = qemu_img_json("info", str(image))
    assert info["format"] == DRIVER[fmt]
    assert info["virtual-size"] == RAW_SIZE
    check = subprocess.run(["qemu-img", "check", str(image)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    if fmt in CHECKABLE:
        assert check.returncode == 0, check.stdout
        assert "No errors were found on the image." in check.stdout
    else:
        assert check.returncode == 63 and "does not support checks" in check.stdout
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", DRIVER[fmt], str(raw_image), str(image)], check=True)
    hydra = "qcow2" if fmt == "qcow2-compressed" else fmt
    assert (out / "nix-support" / "hydra-build-products").read_text() == f"file {hydra}-image {image}\n"


def test_qcow2_compressed_has_compressed_clusters(raw_image: Path, tmp_path: Path) -> None:
    image = convert(convert_spec(format="qcow2-compressed"), fresh_raw(raw_image, tmp_path), tmp_path / "out")
    check = qemu_img_json("check", str(image))
    assert check["compressed-clusters"] > 0
    plain = convert(convert_spec(format="qcow2"), fresh_raw(raw_image, tmp_path), tmp_path / "plain")
    assert qemu_img_json("check", str(plain)).get("compressed-clusters", 0) == 0


def test_raw_is_moved_and_stays_sparse(raw_image: Path, tmp_path: Path) -> None:
    src = fresh_raw(raw_image, tmp_path / "in")
    image = convert(convert_spec(format="raw"), src, tmp_path / "out")
    assert not src.exists()
    assert image.stat().st_size == RAW_SIZE
    assert image.stat().st_blocks * 512 < RAW_SIZE // 2
    subprocess.run(["cmp", str(raw_image), str(image)], check=True)


def test_raw_moves_across_filesystems_sparse(raw_image: Path, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "needs /dev/shm on another filesystem than the tmp dir"
    where = Path(tempfile.mkdtemp(dir=shm, prefix="mdi-convert-"))
    try:
        src = fresh_raw(raw_image, where)
        image = convert(convert_spec(format="raw"), src, tmp_path / "out")
        assert not src.exists()
        assert image.stat().st_blocks * 512 < RAW_SIZE // 2
        subprocess.run(["cmp", str(raw_image), str(image)], check=True)
    finally:
        shutil.rmtree(where)


def test_hydra_products_are_written_whole(raw_image: Path, tmp_path: Path) -> None:
    """The products file is this build's (issue 12: appending gave a rebuild two lines), as in a fresh $out."""
    out = tmp_path / "out"
    (out / "nix-support").mkdir(parents=True)
    (out / "nix-support" / "hydra-build-products").write_text("file other /nix/store/x\n")
    image = convert(convert_spec(format="vpc", baseName="disk"), fresh_raw(raw_image, tmp_path), out)
    assert (out / "nix-support" / "hydra-build-products").read_text() == f"file vpc-image {out}/disk.vhd\n"
    assert image == out / "disk.vhd"
    assert sorted(os.listdir(out)) == ["disk.vhd", "nix-support"]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "raw"])
def test_deterministic_conversions_are_bit_identical(fmt: str, raw_image: Path, tmp_path: Path) -> None:
    spec = convert_spec(format=fmt)
    first = convert(spec, fresh_raw(raw_image, tmp_path), tmp_path / "a")
    second = convert(spec, fresh_raw(raw_image, tmp_path), tmp_path / "b")
    subprocess.run(["cmp", str(first), str(second)], check=True)


@pytest.mark.parametrize("fmt", ["vdi", "vpc", "vmdk", "vhdx"])
def test_pinned_identifiers_differ_between_specs(fmt: str, raw_image: Path, tmp_path: Path) -> None:
    a = convert(convert_spec(format=fmt), fresh_raw(raw_image, tmp_path), tmp_path / "a")
    b = convert(convert_spec(format=fmt, name="another-image"), fresh_raw(raw_image, tmp_path), tmp_path / "b")
    assert a.read_bytes() != b.read_bytes()
    subprocess.run(["qemu-img", "compare", str(a), str(b)], check=True)


def test_vpc_footer_time_is_source_date_epoch(raw_image: Path, tmp_path: Path) -> None:
    image = convert(convert_spec(format="vpc"), fresh_raw(raw_image, tmp_path), tmp_path / "out")
    described = subprocess.run(["file", "-b", str(image)], check=True, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TZ": "UTC"}).stdout
    assert "Tue Nov 14 22:13:20 2023" in described  # date -u -d @1700000000
    assert f"{RAW_SIZE} bytes" in described


def fake_qemu_img(bindir: Path, script: str) -> dict[str, str]:
    """An environment whose PATH starts with a qemu-img shell script wrapping the real one."""
    bindir.mkdir(parents=True, exist_ok=True)
    real = shutil.which("qemu-img")
    assert real is not None
    tool = bindir / "qemu-img"
    tool.write_text(f"#!/bin/sh\nREAL={real}\n{script}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


def test_failed_conversion_leaves_no_partial_image(raw_image: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # qemu-img writes half an output file, then fails (as when the disk fills up).
    env = fake_qemu_img(tmp_path / "bin", 'for a; do last=$a; done\nhead -c 1000000 /dev/zero > "$last"\n'
                        'echo "qemu-img: write failed: No space left on device" >&2\nexit 1')
    monkeypatch.setenv("PATH", env["PATH"])
    src = fresh_raw(raw_image, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError, match="No space left on device"):
        convert(convert_spec(format="qcow2"), src, out)
    assert list(out.iterdir()) == [], "no image, no temporary, no hydra line"
    assert src.exists()


def test_vpc_with_a_wrong_virtual_size_fails(raw_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A qemu-img that ignores force_size=on rounds the size to CHS geometry: convert must notice.
    env = fake_qemu_img(tmp_path / "bin", 'if [ "$1" = convert ]; then\n'
                        '  exec "$REAL" convert -f raw -O vpc "$8" "$9"\nfi\nexec "$REAL" "$@"')
    monkeypatch.setenv("PATH", env["PATH"])
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=f"virtual size 67125248 bytes, the raw image has {RAW_SIZE}"):
        convert(convert_spec(format="vpc"), fresh_raw(raw_image, tmp_path / "in"), out)
    assert not out.exists(), "out did not exist before the failed conversion: it does not exist after"


def test_missing_raw_image_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such raw image"):
        convert(convert_spec(format="qcow2"), tmp_path / "missing.img", tmp_path / "out")


def test_cli_convert(raw_image: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(convert_doc(format="qcow2", baseName="cli")))
    done = subprocess.run(
        [sys.executable, "-m", "builder", "convert", str(spec), "--image", str(fresh_raw(raw_image, tmp_path)),
         "--out", str(tmp_path / "out")], check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert done.stdout.strip() == str(tmp_path / "out" / "cli.qcow2")
    subprocess.run(["qemu-img", "compare", "-f", "raw", str(raw_image), done.stdout.strip()], check=True)


def test_vmdk_cid_of_any_width_is_pinned(raw_image: Path, tmp_path: Path) -> None:
    # qemu-img prints the random CID with %x, so it has 1 to 8 digits; pinning must handle every width.
    image = convert(convert_spec(format="vmdk", deterministic=False, rootFSUID=None), fresh_raw(raw_image, tmp_path),
                    tmp_path / "out")
    data = bytearray(image.read_bytes())
    line_at = data.index(b"\nCID=") + 1
    line_end = data.index(b"\n", line_at)
    text_end = data.index(b"\0", line_at)  # the descriptor text is NUL-padded to its sectors
    shrink = (line_end - line_at) - len(b"CID=a1")
    image.write_bytes(data[:line_at] + b"CID=a1" + data[line_end:text_end] + b"\0" * shrink + data[text_end:])
    assert image.stat().st_size == len(data)
    assert subprocess.run(["qemu-img", "check", str(image)]).returncode == 0, "still a valid vmdk with a short CID"
    fix_vmdk(image, 0x0123ABCD)
    lines = image.read_bytes()[line_at:text_end + 16].split(b"\n")
    assert lines[0] == b"CID=0123abcd" and lines[1] == b"parentCID=ffffffff"
    subprocess.run(["qemu-img", "check", str(image)], check=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(raw_image), str(image)], check=True)


def qemu_write_cid(area: bytes, cid: int) -> bytes:
    """qemu's block/vmdk.c vmdk_write_cid on a descriptor area: the CID rewritten in place with %x, the text
    from parentCID appended after it, the rest of the area (old bytes included) left as it was."""
    desc = bytearray(area)
    desc[-1] = 0
    current = bytes(desc).split(b"\0", 1)[0]  # strstr stops at the terminator
    tail = current[current.index(b"parentCID"):]
    at = current.index(b"CID") + len(b"CID=")
    text = (b"%x\n" % cid + tail + b"\0")[:len(desc) - at]  # snprintf and pstrcat stop at DESC_SIZE
    desc[at:at + len(text)] = text
    return bytes(desc)


def test_vmdk_leftovers_of_a_shorter_cid_are_dropped(raw_image: Path, tmp_path: Path) -> None:
    # qemu-img draws a CID at creation and another at the first write, rewriting the descriptor in place:
    # a second CID two or more digits shorter leaves the old text's last bytes behind the new NUL (seen as
    # a 1-in-hundreds difference between two deterministic builds). Pinning must give the same bytes anyway.
    image = convert(convert_spec(format="vmdk", deterministic=False, rootFSUID=None), fresh_raw(raw_image, tmp_path),
                    tmp_path / "out")
    data = image.read_bytes()
    desc_offset, desc_size = struct.unpack_from("<QQ", data, 28)
    start, end = desc_offset * 512, (desc_offset + desc_size) * 512
    # Both start from one clean descriptor with a one-digit CID, whatever qemu-img drew for this image.
    text = re.sub(rb"^CID=[0-9a-fA-F]+$", b"CID=1", data[start:end].split(b"\0", 1)[0], flags=re.MULTILINE)
    clean = text.ljust(end - start, b"\0")
    images = {}
    for name, cids in (("long-then-short", (0xFEDCBA98, 0xA1)), ("short", (0xA1,))):
        area = clean
        for cid in cids:
            area = qemu_write_cid(area, cid)
        images[name] = tmp_path / f"{name}.vmdk"
        images[name].write_bytes(data[:start] + area + data[end:])
        checked = subprocess.run(["qemu-img", "check", str(images[name])])
        assert checked.returncode == 0, "a valid vmdk, as qemu leaves it"
    left = images["long-then-short"].read_bytes()[start:end]
    assert left.split(b"\0", 1)[1].strip(b"\0"), "the simulated rewrite leaves bytes behind the terminator"
    for path in images.values():
        fix_vmdk(path, 0x0123ABCD)
    assert images["long-then-short"].read_bytes() == images["short"].read_bytes()
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(raw_image), str(images["short"])], check=True)


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue check value


def test_both_pinned_vhdx_headers_verify(raw_image: Path, tmp_path: Path) -> None:
    # qemu opens a VHDX through whichever header has a valid CRC-32C and the higher sequence number: break
    # one header at a time, and the other alone must still open the image and hold the same disk.
    image = convert(convert_spec(format="vhdx"), fresh_raw(raw_image, tmp_path), tmp_path / "out")
    for offset in (64 * 1024, 128 * 1024):
        broken = tmp_path / f"broken-{offset}.vhdx"
        data = bytearray(image.read_bytes())
        data[offset + 8] ^= 0xFF  # sequence number: the CRC no longer matches
        broken.write_bytes(bytes(data))
        subprocess.run(["qemu-img", "check", str(broken)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vhdx", str(raw_image), str(broken)], check=True)
    both = bytearray(image.read_bytes())
    both[64 * 1024 + 8] ^= 0xFF
    both[128 * 1024 + 8] ^= 0xFF
    (tmp_path / "both.vhdx").write_bytes(bytes(both))
    assert subprocess.run(["qemu-img", "info", str(tmp_path / "both.vhdx")], capture_output=True).returncode != 0
