"""Our partition tables against nixpkgs' own: parted and sgdisk run with nixos/lib/make-disk-image.nix's commands.

Every layout, several bootSize strings and disk sizes (on both sides of parted's ~200 MiB turn in how
"100%" ends a GPT partition) are partitioned twice: by our code (`python -m builder prepare`, and
`layout.plan` + `table.write_table` for the wider matrix) and by nixpkgs' script on an empty file of the
same size (tests/support/nixpkgs_tables.py). `sfdisk --json` of both must agree on the label, every partition's
start, size, type, name, boot flag and GPT attributes, and, when deterministic, on the disk and partition
GUIDs sgdisk writes, less two deliberate differences (tests/support/nixpkgs_tables.py assert_same_table).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder import rules
from builder.disk import layout, table
from builder.errors import SpecError
from builder.spec import Spec, boot_end, load_spec, load_spec_document
from builder.units import MiB
from tests.fixtures.closure_fixture import fixture_document
from tests.support.nixpkgs_tables import assert_same_table, nixpkgs_partition, numfmt_accepts, sfdisk_table
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent
# Where each table's boot partition starts, for those whose boot partition ends at bootSize.
BOOT_END_MINIMUM = {n: t.boot_start for n, t in rules.tables().items() if t.boot_start is not None}
TABLES = ["legacy", "legacy+boot", "legacy+gpt", "efi", "efixbootldr", "hybrid"]
# bootSize strings nixpkgs' numfmt reads; which a layout allows is what our spec validation says (below).
BOOT_SIZES = ["256M", "64M", "100M", "1G", "260M", "256.5M", "8M", "1M"]
# Sizes our parser takes (sizes.parse_iec) and numfmt --from=iec refuses: nixpkgs fails on them, nothing to compare.
NUMFMT_REFUSES = ["256MiB", "256MB"]
FIXED_DISKS_MIB = [8, 200, 201, 2048]  # 200/201: the last disk sizes before and after parted aligns a GPT's end


def spec_for(table_type: str, boot_size: str, disk_mib: int | str, deterministic: bool = True) -> Spec:
    """A valid spec of the fixture's shape (its store paths need not exist: only the layout is used)."""
    doc = fixture_document(Path("/nonexistent"), {"toplevel": "/nix/store/" + "a" * 32 + "-toplevel",
                                                  "extra": "/nix/store/" + "b" * 32 + "-extra"})
    doc.update(partitionTableType=table_type, bootSize=boot_size, diskSize=disk_mib, deterministic=deterministic)
    return load_spec_document(doc)


def matrix() -> list[tuple[str, str, int]]:
    """(table, bootSize, disk MiB) for every bootSize a table allows, at a few disk sizes each."""
    cases = []
    for t in TABLES:
        if t not in BOOT_END_MINIMUM:  # bootSize plays no part
            cases += [(t, "256M", d) for d in FIXED_DISKS_MIB]
            continue
        for boot in BOOT_SIZES:
            end = boot_end(boot) // MiB
            if end <= BOOT_END_MINIMUM[t] // MiB:
                continue  # refused by our validation (test_validation_follows_nixpkgs_rounding)
            disks = sorted({end + 1, end + 2, *FIXED_DISKS_MIB} - set(range(end + 1)))
            cases += [(t, boot, d) for d in disks]
    return cases


def written(spec: Spec, image: Path, size: int) -> Path:
    """image as our code partitions an empty file of size bytes (layout.plan + table.write_table, then checked)."""
    with image.open("wb") as f:
        f.truncate(size)
    plan = layout.plan(spec, size)
    table.write_table(image, plan)
    table.check(image, plan)
    return image


@pytest.mark.parametrize("table_type,boot_size,disk_mib", matrix(),
                         ids=[f"{t}-{b}-{d}MiB" for t, b, d in matrix()])
def test_write_table_matches_nixpkgs(table_type: str, boot_size: str, disk_mib: int, tmp_path: Path) -> None:
    """Placement, types, names and flags. nixpkgs' sgdisk only sets GUIDs (and sleeps a second each time), so
    this matrix runs nixpkgs' non-deterministic script; the GUIDs are compared per table below."""
    spec = spec_for(table_type, boot_size, disk_mib)
    ours = written(spec, tmp_path / "ours.img", disk_mib * MiB)
    nixpkgs_partition(tmp_path / "nixpkgs.img", disk_mib * MiB, table_type, boot_size, False, spec.root_gpuid)
    assert_same_table(ours, tmp_path / "nixpkgs.img", spec, ids=False)


@pytest.mark.parametrize("table_type", TABLES)
def test_deterministic_write_table_matches_nixpkgs_ids(table_type: str, tmp_path: Path) -> None:
    """With deterministic = true, the GUIDs sgdisk writes (and all the rest) are ours too."""
    spec = spec_for(table_type, "256M", 300)
    ours = written(spec, tmp_path / "ours.img", 300 * MiB)
    nixpkgs_partition(tmp_path / "nixpkgs.img", 300 * MiB, table_type, "256M", True, spec.root_gpuid)
    assert_same_table(ours, tmp_path / "nixpkgs.img", spec, ids=True)


@pytest.mark.parametrize("table_type", ["legacy", "efi", "hybrid"])
def test_non_deterministic_write_table_matches_nixpkgs(table_type: str, tmp_path: Path) -> None:
    spec = spec_for(table_type, "256M", 300, deterministic=False)
    ours = written(spec, tmp_path / "ours.img", 300 * MiB)
    nixpkgs_partition(tmp_path / "nixpkgs.img", 300 * MiB, table_type, "256M", False, spec.root_gpuid)
    assert_same_table(ours, tmp_path / "nixpkgs.img", spec, ids=False)


def test_sgdisk_reads_the_short_disk_guid_as_layout_says(tmp_path: Path) -> None:
    """sgdisk takes nixpkgs' 11-digit disk GUID without complaint and writes layout.DISK_GUID; on legacy+gpt it
    accepts `--partition-guid=3:` for a partition that does not exist and leaves the root with 970C694F-..."""
    root = "F222513B-DED1-49FA-B591-20CE86A2FE7F"
    done = nixpkgs_partition(tmp_path / "gpt.img", 300 * MiB, "legacy+gpt", "256M", True, root)
    assert "The operation has completed successfully" in done.stdout
    read = sfdisk_table(tmp_path / "gpt.img")
    assert read["id"] == layout.DISK_GUID
    assert [(p["number"], p["uuid"]) for p in read["partitions"]] == [(1, layout.PART1_GUID), (2, layout.PART2_GUID)]


@pytest.mark.parametrize("size", NUMFMT_REFUSES)
def test_sizes_numfmt_refuses_are_not_compared(size: str) -> None:
    """These bootSize strings fail in nixpkgs (numfmt) but are sizes to us: there is no upstream table to match."""
    assert not numfmt_accepts(size)
    assert boot_end(size) == 257 * MiB


@pytest.mark.parametrize("table_type,boot_size,allowed", [
    ("efi", "8M", True),  # ends at 9 MiB: nixpkgs makes a 1 MiB ESP
    ("efi", "7.5M", False),  # ends at 8 MiB, where the ESP starts
    ("hybrid", "7M", False),
    ("efixbootldr", "100M", True),  # ends at 101 MiB
    ("efixbootldr", "99.9M", False),
    ("legacy+boot", "0.5M", False),
    ("legacy+boot", "1M", True),
])
def test_validation_follows_nixpkgs_rounding(table_type: str, boot_size: str, allowed: bool) -> None:
    """bootSize is allowed exactly when the boot partition nixpkgs would make (ending at boot_end) is not empty."""
    if allowed:
        spec_for(table_type, boot_size, "auto")
        return
    with pytest.raises(SpecError, match=r"END offset of the boot partition \(rounded as nixpkgs does"):
        spec_for(table_type, boot_size, "auto")


# --- the real code path: python -m builder prepare on the fixture closure ------------------------------------

def prepare(spec: Path, image: Path) -> None:
    """Run the real CLI: python -m builder prepare SPEC --image IMAGE."""
    done = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("table_type", [*TABLES, "none"])
def test_prepared_table_matches_nixpkgs(table_type: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """An auto-sized image of the fixture with the default bootSize: small disks for legacy and legacy+gpt,
    more than 257 MiB for the others, so both of parted's ways to end a GPT's root partition are met."""
    spec_path = make_spec(partitionTableType=table_type, bootSize="256M")
    ours = tmp_path / "ours.img"
    prepare(spec_path, ours)
    if table_type == "none":  # nixpkgs runs no parted
        assert subprocess.run(["sfdisk", "--json", str(ours)], capture_output=True).returncode != 0
        return
    spec = load_spec(spec_path)
    nixpkgs_partition(tmp_path / "nixpkgs.img", ours.stat().st_size, table_type, "256M", True, spec.root_gpuid)
    assert_same_table(ours, tmp_path / "nixpkgs.img", spec, ids=True)


@pytest.mark.parametrize("table_type", ["legacy", "legacy+boot", "efi", "hybrid"])
def test_non_deterministic_tables_get_fresh_ids(table_type: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """deterministic = false pins nothing, as in nixpkgs: two builds differ in the MBR disk id (msdos) or the
    disk GUID and every partition GUID (GPT), and otherwise match nixpkgs' table."""
    spec_path = make_spec(partitionTableType=table_type, deterministic=False, rootFSUID=None, diskSize=300,
                          bootSize="64M")
    tables: list[dict[str, Any]] = []
    for run in ("a.img", "b.img"):
        prepare(spec_path, tmp_path / run)
        tables.append(sfdisk_table(tmp_path / run))
    a, b = tables
    assert a["id"] != b["id"]
    assert layout.DISK_GUID not in (a["id"], b["id"]) and f"0x{layout.MBR_DISK_ID:08x}" not in (a["id"], b["id"])
    if a["label"] == "gpt":
        for pa, pb in zip(a["partitions"], b["partitions"], strict=True):
            assert pa["uuid"] != pb["uuid"]
            assert pa["uuid"] not in (layout.PART1_GUID, layout.PART2_GUID, load_spec(spec_path).root_gpuid)
    nixpkgs_partition(tmp_path / "nixpkgs.img", 300 * MiB, table_type, "64M", False, "unused")
    assert_same_table(tmp_path / "a.img", tmp_path / "nixpkgs.img", load_spec(spec_path), ids=False)
