"""CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): VHDX headers and log entries, erofs superblocks."""

from __future__ import annotations


def _table() -> tuple[int, ...]:
    """The byte lookup table."""
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC-32C without the final inversion: the kernel's crc32c(~0, ...), which erofs stores."""
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes) -> int:
    """The standard CRC-32C of data (initial and final inversion), as VHDX uses it."""
    return crc32c_raw(data) ^ 0xFFFFFFFF
