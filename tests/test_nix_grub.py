"""The Nix side of GRUB without a VM, under real Nix 2.8 with tests/fake-nixpkgs.nix.

The spec's bootLoader.grub comes from the configuration's GRUB options (nix/grub.nix), the derivation is a plain
runCommand (no VM, no kvm feature), each option the host path does not reproduce keeps the VM and the build log
(preVM) names it, and an aarch64 configuration built with x86_64 pkgs gets its EFI image from pkgs' grub-mkimage
or, when it needs the VM, is refused naming the option.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from builder.spec import SCHEMA_PATH, load_spec_document
from tests.support.nixeval import evaluate, image_expr, nix_eval

pytestmark = pytest.mark.nix

STORE = "/nix/store"
GRUB_PKG = f"{STORE}/0123456789abcdfghijklmnpqrsvwxyz-grub-2.12"
PACKAGE = f'package = {{ type = "derivation"; name = "grub-2.12"; outPath = "{GRUB_PKG}"; }};'
CROSS = 'buildSystem = "x86_64-linux"; targetSystem = "aarch64-linux";'


def grub(options: str = "", devices: str = '[ "/dev/vda" ]', extra: str = "") -> str:
    """fake-nixpkgs arguments: a NixOS-like GRUB configuration (with its package), options added."""
    return f"{{ grub = {{ enable = true; devices = {devices}; {PACKAGE} {options} }}; {extra} }}"


def test_grub_options_reach_the_spec_and_no_vm_runs() -> None:
    result = evaluate('{ partitionTableType = "legacy"; }', grub('extraConfig = "serial"; default = "0";'))
    spec = result["spec"]
    assert spec["bootLoader"]["grub"] == {
        "biosPackage": GRUB_PKG, "efiPackage": None, "mkimage": f"{GRUB_PKG}/bin/grub-mkimage",
        "system": "x86_64-linux", "fullName": "grub", "fullVersion": "2.12", "timeout": 5, "default": 0,
        "extraConfig": "serial", "extraEntries": "", "extraEntriesBeforeNixOS": False, "extraPerEntryConfig": "",
        "splashImage": None, "configurationLimit": 100, "fsIdentifier": "uuid", "gfxmodeEfi": "auto",
        "gfxmodeBios": "1024x768", "bootloaderId": "NixOS-boot", "efiSysMountPoint": "/boot",
        "efiInstallAsRemovable": False,
    }
    assert result["inVM"] is False and "requiredSystemFeatures" not in result["env"]
    assert "make-disk-image prepare" in result["buildCommand"]
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(spec)
    loaded = load_spec_document(spec)
    assert loaded.installs_grub and not loaded.needs_vm


def test_hybrid_with_efi_support_has_both_packages() -> None:
    options = "efiSupport = true; efiInstallAsRemovable = true;"
    spec = evaluate('{ partitionTableType = "hybrid"; }', grub(options))["spec"]
    section = spec["bootLoader"]["grub"]
    assert (section["biosPackage"], section["efiPackage"]) == (GRUB_PKG, GRUB_PKG)
    assert section["efiInstallAsRemovable"] is True
    assert load_spec_document(spec).installs_grub


@pytest.mark.parametrize(("table", "fake_args", "reason"), [
    ("legacy", grub('extraPrepareConfig = "echo x";'), "boot.loader.grub.extraPrepareConfig"),
    ("legacy", grub('extraInstallCommands = "echo x";'), "boot.loader.grub.extraInstallCommands"),
    ("legacy", grub("zfsSupport = true;"), "boot.loader.grub.zfsSupport"),
    ("legacy", grub("useOSProber = true;"), "boot.loader.grub.useOSProber"),
    ("legacy", grub('mirroredBoots = [ { path = "/boot"; } { path = "/boot2"; } ];'),
     "boot.loader.grub.mirroredBoots (more than one)"),
    ("efi", grub("efiSupport = true;", '[ "nodev" ]', "efi = { canTouchEfiVariables = true; };"),
     "boot.loader.efi.canTouchEfiVariables"),
    ("legacy", grub("", extra='initrdSecrets = { "/k" = "/run/k"; };'), "boot.initrd.secrets"),
    ("legacy", grub("", extra="specialisations = { rescue = { }; };"), "specialisation"),
    ("legacy+boot", grub(), 'BIOS devices with partitionTableType = \\"legacy+boot\\"'),
    ("legacy", grub('default = "saved";'), "boot.loader.grub.default = saved"),
    ("legacy", grub('mirroredBoots = [ { path = "/boot2"; } ];'), "mirroredBoots.*.path other than /boot"),
])
def test_what_the_host_cannot_do_keeps_the_vm_and_the_log_says_why(table: str, fake_args: str, reason: str) -> None:
    result = evaluate(f'{{ partitionTableType = "{table}"; }}', fake_args)
    assert result["inVM"] is True
    assert "grub" not in result["spec"]["bootLoader"]
    assert "makeDiskImage: the build VM installs GRUB: GRUB with " in result["env"]["preVM"]
    assert reason.replace('\\"', '"') in result["env"]["preVM"], result["env"]["preVM"]


def test_root_uuid_unknown_keeps_the_vm() -> None:
    result = evaluate('{ partitionTableType = "legacy"; deterministic = false; }', grub())
    assert result["inVM"] is True and "deterministic = false" in result["env"]["preVM"]


def test_aarch64_efi_grub_is_built_on_x86_64_with_pkgs_grub_mkimage() -> None:
    result = evaluate('{ partitionTableType = "efi"; }', grub("efiSupport = true;", '[ "nodev" ]', CROSS))
    section: dict[str, Any] = result["spec"]["bootLoader"]["grub"]
    assert result["inVM"] is False
    assert section["mkimage"].endswith("-grub-2.12-build/bin/grub-mkimage")  # pkgs' (the build platform's)
    assert (section["system"], section["efiPackage"], section["biosPackage"]) == ("aarch64-linux", GRUB_PKG, None)


def test_aarch64_grub_that_needs_the_vm_is_refused() -> None:
    done = nix_eval(image_expr('{ partitionTableType = "hybrid"; }', grub("efiSupport = true;", extra=CROSS)))
    assert done.returncode != 0
    assert "must be built on aarch64-linux" in done.stderr and "BIOS devices on aarch64-linux" in done.stderr, \
        done.stderr
