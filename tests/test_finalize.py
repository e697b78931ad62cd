"""The in-VM script: rendering rules (strict, quoted) and hostile names run as data by a real bash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

from builder.spec import load_spec_document
from builder.vm.finalize import environment, render
from tests.fixtures.system import system_document

REPO = Path(__file__).resolve().parent.parent
# Commands the script runs that would touch the host: stubs record their argv instead.
STUBBED = ("mount", "umount", "mountpoint", "chroot", "tune2fs", "debugfs", "cp", "ln", "mkdir", "sync", "nixos-enter",
           "find", "dd", "rm")


def hostile(canary: Path) -> str:
    """A name with spaces, both quotes, $(...), backticks, a glob and a newline; running any part creates canary."""
    return f"/srv/a b 'q' \"dq\" $(touch {canary}) `touch {canary}` ; touch {canary} *\nsecond line"


def spec_doc(tmp_path: Path, canary: Path, table: str = "efixbootldr") -> dict[str, object]:
    """A spec whose contents target and configFile path are hostile, with named owners and EFI vars."""
    doc = system_document("/nix/store/00000000000000000000000000000000-fixture-system-toplevel",
                          tmp_path / "closure-info", table, "")
    doc["bootLoader"] = {"grubDevices": ["/dev/vda", "/dev/disk/by-id/a b$(touch x)"],
                         "limineBiosDevice": "/dev/disk/by-id/limine `touch x`"}
    doc["contents"] = [{"source": "/etc/hostname", "target": hostile(canary), "mode": None,
                        "user": "fixtureuser", "group": "fixturegroup"}]
    doc["configFile"] = hostile(canary).replace("/srv/", "/tmp/cfg ")
    doc["touchEFIVars"] = table in ("efi", "efixbootldr", "hybrid", "legacy+gpt")
    return doc


def write_stubs(bindir: Path, log: Path) -> None:
    """Stub commands that append their argv (NUL-separated, one record per line of JSON) to log."""
    bindir.mkdir()
    for name in STUBBED:
        stub = bindir / name
        stub.write_text(
            f"#!{sys.executable}\n"
            "import json, sys\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            "    f.write(json.dumps(sys.argv[1:] and [sys.argv[0].rsplit('/', 1)[-1], *sys.argv[1:]]"
            " or [sys.argv[0].rsplit('/', 1)[-1]]) + '\\n')\n"
            "sys.exit(1 if sys.argv[0].endswith('mountpoint') else 0)\n"
        )
        stub.chmod(0o755)


def run_with_stubs(doc: dict[str, Any], tmp_path: Path) -> list[list[str]]:
    """Render the finalize script for doc and run it with every tool stubbed; the argv of each call, in order."""
    script = render(load_spec_document(doc), "/dev/mdi-no-such-disk")
    log = tmp_path / "argv.log"
    write_stubs(tmp_path / "bin", log)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    res = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_hostile_names_are_data_when_the_script_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    calls = run_with_stubs(spec_doc(tmp_path, canary), tmp_path)
    assert not canary.exists()
    chroot_calls = [c for c in calls if c[0] == "chroot"]
    # activation, then the bootloader, activation again, then chown with the exact target as one argument
    assert chroot_calls[-1] == ["chroot", "/mnt", "chown", "-R", "fixtureuser:fixturegroup", hostile(canary)]
    assert ["chroot", "/mnt", "/nix/var/nix/profiles/system/bin/switch-to-configuration", "boot"] in chroot_calls
    # configFile is written by prepare on the host, as every other file of the image (not in the VM).
    assert not [c for c in calls if c[0] == "cp"]
    # vmTools' guest has no /mnt: the script makes it before mounting the root there.
    assert calls.index(["mkdir", "-p", "/mnt"]) < calls.index(
        ["mount", "-o", "noatime,nodelalloc,noinit_itable", "/dev/mdi-no-such-disk3", "/mnt"])
    # GRUB's devices and Limine's BIOS device are made to name the image's disk before the install.
    assert ["ln", "-sfn", "/dev/mdi-no-such-disk", "/dev/disk/by-id/a b$(touch x)"] in calls
    assert ["ln", "-sfn", "/dev/mdi-no-such-disk", "/dev/disk/by-id/limine `touch x`"] in calls
    # The machine id the activation or the installer left is removed after the bootloader install.
    install = calls.index(["chroot", "/mnt", "/nix/var/nix/profiles/system/bin/switch-to-configuration", "boot"])
    assert calls.index(["rm", "-f", "/mnt/etc/machine-id"]) > install
    assert ["mount", "-t", "vfat", "-o", "noatime", "/dev/mdi-no-such-disk1", "/mnt/efi"] in calls
    assert ["mount", "-t", "vfat", "-o", "noatime", "/dev/mdi-no-such-disk2", "/mnt/boot"] in calls
    assert ["mount", "-t", "efivarfs", "efivarfs", "/sys/firmware/efi/efivars"] in calls
    assert ["tune2fs", "-c", "0", "-i", "0", "-T", "20231114221320", "/dev/mdi-no-such-disk3"] in calls


def test_not_deterministic_ends_with_nixpkgs_tune2fs(tmp_path: Path) -> None:
    # nixpkgs' make-disk-image.nix ends an ext4 root with `tune2fs -T now -c 0 -i 0 $rootDisk` (and, only when
    # deterministic, -U and a second `tune2fs -f -T 19700101`).
    calls = run_with_stubs({**spec_doc(tmp_path, tmp_path / "canary"), "deterministic": False, "rootFSUID": None},
                           tmp_path)
    assert [c for c in calls if c[0] == "tune2fs"] == [["tune2fs", "-T", "now", "-c", "0", "-i", "0",
                                                      "/dev/mdi-no-such-disk3"]]


def test_failure_unmounts_everything(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    script = render(load_spec_document(spec_doc(tmp_path, canary)), "/dev/mdi-no-such-disk")
    log = tmp_path / "argv.log"
    write_stubs(tmp_path / "bin", log)
    (tmp_path / "bin" / "chroot").write_text("#!/bin/sh\nexit 3\n")  # the bootloader install fails
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    res = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 3
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[-2:] == [["umount", "-R", "/mnt"], ["umount", "/sys/firmware/efi/efivars"]]
    assert not any(c[0] == "tune2fs" and "-c" in c for c in calls)


def test_print_shows_a_valid_bash_script(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(spec_doc(tmp_path, tmp_path / "canary", "legacy+boot")))
    res = subprocess.run([sys.executable, "-m", "builder", "finalize", str(spec), "--print"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in res.stdout
    assert "mount -t vfat -o noatime /dev/vda1 /mnt/boot" in res.stdout
    assert subprocess.run(["bash", "-n"], input=res.stdout, text=True).returncode == 0
    assert not (tmp_path / "canary").exists()


def test_chroot_enter_mounts_and_activates_like_nixos_enter(tmp_path: Path) -> None:
    doc = spec_doc(tmp_path, tmp_path / "canary", "legacy")
    script = render(load_spec_document(doc), "/dev/vda")
    assert "mount --rbind /dev /mnt/dev" in script and "mount -t proc proc /mnt/proc" in script
    assert "/nix/var/nix/profiles/system/activate" in script
    doc["enterCommand"] = "nixos-enter"
    script = render(load_spec_document(doc), "/dev/vda")
    assert "nixos-enter --root /mnt -- \"$@\"" in script and "--rbind" not in script


def test_templates_refuse_undefined_and_unquoted_values(tmp_path: Path) -> None:
    (tmp_path / "undefined.j2").write_text("echo {{ missing | shell_quote }}\n")
    (tmp_path / "unquoted.j2").write_text("echo {{ value }}\n")
    env = environment(tmp_path)
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("undefined.j2").render()
    with pytest.raises(jinja2.TemplateError, match="unquoted"):
        env.get_template("unquoted.j2").render(value="$(reboot)")


def test_every_template_is_rendered_through_the_quoting_filter() -> None:
    for template in sorted((REPO / "templates").glob("*.j2")):
        for line in template.read_text().splitlines():
            for chunk in line.split("{{")[1:]:
                assert "| shell_quote" in chunk.split("}}")[0], f"{template.name}: {line}"
    assert os.path.isdir(REPO / "templates")
