"""The Nix side of GRUB without a VM, under real Nix 2.8 with tests/fake-nixpkgs.nix.

The spec's bootLoader.grub comes from the configuration's GRUB options (nix/grub.nix), the derivation is a plain
runCommand (no VM, no kvm feature), each option the host path does not reproduce keeps the VM and the build log
(preVM) names it, and an aarch64 configuration built with x86_64 pkgs gets its EFI image from pkgs' grub-mkimage
or, when it needs the VM, is refused naming the option.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jsonschema
import pytest

from builder.boot.grub_config import parse_grub
from builder.spec import SCHEMA_PATH, load_spec_document
from tests.support.nixeval import evaluate, image_expr, nix_eval

pytestmark = pytest.mark.nix

STORE = "/nix/store"


def fake_store_path(key: str, name: str) -> str:
    """tests/fake-nixpkgs.nix's store path: the first 32 hex digits of sha256(key), then the name."""
    return f"{STORE}/{hashlib.sha256(key.encode()).hexdigest()[:32]}-{name}"


# The system's pkgs.grub2 (config._module.args.pkgs, as nixpkgs' grub.nix reads it) and its efiSupport override.
GRUB_PKG = fake_store_path("grub-2.12", "grub-2.12")
GRUB_EFI_PKG = fake_store_path("grub-2.12-efi", "grub-2.12")
CROSS = 'buildSystem = "x86_64-linux"; targetSystem = "aarch64-linux";'


def grub(options: str = "", devices: str = '[ "/dev/vda" ]', extra: str = "") -> str:
    """fake-nixpkgs arguments: a NixOS-like GRUB configuration (GRUB from the system's pkgs), options added."""
    return f"{{ grub = {{ enable = true; devices = {devices}; {options} }}; {extra} }}"


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
    assert (section["biosPackage"], section["efiPackage"]) == (GRUB_PKG, GRUB_EFI_PKG)
    assert section["efiInstallAsRemovable"] is True
    assert load_spec_document(spec).installs_grub


def test_a_configuration_of_grub_nix_defaults_gets_the_section() -> None:
    # Only enable and devices, as a NixOS configuration sets them: GRUB comes from the system's pkgs.grub2.
    only_defaults = '{ grub = { enable = true; devices = [ "/dev/vda" ]; }; }'
    result = evaluate('{ partitionTableType = "legacy"; }', only_defaults)
    assert result["inVM"] is False and "preVM" not in result["env"], result["env"].get("preVM")
    section = result["spec"]["bootLoader"]["grub"]
    assert (section["biosPackage"], section["efiPackage"]) == (GRUB_PKG, None)


# grub.nix's defaults of the options the generated grub.cfg does not read, given explicitly: still no VM.
DEFAULTS = ('forcei686 = false; timeoutStyle = "menu"; splashMode = "normal"; backgroundColor = null; '
            'entryOptions = "--class nixos --unrestricted"; subEntryOptions = "--class nixos"; '
            'gfxpayloadEfi = "keep"; gfxpayloadBios = "text"; configurationName = ""; '
            f'font = "{GRUB_PKG}/share/grub/unicode.pf2"; '
            'mirroredBoots = [ { path = "/boot"; efiBootloaderId = null; } ];')


def test_unread_options_at_their_defaults_keep_no_vm() -> None:
    result = evaluate('{ partitionTableType = "legacy"; }', grub(DEFAULTS))
    assert result["inVM"] is False and result["spec"]["bootLoader"]["grub"]["biosPackage"] == GRUB_PKG


def test_the_default_splash_images_colours_keep_no_vm() -> None:
    # grub.nix: splashMode "stretch" and backgroundColor null by default; with its default splash image it sets
    # `mkDefault "normal"` and `mkDefault "#2F302F"`: both pairs are what a configuration of defaults holds.
    for colours in ('splashMode = "stretch"; backgroundColor = null;',
                    'splashMode = "normal"; backgroundColor = "#2F302F";'):
        result = evaluate('{ partitionTableType = "legacy"; }', grub(colours))
        assert result["inVM"] is False, colours


@pytest.mark.parametrize(("options", "reason"), [
    ("forcei686 = true;", "boot.loader.grub.forcei686"),
    ('font = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-dejavu/DejaVuSans.pf2";', "boot.loader.grub.font"),
    ("font = null;", "boot.loader.grub.font"),
    ('timeoutStyle = "hidden";', "boot.loader.grub.timeoutStyle"),
    ('splashMode = "tile";', "boot.loader.grub.splashMode"),
    ('backgroundColor = "#7EBAE4";', "boot.loader.grub.backgroundColor"),
    ('entryOptions = "--class nixos";', "boot.loader.grub.entryOptions"),
    ('subEntryOptions = "";', "boot.loader.grub.subEntryOptions"),
    ('gfxpayloadEfi = "text";', "boot.loader.grub.gfxpayloadEfi"),
    ('gfxpayloadBios = "keep";', "boot.loader.grub.gfxpayloadBios"),
    ('configurationName = "Stable";', "boot.loader.grub.configurationName"),
    ('mirroredBoots = [ { path = "/boot"; efiBootloaderId = "NixOS-fsid"; } ];',
     "boot.loader.grub.mirroredBoots.*.efiBootloaderId"),
    ('default = "99999999999999999999";', "boot.loader.grub.default = 99999999999999999999"),
    ("default = -1;", "boot.loader.grub.default = -1"),
])
def test_unread_options_off_their_defaults_keep_the_vm(options: str, reason: str) -> None:
    result = evaluate('{ partitionTableType = "legacy"; }', grub(options))
    assert result["inVM"] is True and "grub" not in result["spec"]["bootLoader"]
    assert reason in result["env"]["preVM"], result["env"]["preVM"]


@pytest.mark.parametrize(("fake_extra", "timeout"), [("loaderTimeout = -1;", -1), ("loaderTimeout = null;", -1),
                                                      ("loaderTimeout = 0;", 0)])
def test_negative_and_null_timeouts_reach_the_spec_as_grub_nix_gives_them(fake_extra: str, timeout: int) -> None:
    result = evaluate('{ partitionTableType = "legacy"; }', grub("configurationLimit = -3;", extra=fake_extra))
    assert result["inVM"] is False
    section = result["spec"]["bootLoader"]["grub"]
    assert (section["timeout"], section["configurationLimit"]) == (timeout, -3)
    assert load_spec_document(result["spec"]).grub == parse_grub(section)


@pytest.mark.parametrize(("default", "index"),
                         [('"007"', 7), ('"0"', 0), ("3", 3), ('"000000000123456789"', 123456789)])
def test_default_reads_digits_as_perls_int(default: str, index: int) -> None:
    result = evaluate('{ partitionTableType = "legacy"; }', grub(f"default = {default};"))
    section = result["spec"]["bootLoader"]["grub"]
    assert section["default"] == index and isinstance(section["default"], int)


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
    assert (section["system"], section["efiPackage"], section["biosPackage"]) == ("aarch64-linux", GRUB_EFI_PKG, None)


def test_aarch64_grub_that_needs_the_vm_is_refused() -> None:
    done = nix_eval(image_expr('{ partitionTableType = "hybrid"; }', grub("efiSupport = true;", extra=CROSS)))
    assert done.returncode != 0
    assert "must be built on aarch64-linux" in done.stderr and "BIOS devices on aarch64-linux" in done.stderr, \
        done.stderr
