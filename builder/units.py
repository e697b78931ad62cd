"""Byte sizes: IEC strings as numfmt --from=iec reads them, and alignment helpers."""

import re

MiB = 1024 * 1024
SECTOR = 512

_IEC = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<suffix>[KMGTPE])?(?:i?B)?")
_POWERS = {None: 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def parse_iec(text: str) -> int:
    """Return the bytes meant by an IEC size such as "512M" or "1.5G" (powers of 1024, rounded up)."""
    match = _IEC.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (expected digits with an optional K, M, G, T, P or E suffix)")
    num = match.group("num")
    scale: int = 1024 ** _POWERS[match.group("suffix")]
    whole, _, frac = num.partition(".")
    value = int(whole) * scale
    if frac:
        value += -(-int(frac) * scale // 10 ** len(frac))
    return value


def align_up(value: int, unit: int) -> int:
    """Round value up to a multiple of unit."""
    return -(-value // unit) * unit


def round_to_nearest(value: int, unit: int) -> int:
    """nixpkgs' `round_to_nearest` (nixos/lib/make-disk-image.nix): `(value / unit + 1) * unit`.

    Despite its name it always adds one unit, even to a value that is already a multiple: "256M" of
    bootSize becomes 257 MiB. nixpkgs computes bootSize's MiB this way, so the boot partition ends there.
    """
    return (value // unit + 1) * unit


def human(value: int) -> str:
    """Format bytes for logs, e.g. 268435456 -> "256.0 MiB"."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(size) < 1024 or unit == "EiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{value} B"
        size /= 1024
    return f"{value} B"
