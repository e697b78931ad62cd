"""Pin the identifiers qemu-img draws at random into vdi, vpc, vmdk and vhdx headers, for reproducible images.

Each value derives from the spec (UUIDv5 of its canonical JSON and the field's name), so rebuilding one
spec gives the same bytes while different images still get different identities (VirtualBox refuses
two disks with one UUID). Checksums covering patched fields are recomputed: the VHD footer sum, and
VHDX CRC-32C of both headers and of every log entry. raw, qcow2, qcow, qed and parallels hold no such
fields (and qemu-img convert writes in order unless given -W), so they need nothing.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from pathlib import Path

from ..crc32c import crc32c
from ..errors import BuildError
from ..spec import Spec

_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/makeDiskImage/builder/convert")
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the origin of VHD footer timestamps
VHD_FOOTER = 512
VDI_SIGNATURE = 0xBEDA107F
VDI_UUID_IMAGE = 0x188
VDI_UUID_LAST_SNAP = 0x198
VHDX_HEADERS = (64 * 1024, 128 * 1024)
VHDX_HEADER_SIZE = 4096
VHDX_REGION_TABLE = 192 * 1024
VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")  # the virtual disk id


def image_identity(spec: Spec, field: str) -> uuid.UUID:
    """A UUID fixed by the spec and the header field it fills: equal specs give equal images."""
    canonical = json.dumps(spec.raw, sort_keys=True, separators=(",", ":"))
    return uuid.uuid5(_ID_NAMESPACE, f"{field}\0{canonical}")


def _vhd_checksum(footer: bytes) -> int:
    """VHD footer checksum: one's complement of the byte sum with the checksum field (64..67) zeroed."""
    return ~sum(footer[:64] + b"\0\0\0\0" + footer[68:]) & 0xFFFFFFFF


def fix_vpc(path: Path, timestamp: int, unique_id: uuid.UUID) -> None:
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


def fix_vdi(path: Path, image_uuid: uuid.UUID, last_snap_uuid: uuid.UUID) -> None:
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


def fix_vmdk(path: Path, cid: int) -> None:
    """Set the CID in the descriptor embedded in a monolithicSparse VMDK (qemu writes it unpadded: `%x`).

    The descriptor is a NUL-terminated string in its sectors. qemu-img writes a random CID when it creates
    the file and another on the first write (block/vmdk.c: vmdk_write_cid, called once per open from
    vmdk_pwritev), rewriting the text in place: when the second CID has fewer digits, the old text's last
    bytes stay behind the new terminator. Only the text up to the first NUL is kept, then NUL padding.
    """
    with path.open("r+b") as f:
        header = f.read(512)
        if header[:4] != b"KDMV":
            raise BuildError(f"{path}: not a sparse VMDK (no KDMV magic)")
        desc_offset, desc_size = struct.unpack_from("<QQ", header, 28)
        f.seek(desc_offset * 512)
        area = f.read(desc_size * 512)
        text = area.split(b"\0", 1)[0]
        new, count = re.subn(rb"^CID=[0-9a-fA-F]{1,8}$", b"CID=%08x" % cid, text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise BuildError(f"{path}: no CID line in the VMDK descriptor")
        # The line may have grown by up to 7 bytes: the text and its terminator must still fit the area.
        if len(new) >= len(area):
            raise BuildError(f"{path}: no room for the CID in the VMDK descriptor")
        f.seek(desc_offset * 512)
        f.write(new.ljust(len(area), b"\0"))


def _checked_vhdx_block(path: Path, block: bytes, what: str) -> bytearray:
    """A VHDX structure whose CRC-32C (bytes 4..7) verifies, ready to patch; anything else is not ours to edit."""
    stored = struct.unpack_from("<I", block, 4)[0]
    if crc32c(block[:4] + b"\0\0\0\0" + block[8:]) != stored:
        raise BuildError(f"{path}: VHDX {what} checksum does not verify; not patching an unknown layout")
    return bytearray(block)


def _seal_vhdx_block(block: bytearray) -> bytes:
    """Recompute a VHDX structure's CRC-32C into bytes 4..7."""
    struct.pack_into("<I", block, 4, 0)
    struct.pack_into("<I", block, 4, crc32c(bytes(block)))
    return bytes(block)


def fix_vhdx(path: Path, file_write: uuid.UUID, data_write: uuid.UUID, log: uuid.UUID, disk_id: uuid.UUID) -> None:
    """Set VHDX header GUIDs (sequence numbers rebased to 1, order kept), log entry GUIDs and the disk id."""
    with path.open("r+b") as f:
        headers = []
        for offset in VHDX_HEADERS:
            f.seek(offset)
            block = f.read(VHDX_HEADER_SIZE)
            if block[:4] != b"head":
                raise BuildError(f"{path}: no VHDX header at {offset:#x}")
            headers.append(_checked_vhdx_block(path, block, f"header at {offset:#x}"))
        base = min(struct.unpack_from("<Q", h, 8)[0] for h in headers) - 1
        active = max(headers, key=lambda h: struct.unpack_from("<Q", h, 8)[0])
        log_length, log_offset = struct.unpack_from("<IQ", active, 68)
        for offset, header in zip(VHDX_HEADERS, headers, strict=True):
            struct.pack_into("<Q", header, 8, struct.unpack_from("<Q", header, 8)[0] - base)
            header[16:32] = file_write.bytes_le
            header[32:48] = data_write.bytes_le
            if any(header[48:64]):  # a pending log: keep header and entries pointing at one GUID
                header[48:64] = log.bytes_le
            f.seek(offset)
            f.write(_seal_vhdx_block(header))

        position, end = log_offset, log_offset + log_length
        while position < end:
            f.seek(position)
            head = f.read(64)
            length = struct.unpack_from("<I", head, 8)[0] if head[:4] == b"loge" else 0
            if length == 0 or length % 4096 or position + length > end:
                position += 4096
                continue
            f.seek(position)
            entry = _checked_vhdx_block(path, f.read(length), f"log entry at {position:#x}")
            entry[32:48] = log.bytes_le
            f.seek(position)
            f.write(_seal_vhdx_block(entry))
            position += length

        f.seek(VHDX_REGION_TABLE)
        regions = f.read(64 * 1024)
        (count,) = struct.unpack_from("<I", regions, 8)
        for i in range(count):
            guid, region_offset = struct.unpack_from("<16sQ", regions, 16 + 32 * i)
            if uuid.UUID(bytes_le=guid) == VHDX_METADATA_REGION:
                break
        else:
            raise BuildError(f"{path}: no VHDX metadata region")
        f.seek(region_offset)
        table = f.read(64 * 1024)
        if table[:8] != b"metadata":
            raise BuildError(f"{path}: no VHDX metadata table at {region_offset:#x}")
        (entries,) = struct.unpack_from("<H", table, 10)
        for i in range(entries):
            guid, item_offset, item_length = struct.unpack_from("<16sII", table, 32 + 32 * i)
            if uuid.UUID(bytes_le=guid) == VHDX_PAGE83 and item_length == 16:
                f.seek(region_offset + item_offset)
                f.write(disk_id.bytes_le)
                return
        raise BuildError(f"{path}: no virtual disk id in the VHDX metadata")


def fix_identifiers(spec: Spec, image: Path) -> None:
    """Replace the random identifiers qemu-img wrote into a vdi, vpc, vmdk or vhdx image by spec-derived ones."""
    def ident(field: str) -> uuid.UUID:
        return image_identity(spec, f"{spec.format}-{field}")

    if spec.format == "vdi":
        fix_vdi(image, ident("image"), ident("last-snap"))
    elif spec.format == "vpc":
        fix_vpc(image, max(0, spec.source_date_epoch - VHD_EPOCH), ident("unique-id"))
    elif spec.format == "vmdk":
        fix_vmdk(image, ident("cid").int & 0xFFFFFFFF)
    elif spec.format == "vhdx":
        fix_vhdx(image, ident("file-write"), ident("data-write"), ident("log"), ident("disk-id"))
