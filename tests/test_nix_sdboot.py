"""The Nix side of systemd-boot without a VM, and of aarch64 images built on x86_64, under real Nix 2.8.

Evaluation with tests/fake-nixpkgs.nix: the spec's bootLoader.systemdBoot comes from the configuration's
systemd-boot options, the derivation needs no VM, and what only the system's own installer does keeps
it; a cross build that needs the VM is refused at evaluation. Then the flake against the nixpkgs
stand-in: `packages.x86_64-linux.image-aarch64` (the aarch64 fixture system as the configuration, pkgs
for x86_64) is built here by `nix build` and boots under AAVMF.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from builder.spec import SCHEMA_PATH, load_spec_document
from tests.support.nixeval import evaluate, image_expr, nix_eval
from tests.support.qemu_boot import boot_facts
from tests.test_nix_glue import Glue, assemble_glue

pytestmark = pytest.mark.nix

REPO = Path(__file__).resolve().parent.parent
MEMTEST = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-memtest86plus/memtest.efi"
SDBOOT = ("{ enable = true; editor = false; consoleMode = \"max\"; "
          f'extraFiles = {{ "efi/memtest86/memtest.efi" = "{MEMTEST}"; }}; '
          'extraEntries = { "memtest86.conf" = "title Memtest86+\\nefi /efi/memtest86/memtest.efi\\n"; }; }')
NO_GRUB = "grub = { enable = false; };"


def fake(*settings: str) -> str:
    """fake-nixpkgs arguments: a systemd-boot configuration without GRUB, plus settings."""
    return "{ " + f"systemdBoot = {SDBOOT}; {NO_GRUB} " + " ".join(settings) + " }"


def eval_error(args: str, fake_args: str) -> str:
    """Evaluate makeDiskImage expecting failure; Nix's message."""
    done = nix_eval(image_expr(args, fake_args))
    assert done.returncode != 0, f"evaluation succeeded: {done.stdout[:500]}"
    return done.stderr


def test_systemd_boot_options_reach_the_spec_and_no_vm_runs() -> None:
    result = evaluate('{ partitionTableType = "efi"; }', fake("loaderTimeout = null;"))
    spec = result["spec"]
    section = spec["bootLoader"]["systemdBoot"]
    systemd = section["efiBinary"].split("/lib/")[0]
    assert systemd.endswith("-systemd-258.2")
    assert section == {
        "efiBinary": f"{systemd}/lib/systemd/boot/efi/systemd-bootx64.efi",
        "efiSysMountPoint": "/boot", "xbootldrMountPoint": None, "distroName": "NixOS",
        "timeout": "menu-force", "editor": False, "consoleMode": "max", "rebootForBitlocker": False,
        "extraFiles": {"efi/memtest86/memtest.efi": MEMTEST},
        "extraEntries": {"memtest86.conf": "title Memtest86+\nefi /efi/memtest86/memtest.efi\n"},
    }
    assert result["inVM"] is False and "requiredSystemFeatures" not in result["env"]
    assert "make-disk-image prepare" in result["buildCommand"] and "--out" in result["buildCommand"]
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(spec)
    loaded = load_spec_document(spec)
    assert loaded.installs_systemd_boot and not loaded.needs_vm


def test_nixos_default_timeout_and_xbootldr() -> None:
    settings = ('efi = { efiSysMountPoint = "/efi"; }; '
                'systemdBoot = { enable = true; xbootldrMountPoint = "/boot"; };')
    spec = evaluate('{ partitionTableType = "efixbootldr"; }', "{ " + NO_GRUB + " " + settings + " }")["spec"]
    section = spec["bootLoader"]["systemdBoot"]
    assert (section["timeout"], section["efiSysMountPoint"], section["xbootldrMountPoint"]) == (5, "/efi", "/boot")
    assert load_spec_document(spec).installs_systemd_boot


@pytest.mark.parametrize("settings", [
    'systemdBoot = { enable = true; extraInstallCommands = "echo hi"; };',
    'systemdBoot = { enable = true; }; initrdSecrets = { "/etc/secret" = "/run/keys/secret"; };',
    'systemdBoot = { enable = true; extraEfiDrivers = { "ext4_x64.efi" = "/nix/store/x-refind/ext4_x64.efi"; }; };',
    # systemd-boot-builder.py runs every specialisation's append-initrd-secrets too (issue 21).
    'systemdBoot = { enable = true; }; specialisations = { rescue = { "/etc/secret" = "/run/keys/secret"; }; };',
])
def test_what_only_the_systems_installer_does_keeps_the_vm(settings: str) -> None:
    result = evaluate('{ partitionTableType = "efi"; }', "{ " + NO_GRUB + " " + settings + " }")
    assert result["spec"]["bootLoader"]["systemdBoot"] is None
    assert result["inVM"] is True


def test_specialisations_without_initrd_secrets_need_no_vm() -> None:
    result = evaluate('{ partitionTableType = "efi"; }', fake("specialisations = { rescue = { }; };"))
    assert result["spec"]["bootLoader"]["systemdBoot"] is not None and result["inVM"] is False


@pytest.mark.parametrize(("timeout", "written"), [("-1", -1), ("0", 0), ("null", "menu-force")])
def test_any_loader_timeout_nixpkgs_allows_is_taken(timeout: str, written: int | str) -> None:
    # nixpkgs: boot.loader.timeout is types.nullOr types.int; systemd-boot-builder.py writes "timeout <it>".
    spec = evaluate('{ partitionTableType = "efi"; }', fake(f"loaderTimeout = {timeout};"))["spec"]
    assert spec["bootLoader"]["systemdBoot"]["timeout"] == written
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(spec)
    assert load_spec_document(spec).systemd_boot.timeout == written  # type: ignore[union-attr]


def test_touch_efi_vars_and_named_owners_keep_the_vm() -> None:
    owned = '[ { source = "/etc/hostname"; target = "/srv/x"; user = "alice"; group = "users"; } ]'
    for args in ('{ partitionTableType = "efi"; touchEFIVars = true; }',
                 f'{{ partitionTableType = "efi"; contents = {owned}; }}'):
        result = evaluate(args, fake())
        assert result["inVM"] is True, args
        assert load_spec_document(result["spec"]).needs_vm


def test_a_grub_system_uses_the_vm() -> None:
    result = evaluate('{ partitionTableType = "hybrid"; }')
    assert result["spec"]["bootLoader"]["systemdBoot"] is None and result["inVM"] is True


@pytest.mark.parametrize(("args", "settings", "fragments"), [
    ('{ partitionTableType = "legacy"; }', "", ["config.boot.loader.systemd-boot.enable", "needs an EFI system"]),
    ('{ partitionTableType = "efixbootldr"; }', "",
     ["config.boot.loader.efi.efiSysMountPoint = \"/boot\"", "mounts the ESP at /efi"]),
    ('{ partitionTableType = "efixbootldr"; }', 'efi = { efiSysMountPoint = "/efi"; };',
     ["xbootldrMountPoint = null", "it must be \"/boot\""]),
])
def test_systemd_boot_without_its_partitions_is_refused(args: str, settings: str, fragments: list[str]) -> None:
    message = eval_error(args, fake(settings))
    for fragment in fragments:
        assert fragment in message, message


CROSS = 'buildSystem = "x86_64-linux"; targetSystem = "aarch64-linux";'


def test_aarch64_configuration_with_x86_64_pkgs_needs_no_vm() -> None:
    result = evaluate('{ partitionTableType = "efi"; }', fake(CROSS))
    assert result["inVM"] is False
    assert result["spec"]["bootLoader"]["systemdBoot"]["efiBinary"].endswith("/systemd-bootaa64.efi")


@pytest.mark.parametrize(("args", "fake_args", "reason"), [
    ('{ partitionTableType = "efi"; }', "{ " + CROSS + " }", "GRUB with boot.loader.grub.extraInstallCommands"),
    ('{ partitionTableType = "efi"; touchEFIVars = true; }', fake(CROSS), "touchEFIVars = true"),
    ('{ partitionTableType = "efi"; contents = [ { source = "/etc/hostname"; target = "/x"; user = "a"; '
     'group = "b"; } ]; }', fake(CROSS), "contents owned by user or group names"),
    ('{ partitionTableType = "efi"; }', "{ systemdBoot = { enable = true; extraInstallCommands = \"x\"; }; "
     + NO_GRUB + " " + CROSS + " }", "extraInstallCommands"),
])
def test_cross_build_that_needs_the_vm_is_refused_at_evaluation(args: str, fake_args: str, reason: str) -> None:
    message = eval_error(args, fake_args)
    assert "needs the build VM" in message and "must be built on aarch64-linux" in message, message
    assert "pkgs is for x86_64-linux" in message and reason in message, message


# ---------------------------------------------------------------- the flake, with the stand-in for nixpkgs

@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Glue:
    """This flake and the nixpkgs stand-in (with the fixture systems), as tests/test_nix_glue.py assembles them."""
    return assemble_glue(tmp_path_factory.mktemp("nix-sdboot"))


def derivation_env(glue: Glue, attr: str) -> dict[str, Any]:
    """The environment of an output's derivation (`nix show-derivation`)."""
    shown: dict[str, Any] = json.loads(glue.nix("show-derivation", glue.ref(attr)).stdout)
    (only,) = shown.values()
    env: dict[str, Any] = only["env"]
    return env


def test_systemd_boot_hydra_job_is_a_plain_derivation(glue: Glue) -> None:
    env = derivation_env(glue, "hydraJobs.efi-qcow2-compressed.x86_64-linux")
    assert "requiredSystemFeatures" not in env and "preVM" not in env
    assert env["system"] == "x86_64-linux"


def test_grub_hydra_job_is_a_plain_derivation(glue: Glue) -> None:
    # hybrid-vpc: GRUB for BIOS and EFI (efiSupport, efiInstallAsRemovable), installed by prepare (nix/grub.nix).
    env = derivation_env(glue, "hydraJobs.hybrid-vpc.x86_64-linux")
    assert "requiredSystemFeatures" not in env and "preVM" not in env
    spec = glue.eval_json("hydraJobs.hybrid-vpc.x86_64-linux.spec")
    section = spec["bootLoader"]["grub"]
    assert section["biosPackage"] == section["efiPackage"] and section["efiInstallAsRemovable"] is True
    assert load_spec_document(spec).installs_grub


@pytest.mark.slow
@pytest.mark.boot
def test_grub_hydra_job_built_without_a_vm_boots_with_seabios_and_ovmf(glue: Glue, tmp_path: Path) -> None:
    out = glue.build("hydraJobs.hybrid-vpc.x86_64-linux", "result-hybrid-vpc")
    image = out / "nixos.vhd"
    with ThreadPoolExecutor(max_workers=2) as pool:
        bios = pool.submit(boot_facts, image, tmp_path, fmt="vpc")
        uefi = pool.submit(boot_facts, image, tmp_path, fmt="vpc", firmware="uefi")
        facts = {"bios": bios.result(), "uefi": uefi.result()}
    for firmware, f in facts.items():
        assert (f["loader"], f["efi"], f["root_device"]) == ("grub", firmware == "uefi", "/dev/vda3"), f


@pytest.fixture(scope="module")
def cross_image(glue: Glue) -> Path:
    """`nix build .#packages.x86_64-linux.image-aarch64` on this x86_64 machine."""
    return glue.build("packages.x86_64-linux.image-aarch64", "result-aarch64")


def test_aarch64_image_is_built_on_x86_64_without_a_vm(glue: Glue, cross_image: Path, tmp_path: Path) -> None:
    env = derivation_env(glue, "packages.x86_64-linux.image-aarch64")
    assert env["system"] == "x86_64-linux" and "requiredSystemFeatures" not in env and "preVM" not in env
    spec = glue.eval_json("packages.x86_64-linux.image-aarch64.spec")
    assert glue.eval_json("packages.x86_64-linux.image-aarch64.targetSystem") == "aarch64-linux"
    boot = json.loads((Path(spec["system"]["toplevel"]) / "boot.json").read_text())["org.nixos.bootspec.v1"]
    assert boot["system"] == "aarch64-linux"
    assert sorted(p.name for p in cross_image.iterdir()) == ["nix-support", "nixos.qcow2"]
    raw = tmp_path / "aarch64.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(cross_image / "nixos.qcow2"), str(raw)], check=True)
    described = json.loads(subprocess.run([sys.executable, "-m", "builder", "inspect", str(raw)],
                                          capture_output=True, text=True, check=True, cwd=REPO).stdout)
    esp = described["partitions"][0]
    listing = subprocess.run(["mdir", "-/", "-b", "-i", f"{raw}@@{esp['start']}", "::/"], capture_output=True,
                             text=True, check=True).stdout
    assert "::/EFI/BOOT/BOOTAA64.EFI" in listing and "::/loader/entries/nixos-generation-1.conf" in listing
    kernel = boot["kernel"].removeprefix("/nix/store/").replace("/", "-")
    assert f"::/EFI/nixos/{kernel}.efi" in listing


@pytest.mark.boot
def test_aarch64_image_built_on_x86_64_boots(cross_image: Path, tmp_path: Path) -> None:
    facts = boot_facts(cross_image / "nixos.qcow2", tmp_path, fmt="qcow2", firmware="uefi", arch="aarch64")
    assert (facts["machine"], facts["loader"], facts["efi"]) == ("aarch64", "systemd-boot", True)
    assert (facts["root_device"], facts["root_label"]) == ("/dev/vda2", "nixos")


def test_cross_grub_image_is_refused_through_the_flake(glue: Glue) -> None:
    # The stand-in's lib.nixosSystem for aarch64-linux without systemd-boot: GRUB, which needs the VM.
    expr = f"""
let
  pkgs = import {glue.stub}/default.nix {{ system = "x86_64-linux"; }};
  inherit (pkgs.lib.nixosSystem {{ system = "aarch64-linux"; modules = [ ]; }}) config;
in (import {glue.flake}/nix/make-disk-image.nix {{ inherit pkgs config; inherit (pkgs) lib; }}).drvPath"""
    done = subprocess.run(["nix-instantiate", "--eval", "--expr", expr], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "needs the build VM" in done.stderr and "GRUB" in done.stderr, done.stderr
