"""The argument rules of builder/rules.json, typed: tables, filesystems, formats, patterns and limits.

nix/args reads the same file, so the Nix function and the builder refuse and accept the same things.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from .resources import json_file
from .units import MiB


@dataclass(frozen=True)
class Table:
    """A partitionTableType: label (msdos, gpt or None), root partition number and start, boot start, EFI variables."""

    name: str
    label: str | None
    root_partition: int | None
    root_start: int | None  # bytes where the root partition starts; None: where the boot partition ends (bootSize)
    boot_start: int | None  # bytes where the boot partition starts, for tables whose boot partition ends at bootSize
    efi_variables: bool
    esp_mount_point: str | None  # where nixpkgs' VM script mounts the ESP (None: no ESP)
    xbootldr_mount_point: str | None


@dataclass(frozen=True)
class FsType:
    """A root fsType: label limit, UUID, read-only, minimum size, the VM's kernel module and the tools it needs."""

    name: str
    family: str
    label_bytes: int | None  # None: no label stored (squashfs)
    label_truncated: bool  # longer labels are truncated (mke2fs) rather than refused
    uuid: bool
    read_only: bool
    min_bytes: int
    kernel_module: str
    tools: tuple[str, ...]


@dataclass(frozen=True)
class Format:
    """An output format: the file extension and the Hydra product word."""

    name: str
    extension: str
    hydra: str


@cache
def tables() -> dict[str, Table]:
    """Every partitionTableType, in the order nixpkgs lists them (rules.json keeps them in a list)."""
    return {
        t["name"]: Table(t["name"], t["label"], t["rootPartition"],
                         None if t["rootStartMiB"] is None else t["rootStartMiB"] * MiB,
                         None if t["bootStartMiB"] is None else t["bootStartMiB"] * MiB, t["efiVariables"],
                         t["espMountPoint"], t["xbootldrMountPoint"])
        for t in json_file("rules.json")["tables"]
    }


@cache
def fs_types() -> dict[str, FsType]:
    """Every root fsType."""
    return {
        f["name"]: FsType(f["name"], f["family"], f["labelBytes"], f["labelTruncated"], f["uuid"], f["readOnly"],
                          f["minBytes"], f["kernelModule"], tuple(f["tools"]))
        for f in json_file("rules.json")["fsTypes"]
    }


@cache
def formats() -> dict[str, Format]:
    """Every output format."""
    return {f["name"]: Format(f["name"], f["extension"], f["hydra"]) for f in json_file("rules.json")["formats"]}


def pattern(name: str) -> str:
    """A shared pattern's text (a whole-string match)."""
    text: str = json_file("rules.json")["patterns"][name]
    return text


def matches(name: str, value: str) -> bool:
    """Whether value matches the shared pattern as a whole (no trailing newline slips through)."""
    return re.fullmatch(pattern(name), value) is not None


def limit(name: str) -> int:
    """A numeric limit."""
    value: int = json_file("rules.json")["limits"][name]
    return value


def content_keys() -> tuple[str, ...]:
    """The attributes of a contents entry."""
    return tuple(json_file("rules.json")["contentKeys"])


def vm_stage(rule: str, facts: Mapping[str, bool]) -> bool:
    """Whether the vmStage rule holds for a spec's facts: one of its alternatives has all its facts ("!": not)."""
    alternatives: list[list[str]] = json_file("rules.json")["vmStage"][rule]

    def holds(term: str) -> bool:
        name = term.removeprefix("!")
        value = facts[name] if name in facts else vm_stage(name, facts)
        return value != term.startswith("!")

    return any(all(holds(term) for term in alternative) for alternative in alternatives)


def ext_family() -> tuple[str, ...]:
    """The fsTypes made by mke2fs (ext2, ext3, ext4)."""
    return tuple(name for name, f in fs_types().items() if f.family == "ext")
