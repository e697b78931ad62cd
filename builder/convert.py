"""Write the finished raw image as `$out/<baseName>.<ext>` in the requested format, plus the Hydra product line.

raw is moved (renamed, or copied sparse-aware across filesystems); every other format goes through
`qemu-img convert -f raw -O <format>` (`-c` for qcow2-compressed, `-o force_size=on` for vpc so the
virtual size is the raw size exactly, not a CHS rounding). The image is written under a temporary
directory inside `out` with its final file name (vmdk embeds it) and renamed into place at the end, so
a failure leaves no partial image.

With `deterministic`, the identifiers qemu-img draws at random are pinned by patching header fields:
vdi image and last-snapshot UUIDs, vpc footer UUID and timestamp (footer checksum recomputed), vmdk
descriptor CID. The values derive from the spec (UUIDv5 of its canonical JSON), so rebuilding the same
spec gives the same bytes while different images still get different identities. raw, qcow2,
qcow2-compressed, qcow, qed and parallels hold no such fields (qemu-img convert writes in order by
default). Exception: vhdx holds random GUIDs (file, data and log write GUIDs) protected by CRC-32C in
its headers and log; they are not pinned, so vhdx images are not bit-for-bit reproducible.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path

from .errors import BuildError, UserError
from .log import info, step
from .spec import Spec

_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/makeDiskImage/builder/convert")
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the origin of VHD footer timestamps
VHD_FOOTER = 512
VDI_SIGNATURE = 0xBEDA107F
VDI_UUID_IMAGE = 0x188
VDI_UUID_LAST_SNAP = 0x198


def qemu_img_args(spec: Spec) -> list[str]:
    """The `qemu-img convert` arguments that select the output format for this spec (not raw)."""
    if spec.format == "qcow2-compressed":
        return ["-O", "qcow2", "-c"]
    if spec.format == "vpc":
        return ["-O", "vpc", "-o", "force_size=on"]
    return ["-O", spec.format]


def image_identity(spec: Spec, field: str) -> uuid.UUID:
    """A UUID fixed by the spec and the header field it fills: equal specs give equal images."""
    canonical = json.dumps(spec.raw, sort_keys=True, separators=(",", ":"))
    return uuid.uuid5(_ID_NAMESPACE, f"{field}\0{canonical}")


def _run_qemu_img(args: list[str]) -> str:
    """Run qemu-img; a failure becomes a BuildError carrying its stderr."""
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError("qemu-img is not on PATH (needed to write formats other than raw)") from None
    if done.returncode != 0:
        raise BuildError(f"qemu-img {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def virtual_size(path: Path, fmt: str) -> int:
    """The virtual size in bytes that qemu-img reads from an image."""
    return int(json.loads(_run_qemu_img(["info", "--output=json", "-f", fmt, str(path)]))["virtual-size"])


def _vhd_checksum(footer: bytes) -> int:
    """VHD footer checksum: one's complement of the byte sum with the checksum field (64..67) zeroed."""
    return ~sum(footer[:64] + b"\0\0\0\0" + footer[68:]) & 0xFFFFFFFF


def pin_vpc(path: Path, timestamp: int, unique_id: uuid.UUID) -> None:
    """Set the VHD footer timestamp (seconds since 2000) and unique id in both footer copies; fix checksums."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        for offset in (0, size - VHD_FOOTER):
            f.seek(offset)
            footer = bytearray(f.read(VHD_FOOTER))
            if footer[:8] != b"conectix":
                continue  # fixed VHDs have no copy at offset 0
            struct.pack_into(">I", footer, 24, timestamp)
            footer[68:84] = unique_id.bytes
            struct.pack_into(">I", footer, 64, _vhd_checksum(bytes(footer)))
            f.seek(offset)
            f.write(footer)


def pin_vdi(path: Path, image_uuid: uuid.UUID, last_snap_uuid: uuid.UUID) -> None:
    """Set the VDI header's image and last-snapshot UUIDs (stored little-endian, as VirtualBox does)."""
    with path.open("r+b") as f:
        f.seek(0x40)
        (signature,) = struct.unpack("<I", f.read(4))
        if signature != VDI_SIGNATURE:
            raise BuildError(f"{path}: not a VDI image (signature {signature:#x})")
        f.seek(VDI_UUID_IMAGE)
        f.write(image_uuid.bytes_le)
        f.seek(VDI_UUID_LAST_SNAP)
        f.write(last_snap_uuid.bytes_le)


def pin_vmdk(path: Path, cid: int) -> None:
    """Set the CID in the descriptor embedded in a monolithicSparse VMDK (qemu writes it unpadded: `%x`)."""
    with path.open("r+b") as f:
        header = f.read(512)
        if header[:4] != b"KDMV":
            raise BuildError(f"{path}: not a sparse VMDK (no KDMV magic)")
        desc_offset, desc_size = struct.unpack_from("<QQ", header, 28)
        f.seek(desc_offset * 512)
        desc = f.read(desc_size * 512)
        new, count = re.subn(rb"^CID=[0-9a-fA-F]{1,8}$", b"CID=%08x" % cid, desc, count=1, flags=re.MULTILINE)
        if count != 1:
            raise BuildError(f"{path}: no CID line in the VMDK descriptor")
        # The descriptor area is NUL-padded text: keep its size, the line may have grown by up to 7 bytes.
        if new[len(desc):].strip(b"\0"):
            raise BuildError(f"{path}: no room for the CID in the VMDK descriptor")
        new = new[:len(desc)].ljust(len(desc), b"\0")
        f.seek(desc_offset * 512)
        f.write(new)


def pin_identifiers(spec: Spec, image: Path) -> None:
    """Replace the random identifiers qemu-img wrote into vdi, vpc and vmdk headers by spec-derived ones."""
    if spec.format == "vdi":
        pin_vdi(image, image_identity(spec, "vdi-image"), image_identity(spec, "vdi-last-snap"))
    elif spec.format == "vpc":
        pin_vpc(image, max(0, spec.source_date_epoch - VHD_EPOCH), image_identity(spec, "vpc-unique-id"))
    elif spec.format == "vmdk":
        pin_vmdk(image, image_identity(spec, "vmdk-cid").int & 0xFFFFFFFF)
    elif spec.format == "vhdx":
        info("vhdx headers keep qemu-img's random GUIDs: this image is not bit-for-bit reproducible")


def _move_raw(raw: Path, dest: Path) -> None:
    """Move raw to dest: rename when on one filesystem, else copy keeping holes and remove the source."""
    try:
        os.replace(raw, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise BuildError(f"cannot move {raw} to {dest}: {exc}") from None
    done = subprocess.run(["cp", "--sparse=always", "--", str(raw), str(dest)], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise BuildError(f"cannot copy {raw} to {dest}: {done.stderr.strip()}")
    raw.unlink()


def _write_image(spec: Spec, raw: Path, dest: Path) -> None:
    """Write dest (a temporary name) from raw in spec.format, checked and with identifiers pinned."""
    if spec.format == "raw":
        _move_raw(raw, dest)
        return
    _run_qemu_img(["convert", "-f", "raw", *qemu_img_args(spec), str(raw), str(dest)])
    if spec.format == "vpc":
        want, got = raw.stat().st_size, virtual_size(dest, "vpc")
        if want != got:
            raise BuildError(f"vpc image has virtual size {got} bytes, the raw image has {want}")
    if spec.deterministic:
        pin_identifiers(spec, dest)


def convert(spec: Spec, raw: Path, out: Path) -> Path:
    """Write out/<spec.image_file_name> from the raw image, append the Hydra product line, return its path."""
    if not raw.is_file():
        raise UserError(f"--image {str(raw)!r}: no such raw image file")
    out = out.absolute()
    final = out / spec.image_file_name
    with step(f"convert to {spec.format} as {final.name}"):
        out.mkdir(parents=True, exist_ok=True)
        if not (spec.format == "raw" and raw.absolute() == final):  # else already in place
            tmpdir = Path(tempfile.mkdtemp(prefix=".convert-", dir=out))
            try:
                tmp = tmpdir / final.name
                _write_image(spec, raw, tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        support = out / "nix-support"
        support.mkdir(exist_ok=True)
        with (support / "hydra-build-products").open("a") as products:
            products.write(f"file {spec.hydra_format}-image {final}\n")
    return final
