"""shareRootFilesystem in Nix: the root filesystem's derivation is keyed by what the root is made from alone.

Evaluation with tests/fake-nixpkgs.nix: the root filesystem's spec (nix/args rootFilesystemSpec) is the same
for images that differ only in table, format, name, postVM, ... and differs when anything the root build reads
differs; the builder reads the same root from it as from each image's own spec. With the nixpkgs stand-in
(real derivations, real Nix 2.8): the hydraJobs that share a root filesystem name one derivation, and an
image placed from it is byte-identical to the same image built without sharing, VM stage included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder.disk import layout
from builder.spec import Spec, load_spec_document
from tests.support.digest import sha256
from tests.support.nixeval import ENTRY, FAKE, REPO, nix_eval
from tests.test_nix_glue import Glue, assemble_glue

pytestmark = pytest.mark.nix


def images(variants: dict[str, str], fake: str = "{ }") -> dict[str, Any]:
    """Evaluate makeDiskImage { shareRootFilesystem = true; } // each variant's arguments."""
    attrs = " ".join(f"{json.dumps(name)} = {args};" for name, args in variants.items())
    expr = f"""
let
  fake = import {FAKE} {fake};
  make = args: import {REPO}/nix/make-disk-image.nix ({{ inherit (fake) pkgs lib config; shareRootFilesystem = true; }}
    // args);
in builtins.mapAttrs (_: args: let image = make args; in {{
  spec = image.spec;
  rootSpec = image.rootFilesystem.spec;
  rootCommand = image.rootFilesystem.buildCommand;
  rootPath = image.rootFilesystem.outPath;  # fake-nixpkgs: a path from the name only
  command = image.env.preVM or image.buildCommand;
}}) {{ {attrs} }}"""
    done = nix_eval(expr)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def root_facts(spec: Spec) -> dict[str, Any]:
    """Everything the builder's root filesystem build reads from a spec (pipeline.build_root_filesystem):
    the closure and tree, the filesystem's parameters, its size rule and the mount points prepare makes."""
    sd = spec.systemd_boot
    mounts = (sd.efi_sys_mount_point, sd.xbootldr_mount_point) if spec.installs_systemd_boot and sd else None
    return {
        "system": (spec.toplevel, spec.closure_info, spec.channel, spec.additional_paths, spec.store_dir),
        "tree": (spec.contents, spec.config_file, spec.only_nix_store, spec.copy_channel, mounts),
        "fs": (spec.fs_type, spec.label, spec.root_fsuid, spec.deterministic, spec.source_date_epoch),
        "size": (spec.additional_space if spec.disk_size is None else layout.root_bytes(spec, spec.disk_size)),
        "share": spec.share_root_filesystem,
    }


# Images of one system that differ only in what the root filesystem does not depend on.
SAME_ROOT = {
    "legacy": "{ }",
    "legacy-qcow2": '{ format = "qcow2"; name = "other-name"; baseName = "other"; }',
    "legacy-gpt-vdi": '{ partitionTableType = "legacy+gpt"; format = "vdi"; }',
    "legacy-boot": '{ partitionTableType = "legacy+boot"; bootSize = "100M"; }',
    "efi": '{ partitionTableType = "efi"; memSize = 2048; postVM = "echo hi"; }',
    "efi-vars": '{ partitionTableType = "efi"; touchEFIVars = true; }',
    "hybrid": '{ partitionTableType = "hybrid"; bootSize = "512M"; rootGPUID = "0A0B0C0D-1111-2222-3333-444455556666";'
              ' rootFSUID = "F222513B-DED1-49FA-B591-20CE86A2FE7F"; }',
    "efixbootldr": '{ partitionTableType = "efixbootldr"; format = "qcow2-compressed"; }',
    "none": '{ partitionTableType = "none"; installBootLoader = false; }',
}
# Each changes something the root filesystem is made from.
OTHER_ROOT = {
    "btrfs": '{ fsType = "btrfs"; }',
    "label": '{ label = "other"; }',
    "uuid": '{ rootFSUID = "0A0B0C0D-1111-2222-3333-444455556666"; }',
    "space": '{ additionalSpace = "1G"; }',
    "contents": f'{{ contents = [ {{ source = "{ENTRY}"; target = "/srv/x"; }} ]; }}',
    "config-file": f'{{ configFile = "{ENTRY}"; }}',
    "random": "{ deterministic = false; }",
    "no-channel": "{ copyChannel = false; }",
    "extra-paths": f'{{ additionalPaths = [ "{ENTRY}" ]; }}',
    "fixed-size": "{ diskSize = 4096; }",
    "store-only": '{ onlyNixStore = true; installBootLoader = false; partitionTableType = "none"; }',
}


def test_root_spec_is_the_same_exactly_when_the_root_is() -> None:
    same = images(SAME_ROOT)
    other = images(OTHER_ROOT)
    first = same["legacy"]["rootSpec"]
    for name, image in same.items():
        assert image["rootSpec"] == first, name
    for name, image in other.items():
        assert image["rootSpec"] != first, name
    for name, image in {**same, **other}.items():
        root, own = load_spec_document(image["rootSpec"]), load_spec_document(image["spec"])
        assert root.share_root_filesystem and not root.needs_vm
        assert root_facts(root) == root_facts(own), f"{name}: the root spec builds another root than the image's"


def test_fixed_disk_size_groups_tables_by_their_root_partition() -> None:
    # diskSize = 4096 MiB: the root partition is bootSize's end to 1 MiB before the end on every GPT table
    # that has a boot partition; elsewhere it starts and ends differently.
    got = images({
        "efi": '{ partitionTableType = "efi"; diskSize = 4096; }',
        "hybrid": '{ partitionTableType = "hybrid"; diskSize = 4096; format = "vpc"; }',
        "efixbootldr": '{ partitionTableType = "efixbootldr"; diskSize = 4096; bootSize = "256MiB"; }',
        "hybrid-300": '{ partitionTableType = "hybrid"; diskSize = 4096; bootSize = "300M"; }',
        "legacy-boot": '{ partitionTableType = "legacy+boot"; diskSize = 4096; }',
        "legacy": "{ diskSize = 4096; }",
        "legacy-gpt": '{ partitionTableType = "legacy+gpt"; diskSize = 4096; }',
        "none": '{ partitionTableType = "none"; diskSize = 4096; installBootLoader = false; }',
    })
    # (fake-nixpkgs names store paths by name only: the root spec is what makes the real derivation differ)
    keys = {name: json.dumps(image["rootSpec"], sort_keys=True) for name, image in got.items()}
    assert keys["efi"] == keys["hybrid"] == keys["efixbootldr"]
    assert len({keys[n] for n in ("efi", "hybrid-300", "legacy-boot", "legacy", "legacy-gpt", "none")}) == 6
    for name, image in got.items():
        root, own = load_spec_document(image["rootSpec"]), load_spec_document(image["spec"])
        assert root_facts(root) == root_facts(own), name


def test_mount_points_prepare_makes_are_part_of_the_root() -> None:
    # systemd-boot installed by prepare: the ESP's mount point (and XBOOTLDR's) is made on the root.
    no_grub = "grub = { enable = false; };"
    esp = images({"efi": '{ partitionTableType = "efi"; }', "hybrid": '{ partitionTableType = "hybrid"; }',
                  "vars": '{ partitionTableType = "efi"; touchEFIVars = true; }'},
                 f"{{ {no_grub} systemdBoot = {{ enable = true; }}; }}")
    xbootldr = images({"efixbootldr": '{ partitionTableType = "efixbootldr"; }'},
                      f'{{ {no_grub} efi = {{ efiSysMountPoint = "/efi"; }}; '
                      'systemdBoot = { enable = true; xbootldrMountPoint = "/boot"; }; }')
    assert esp["efi"]["rootSpec"] == esp["hybrid"]["rootSpec"]
    assert esp["vars"]["rootSpec"] != esp["efi"]["rootSpec"], "with touchEFIVars the VM installs it, not prepare"
    assert xbootldr["efixbootldr"]["rootSpec"] != esp["efi"]["rootSpec"]
    for image in [*esp.values(), *xbootldr.values()]:
        root, own = load_spec_document(image["rootSpec"]), load_spec_document(image["spec"])
        assert root_facts(root) == root_facts(own)


def test_derivations_place_the_shared_root_filesystem() -> None:
    got = images({"vm": '{ format = "qcow2"; }', "plain": "{ installBootLoader = false; }"})
    for image in got.values():
        assert f"--root-filesystem {image['rootPath']}" in image["command"]
        assert "make-disk-image root-filesystem " in image["rootCommand"]
        assert image["rootCommand"].rstrip().endswith('--out "$out"')
    unshared = nix_eval(f"""
let
  fake = import {FAKE} {{ }};
  image = import {REPO}/nix/make-disk-image.nix {{ inherit (fake) pkgs lib config; }};
in {{ root = image.rootFilesystem; inherit (image.env) preVM; inSpec = image.spec ? shareRootFilesystem; }}""")
    assert unshared.returncode == 0, unshared.stderr
    result = json.loads(unshared.stdout)
    # Not even written into the spec: vdi, vpc and vmdk identifiers derive from it and stay as they were.
    assert (result["root"], result["inSpec"]) == (None, False)
    assert "--root-filesystem" not in result["preVM"]


# With the nixpkgs stand-in: real derivations, built by real Nix.


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Glue:
    """A copy of the flake and the assembled nixpkgs stand-in (tests/test_nix_glue.py)."""
    return assemble_glue(tmp_path_factory.mktemp("nix-shared-root"))


def test_hydra_jobs_name_one_root_filesystem_derivation(glue: Glue) -> None:
    roots = json.loads(glue.nix(
        "eval", "--json", glue.ref("hydraJobs"), "--apply",
        "jobs: builtins.mapAttrs (_: j: let r = j.x86_64-linux.rootFilesystem; in "
        "if r == null then null else r.drvPath) jobs").stdout)
    shared = {roots[job] for job in ("legacy-qcow2", "legacy-raw", "legacy-gpt-vdi")}
    assert len(shared) == 1 and None not in shared, roots
    assert all(roots[job] is None for job in roots if not job.startswith("legacy-"))


def test_root_filesystem_derivation_is_one_store_path_across_tables_and_formats(glue: Glue) -> None:
    expr = f"""
let
  pkgs = import {glue.stub}/default.nix {{ system = "x86_64-linux"; }};
  inherit (pkgs.lib.nixosSystem {{ system = "x86_64-linux"; modules = [ ]; }}) config;
  make = args: (import {glue.flake}/nix/make-disk-image.nix ({{
    inherit pkgs config;
    inherit (pkgs) lib;
    shareRootFilesystem = true;
  }} // args)).rootFilesystem.drvPath;
in [
  (make {{ }})
  (make {{ format = "qcow2"; }})
  (make {{ partitionTableType = "efi"; format = "vdi"; installBootLoader = false; }})
  (make {{ partitionTableType = "hybrid"; format = "qcow2-compressed"; name = "hybrid"; }})
  (make {{ fsType = "btrfs"; }})
  (make {{ additionalSpace = "1G"; }})
]"""
    done = nix_eval(expr)
    assert done.returncode == 0, done.stderr[-3000:]
    legacy, qcow2, efi, hybrid, btrfs, space = json.loads(done.stdout)
    assert legacy == qcow2 == efi == hybrid
    assert len({legacy, btrfs, space}) == 3


@pytest.mark.slow
def test_shared_job_is_the_image_built_without_sharing(glue: Glue) -> None:
    # hydraJobs.legacy-qcow2 is packages.image (the example's arguments, legacy, qcow2) plus
    # shareRootFilesystem: its root filesystem is its own derivation, placed before the build VM installs
    # GRUB; the image must be the same bytes. legacy-raw, built alongside, uses the same root build.
    attrs = ["hydraJobs.legacy-qcow2.x86_64-linux", "packages.x86_64-linux.image", "hydraJobs.legacy-raw.x86_64-linux"]
    done = glue.nix("build", "--max-jobs", "2", "--no-link", *map(glue.ref, attrs))
    shared, alone, raw = (Path(glue.eval_json(f"{attr}.outPath")) for attr in attrs)
    assert shared != alone
    assert sha256(shared / "nixos.qcow2") == sha256(alone / "nixos.qcow2")
    assert done.stderr.count("-root-filesystem.ext4.drv") == 1, "the root filesystem is built once"
    root = Path(glue.eval_json("hydraJobs.legacy-raw.x86_64-linux.rootFilesystem.outPath"))
    assert root.is_file() and (raw / "nixos.img").is_file()
