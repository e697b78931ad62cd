"""NAR serialisation hashes and Nix's base-32: real narHash/narSize for the synthetic closure."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_CHUNK = 1 << 20


def nix32(digest: bytes) -> str:
    """Encode a digest in Nix's base-32 (as printHash32 does)."""
    size = len(digest)
    length = (size * 8 - 1) // 5 + 1
    out = []
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = digest[i] >> j
        if i + 1 < size:
            c |= digest[i + 1] << (8 - j)
        out.append(NIX32_ALPHABET[c & 0x1F])
    return "".join(out)


class _NarSink:
    """Feeds NAR tokens into sha256 and counts the bytes, without building the archive."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def raw(self, data: bytes) -> None:
        """Append raw bytes."""
        self.hash.update(data)
        self.size += len(data)

    def string(self, data: bytes) -> None:
        """Append a NAR string: little-endian u64 length, bytes, zero padding to 8."""
        self.raw(len(data).to_bytes(8, "little"))
        self.raw(data)
        if len(data) % 8:
            self.raw(b"\0" * (8 - len(data) % 8))

    def node(self, path: Path) -> None:
        """Serialise one file system object the way `nix-store --dump` does."""
        st = os.lstat(path)
        self.string(b"(")
        self.string(b"type")
        if stat.S_ISREG(st.st_mode):
            self.string(b"regular")
            if st.st_mode & 0o100:
                self.string(b"executable")
                self.string(b"")
            self.string(b"contents")
            self.raw(st.st_size.to_bytes(8, "little"))
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    self.raw(chunk)
            if st.st_size % 8:
                self.raw(b"\0" * (8 - st.st_size % 8))
        elif stat.S_ISLNK(st.st_mode):
            self.string(b"symlink")
            self.string(b"target")
            self.string(os.fsencode(os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            self.string(b"directory")
            for name in sorted(os.listdir(os.fsencode(path))):
                self.string(b"entry")
                self.string(b"(")
                self.string(b"name")
                self.string(name)
                self.string(b"node")
                self.node(path / os.fsdecode(name))
                self.string(b")")
        else:
            raise ValueError(f"{path}: not a regular file, symlink or directory")
        self.string(b")")


def nar_hash_size(path: Path) -> tuple[str, int]:
    """The narHash ("sha256:<nix32>") and narSize of a store path on disk."""
    sink = _NarSink()
    sink.string(b"nix-archive-1")
    sink.node(path)
    return "sha256:" + nix32(sink.hash.digest()), sink.size
