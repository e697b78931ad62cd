"""nixpkgs' own partitioning, run for real: the reference every partition table test compares with.

NIXPKGS_PARTITION is the partitioning of nixos/lib/make-disk-image.nix (nixpkgs master 2025) with its
Nix interpolations (`${bootSize}`, `${rootGPUID}`, `deterministic`) turned into shell variables, the
commands themselves unchanged: the real `numfmt`, `parted --script` and `sgdisk` run on an empty file of
the size our image has (DESIGN §5a: a reference comes from the real tool running upstream's command).
Both tables are then read with `sfdisk --json` and reduced by `table_facts` to what is compared.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from builder.disk import layout
from builder.spec import Spec

NIXPKGS_PARTITION = r"""
set -euo pipefail
mebibyte=$(( 1024 * 1024 ))
round_to_nearest() { echo $(( ( $1 / $2 + 1) * $2 )); }
bootSize=$(round_to_nearest $(numfmt --from=iec "$nixBootSize") $mebibyte)
bootSizeMiB=$(( bootSize / 1024 / 1024 ))MiB
case "$partitionTableType" in
  legacy)
    parted --script $diskImage -- \
      mklabel msdos \
      mkpart primary ext4 1MiB 100% \
      print
    ;;
  legacy+boot)
    parted --script $diskImage -- \
      mklabel msdos \
      mkpart primary fat32 1MiB $bootSizeMiB \
      set 1 boot on \
      mkpart primary ext4 $bootSizeMiB 100% \
      print
    ;;
  legacy+gpt)
    parted --script $diskImage -- \
      mklabel gpt \
      mkpart no-fs 1MiB 2MiB \
      set 1 bios_grub on \
      mkpart primary ext4 2MiB 100% \
      align-check optimal 2 \
      print
    if [ "$deterministic" = 1 ]; then
      sgdisk \
        --disk-guid=97FD5997-D90B-4AA3-8D16-C1723AEA73C \
        --partition-guid=1:1C06F03B-704E-4657-B9CD-681A087A2FDC \
        --partition-guid=2:970C694F-AFD0-4B99-B750-CDB7A329AB6F \
        --partition-guid=3:$rootGPUID \
        $diskImage
    fi
    ;;
  efi)
    parted --script $diskImage -- \
      mklabel gpt \
      mkpart ESP fat32 8MiB $bootSizeMiB \
      set 1 boot on \
      align-check optimal 1 \
      mkpart primary ext4 $bootSizeMiB 100% \
      align-check optimal 2 \
      print
    if [ "$deterministic" = 1 ]; then
      sgdisk \
        --disk-guid=97FD5997-D90B-4AA3-8D16-C1723AEA73C \
        --partition-guid=1:1C06F03B-704E-4657-B9CD-681A087A2FDC \
        --partition-guid=2:$rootGPUID \
        $diskImage
    fi
    ;;
  efixbootldr)
    parted --script $diskImage -- \
      mklabel gpt \
      mkpart ESP fat32 8MiB 100MiB \
      set 1 boot on \
      align-check optimal 1 \
      mkpart BOOT fat32 100MiB $bootSizeMiB \
      set 2 bls_boot on \
      align-check optimal 2 \
      mkpart ROOT ext4 $bootSizeMiB 100% \
      align-check optimal 3 \
      print
    if [ "$deterministic" = 1 ]; then
      sgdisk \
        --disk-guid=97FD5997-D90B-4AA3-8D16-C1723AEA73C \
        --partition-guid=1:1C06F03B-704E-4657-B9CD-681A087A2FDC \
        --partition-guid=2:970C694F-AFD0-4B99-B750-CDB7A329AB6F \
        --partition-guid=3:$rootGPUID \
        $diskImage
    fi
    ;;
  hybrid)
    parted --script $diskImage -- \
      mklabel gpt \
      mkpart ESP fat32 8MiB $bootSizeMiB \
      set 1 boot on \
      align-check optimal 1 \
      mkpart no-fs 0 1024KiB \
      set 2 bios_grub on \
      mkpart primary ext4 $bootSizeMiB 100% \
      align-check optimal 3 \
      print
    if [ "$deterministic" = 1 ]; then
      sgdisk \
        --disk-guid=97FD5997-D90B-4AA3-8D16-C1723AEA73C \
        --partition-guid=1:1C06F03B-704E-4657-B9CD-681A087A2FDC \
        --partition-guid=2:970C694F-AFD0-4B99-B750-CDB7A329AB6F \
        --partition-guid=3:$rootGPUID \
        $diskImage
    fi
    ;;
  *)
    echo "no partitioning for $partitionTableType" >&2
    exit 2
    ;;
esac
"""


def numfmt_accepts(size: str) -> bool:
    """Whether `numfmt --from=iec` (what nixpkgs parses bootSize with) reads size at all."""
    return subprocess.run(["numfmt", "--from=iec", size], capture_output=True).returncode == 0


def nixpkgs_partition(image: Path, size: int, table: str, boot_size: str, deterministic: bool,
                      root_gpuid: str) -> subprocess.CompletedProcess[str]:
    """Create image as an empty file of size bytes and partition it as nixpkgs does; raise if that fails."""
    with image.open("wb") as f:
        f.truncate(size)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
        "LC_ALL": "C",
        "diskImage": str(image),
        "partitionTableType": table,
        "nixBootSize": boot_size,
        "rootGPUID": root_gpuid,
        "deterministic": "1" if deterministic else "0",
    }
    done = subprocess.run(["bash", "-c", NIXPKGS_PARTITION], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"nixpkgs' partitioning of {table} (bootSize {boot_size!r}, {size} bytes) failed:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def sfdisk_table(image: Path) -> dict[str, Any]:
    """`sfdisk --json image`'s partition table, with each partition's number (from its node) added."""
    done = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True)
    table: dict[str, Any] = json.loads(done.stdout)["partitiontable"]
    for part in table.get("partitions", []):
        part["number"] = int(part["node"][len(str(image)):].lstrip("p"))
    return table


def table_facts(image: Path, ids: bool) -> dict[str, Any]:
    """What two tables must share: label, GPT usable range, and per partition number its start, size, type,
    GPT name, boot flag and GPT attribute flags; with ids, also the disk id and every partition GUID."""
    table = sfdisk_table(image)
    facts: dict[str, Any] = {
        "label": table["label"],
        "firstlba": table.get("firstlba"),
        "lastlba": table.get("lastlba"),
        "partitions": {
            p["number"]: {
                "start": p["start"], "size": p["size"], "type": p["type"], "name": p.get("name"),
                "bootable": p.get("bootable", False), "attrs": p.get("attrs"),
                **({"uuid": p.get("uuid")} if ids else {}),
            }
            for p in table.get("partitions", [])
        },
    }
    if ids:
        facts["id"] = table["id"]
    return facts


def assert_same_table(ours: Path, theirs: Path, spec: Spec, ids: bool) -> None:
    """Assert our table (for spec) and nixpkgs' agree on table_facts; with ids, on the disk id and GUIDs too.

    Two differences are ours on purpose and left out, each checked to be what we mean instead:
    - msdos disk id: nixpkgs leaves it to parted (random) even when deterministic; we pin it then.
    - legacy+gpt: nixpkgs' `--partition-guid=3:${rootGPUID}` names a partition that does not exist (sgdisk
      ignores it without a word), so its root, partition 2, gets 970C694F-... A user who sets rootGPUID
      wants it on the root partition: ours has it there.
    """
    mine, upstream = table_facts(ours, ids), table_facts(theirs, ids)
    if ids and mine["label"] == "dos":
        assert mine.pop("id") == f"0x{layout.MBR_DISK_ID:08x}"
        upstream.pop("id")
    if ids and spec.partition_table_type == "legacy+gpt":
        assert upstream["partitions"][2].pop("uuid") == layout.PART2_GUID
        assert mine["partitions"][2].pop("uuid") == spec.root_gpuid
    assert mine == upstream
