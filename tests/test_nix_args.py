"""makeDiskImage's argument handling, evaluated by real Nix (nix-instantiate --eval --strict --json).

nix/make-disk-image.nix is called with tests/fake-nixpkgs.nix (fake store paths, nothing built): valid
argument sets must give a spec that both the JSON Schema and the builder's loader accept, with the
expected values; invalid ones must fail evaluation with a message naming the argument.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from builder.spec import load_spec_document
from tests.support.nixeval import (
    DEFAULT_GUID,
    ENTRY,
    EXTRA,
    FAKE,
    REPO,
    STORE,
    evaluate,
    image_expr,
    nix_eval,
    schema_errors,
)

pytestmark = pytest.mark.nix

# (id, Nix arguments, fake-nixpkgs arguments, expected spec values, expected extras)
VALID: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "defaults",
        "{ }",
        "{ }",
        {
            "specVersion": 1, "name": "nixos-disk-image", "baseName": "nixos", "format": "raw",
            "partitionTableType": "legacy", "fsType": "ext4", "label": "nixos", "diskSize": "auto",
            "additionalSpace": "512M", "bootSize": "256M", "contents": [], "installBootLoader": True,
            "touchEFIVars": False, "efiFirmware": None, "efiVariables": None, "configFile": None,
            "postVM": "", "memSize": 1024, "onlyNixStore": False, "deterministic": True,
            "rootGPUID": DEFAULT_GUID, "rootFSUID": DEFAULT_GUID, "copyChannel": True,
            "bootLoader": {"grubDevices": ["/dev/vda"], "limineBiosDevice": None, "systemdBoot": None},
            "sourceDateEpoch": 1,
            "enterCommand": "nixos-enter",
        },
        {"inVM": True, "filePath": "nixos.img"},
    ),
    (
        "only-nix-store",
        '{ onlyNixStore = true; installBootLoader = false; partitionTableType = "none"; }',
        "{ }",
        {"label": "nix-store", "onlyNixStore": True, "partitionTableType": "none"},
        {"inVM": False},
    ),
    (
        "efi-vars-from-ovmf",
        '{ partitionTableType = "efi"; touchEFIVars = true; }',
        "{ }",
        {"touchEFIVars": True},
        {"inVM": True, "efiFrom": "OVMF-fd"},
    ),
    (
        # The files given win; pkgs.OVMF.fd is still read for its systemManagementModeRequired, as nixpkgs does.
        "efi-vars-explicit",
        '{ partitionTableType = "hybrid"; touchEFIVars = true; efiFirmware = "/fw/code.fd";'
        ' efiVariables = "/fw/vars.fd"; }',
        "{ }",
        {"efiFirmware": "/fw/code.fd", "efiVariables": "/fw/vars.fd"},
        {"inVM": True},
    ),
    (
        # Without a VM nothing reads pkgs.OVMF (a VM build reads it for the SMM flags, as nixpkgs does).
        "ovmf-untouched-without-vm",
        '{ partitionTableType = "efi"; installBootLoader = false; }',
        "{ touchOVMF = false; }",
        {"efiFirmware": None, "efiVariables": None, "touchEFIVars": False},
        {"inVM": False},
    ),
    (
        "efi-vars-from-ovmf-argument",
        '{ partitionTableType = "legacy+gpt"; touchEFIVars = true;'
        ' OVMF = { firmware = "/ovmf/CODE.fd"; variables = "/ovmf/VARS.fd"; }; }',
        "{ touchOVMF = false; }",
        {"efiFirmware": "/ovmf/CODE.fd", "efiVariables": "/ovmf/VARS.fd"},
        {},
    ),
    (
        "root-fs-uuid-follows-gpuid",
        '{ rootGPUID = "11111111-2222-3333-4444-555555555555"; }',
        "{ }",
        {"rootGPUID": "11111111-2222-3333-4444-555555555555", "rootFSUID": "11111111-2222-3333-4444-555555555555"},
        {},
    ),
    (
        "not-deterministic-no-uuid",
        "{ deterministic = false; rootFSUID = null; }",
        "{ }",
        {"deterministic": False, "rootFSUID": None},
        {},
    ),
    (
        "contents-numeric-owner-no-vm",
        f'{{ installBootLoader = false; contents = [ {{ source = {FAKE}; target = "/etc/fake.nix"; mode = "0644";'
        f' user = 1000; group = 100; }} {{ source = "{ENTRY}/share/*"; target = "/usr/share/"; }} ]; }}',
        "{ }",
        {"installBootLoader": False},
        {"inVM": False, "contents": [("/etc/fake.nix", "0644", "1000", "100"), ("/usr/share", None, None, None)]},
    ),
    (
        "contents-named-owner-needs-vm",
        f'{{ installBootLoader = false; contents = [ {{ source = "{ENTRY}"; target = "/srv/www";'
        ' user = "nginx"; group = "nginx"; } ]; }',
        "{ }",
        {"contents": [{"source": ENTRY, "target": "/srv/www", "mode": None, "user": "nginx", "group": "nginx"}]},
        {"inVM": True},
    ),
    (
        "no-bootloader-no-vm",
        "{ installBootLoader = false; }",
        "{ }",
        {"installBootLoader": False},
        {"inVM": False},
    ),
    (
        "qcow2-compressed-basename",
        '{ diskSize = 2048; format = "qcow2-compressed"; baseName = "disk"; }',
        "{ }",
        {"diskSize": 2048, "format": "qcow2-compressed", "baseName": "disk"},
        {"filePath": "disk.qcow2"},
    ),
    ("vpc-is-vhd", '{ format = "vpc"; }', "{ }", {"format": "vpc"}, {"filePath": "nixos.vhd"}),
    ("vmdk-passes-through", '{ format = "vmdk"; }', "{ }", {"format": "vmdk"}, {"filePath": "nixos.vmdk"}),
    ("vdi", '{ format = "vdi"; }', "{ }", {"format": "vdi"}, {"filePath": "nixos.vdi"}),
    (
        "no-channel",
        "{ copyChannel = false; }",
        "{ }",
        {"copyChannel": False},
        {"channel": None, "roots": ["toplevel"]},
    ),
    (
        "additional-paths-minus-base",
        f'{{ additionalPaths = [ fake.config.system.build.toplevel "{EXTRA}" ]; }}',
        "{ }",
        {},
        {"additionalPaths": [EXTRA], "roots": ["toplevel", "channel", EXTRA]},
    ),
    (
        "grub-disabled",
        "{ }",
        '{ grub = { enable = false; devices = [ "/dev/sda" ]; }; }',
        {"bootLoader": {"grubDevices": [], "limineBiosDevice": None, "systemdBoot": None}},
        {},
    ),
    (
        "grub-nodev",
        '{ partitionTableType = "efi"; }',
        '{ grub = { enable = true; devices = [ "nodev" ]; }; }',
        {"bootLoader": {"grubDevices": ["nodev"], "limineBiosDevice": None, "systemdBoot": None}},
        {},
    ),
    (
        "label-and-config-file",
        f'{{ label = "root"; configFile = {FAKE}; }}',
        "{ }",
        {"label": "root"},
        {"configFileInStore": True},
    ),
    (
        "mem-size-and-post-vm",
        '{ memSize = 2048; postVM = "echo done > $out/done"; }',
        "{ }",
        {"memSize": 2048, "postVM": "echo done > $out/done"},
        {"inVM": True, "memSize": 2048, "postVMTail": "echo done > $out/done"},
    ),
    (
        # nixpkgs hands memSize to vmTools, which reads it with toString (issue 21).
        "mem-size-digits-string",
        '{ memSize = "2048"; }',
        "{ }",
        {"memSize": 2048},
        {"inVM": True, "memSize": 2048},
    ),
    (
        # NixOS' default biosDevice is "nodev": nixpkgs builds it, limine-install.py installs stage 2 only.
        "limine-bios-nodev",
        "{ }",
        "{ grub = { enable = false; }; limine = { enable = true; biosSupport = true; }; }",
        {"bootLoader": {"grubDevices": [], "limineBiosDevice": "nodev", "systemdBoot": None}},
        {"inVM": True},
    ),
    (
        "limine-bios-nodev-no-bootloader",
        "{ installBootLoader = false; }",
        '{ grub = { enable = false; }; limine = { enable = true; biosSupport = true; biosDevice = "nodev"; }; }',
        {"bootLoader": {"grubDevices": [], "limineBiosDevice": "nodev", "systemdBoot": None}},
        {"inVM": False},
    ),
    (
        "efixbootldr-boot-1G",
        '{ partitionTableType = "efixbootldr"; bootSize = "1G"; }',
        "{ }",
        {"partitionTableType": "efixbootldr", "bootSize": "1G"},
        {},
    ),
    (
        "legacy-boot-sizes",
        '{ partitionTableType = "legacy+boot"; bootSize = "512MiB"; additionalSpace = "1.5G"; }',
        "{ }",
        {"bootSize": "512MiB", "additionalSpace": "1.5G"},
        {},
    ),
    (
        # nixpkgs' round_to_nearest ends these at 101 and 9 MiB, past where their boot partitions start
        "boot-ends-rounded-past-start",
        '{ partitionTableType = "efixbootldr"; bootSize = "100M"; }',
        "{ }",
        {"bootSize": "100M"},
        {},
    ),
    ("esp-boot-8M", '{ partitionTableType = "efi"; bootSize = "8M"; }', "{ }", {"bootSize": "8M"}, {}),
    ("name-characters", '{ name = "nixos-image+x.y_z"; }', "{ }", {"name": "nixos-image+x.y_z"}, {}),
    (
        "fixed-size-just-fits-boot",
        '{ partitionTableType = "efi"; diskSize = 258; bootSize = "256M"; }',
        "{ }",
        {"diskSize": 258},
        {},
    ),
]


@pytest.mark.parametrize(
    ("args", "fake", "expected", "extra"),
    [pytest.param(a, f, e, x, id=i) for i, a, f, e, x in VALID],
)
def test_valid_arguments_give_a_spec_both_sides_accept(
    args: str, fake: str, expected: dict[str, Any], extra: dict[str, Any]
) -> None:
    result = evaluate(args, fake)
    spec = result["spec"]
    assert schema_errors(spec) == []
    loaded = load_spec_document(spec)  # the builder's own loader: schema and cross-field rules
    assert json.loads(result["specFileText"]) == spec, "the spec file must hold exactly the spec"
    for key, value in expected.items():
        assert spec[key] == value, key
    assert spec["system"]["toplevel"] == result["toplevel"]
    assert spec["system"]["storeDir"] == STORE
    assert spec["system"]["closureInfo"].startswith(f"{STORE}/")
    assert spec["system"]["channel"] == (result["channel"] if spec["copyChannel"] else None)
    assert loaded.needs_vm == result["inVM"], "Nix and the builder must agree on whether a VM is needed"

    if "inVM" in extra:
        assert result["inVM"] == extra["inVM"]
    if "filePath" in extra:
        assert result["filePath"] == extra["filePath"] == loaded.image_file_name
    if "efiFrom" in extra:
        assert "OVMF-fd/FV/OVMF_CODE.fd" in spec["efiFirmware"]
        assert "OVMF-fd/FV/OVMF_VARS.fd" in spec["efiVariables"]
        assert spec["efiFirmware"] in result["env"]["QEMU_OPTS"]
        assert "$out/efi-vars.fd" in result["env"]["QEMU_OPTS"]
    if "contents" in extra:
        got = [(c["target"], c["mode"], c["user"], c["group"]) for c in spec["contents"]]
        assert got == extra["contents"]
        assert spec["contents"][0]["source"].startswith(f"{STORE}/"), "a path literal is copied to the store"
        assert spec["contents"][0]["source"].endswith("-fake-nixpkgs.nix")
        assert spec["contents"][1]["source"] == f"{ENTRY}/share/*"
    if "roots" in extra:
        names = {"toplevel": result["toplevel"], "channel": result["channel"]}
        assert result["closureRoots"] == [names.get(r, r) for r in extra["roots"]]
    if "additionalPaths" in extra:
        assert spec["system"]["additionalPaths"] == extra["additionalPaths"]
    if extra.get("configFileInStore"):
        assert spec["configFile"].startswith(f"{STORE}/") and spec["configFile"].endswith("-fake-nixpkgs.nix")
    if "memSize" in extra:
        assert result["env"]["memSize"] == extra["memSize"]
    if "postVMTail" in extra:
        assert result["env"]["postVM"].rstrip().endswith(extra["postVMTail"])


def test_vm_derivation_runs_prepare_finalize_convert_in_vmtools_order() -> None:
    result = evaluate('{ format = "qcow2"; postVM = "echo user-post-vm"; }')
    env = result["env"]
    assert result["inVM"] is True
    assert "make-disk-image prepare" in env["preVM"] and "diskImage=nixos.raw" in env["preVM"]
    assert "make-disk-image finalize" in result["buildCommand"] and "--device /dev/vda" in result["buildCommand"]
    post = env["postVM"]
    assert post.index("make-disk-image convert") < post.index("diskImage=$out/nixos.qcow2") < post.index(
        "echo user-post-vm"
    )


def test_plain_derivation_when_no_vm_is_needed() -> None:
    result = evaluate('{ installBootLoader = false; postVM = "echo user-post-vm"; }')
    assert result["inVM"] is False
    cmd = result["buildCommand"]
    assert "preVM" not in result["env"] and "memSize" not in result["env"]
    # One builder process prepares and converts (prepare --out); then postVM sees the final image.
    order = ["make-disk-image prepare", '--out "$out"', "diskImage=$out/nixos.img", "echo user-post-vm"]
    positions = [cmd.index(s) for s in order]
    assert positions == sorted(positions)
    assert "make-disk-image convert" not in cmd


# (id, Nix arguments, fragments the error message must contain)
INVALID: list[tuple[str, str, list[str]]] = [
    ("unknown-close", '{ partitionTabletype = "efi"; }',
     ["unknown argument partitionTabletype", 'did you mean "partitionTableType"']),
    ("unknown-typo", "{ diskSise = 100; }", ["unknown argument diskSise", 'did you mean "diskSize"']),
    ("unknown-case", "{ memsize = 100; }", ["unknown argument memsize", 'did you mean "memSize"']),
    ("unknown-far", "{ frobnicate = true; }", ["unknown argument frobnicate", "known arguments:", "diskSize"]),
    ("disk-size-zero", "{ diskSize = 0; }", ["diskSize = 0", "positive integer"]),
    ("disk-size-negative", "{ diskSize = -5; }", ["diskSize = -5", '"auto"']),
    ("disk-size-word", '{ diskSize = "big"; }', ['diskSize = "big"', '"auto"']),
    ("additional-space-word", '{ additionalSpace = "lots"; }', ['additionalSpace = "lots"', "size string"]),
    ("additional-space-int", "{ additionalSpace = 512; }", ["additionalSpace = 512", "size string"]),
    ("boot-size-space", '{ bootSize = "256 M"; }', ['bootSize = "256 M"', "size string"]),
    ("boot-size-below-esp", '{ partitionTableType = "efi"; bootSize = "7M"; }',
     ['bootSize = "7M"', "END offset", "rounded as nixpkgs does, to 8 MiB", "starts at 8 MiB"]),
    ("boot-size-below-xbootldr", '{ partitionTableType = "efixbootldr"; bootSize = "64M"; }',
     ['bootSize = "64M"', "100 MiB"]),
    ("disk-smaller-than-boot", '{ partitionTableType = "efi"; diskSize = 200; }',
     ["diskSize = 200", 'bootSize = "256M"']),
    ("table-unknown", '{ partitionTableType = "gpt"; }', ['partitionTableType = "gpt"', '"legacy+gpt"']),
    ("table-case", '{ partitionTableType = "EFI"; }', ['partitionTableType = "EFI"', 'did you mean "efi"']),
    ("format-typo", '{ format = "qcow3"; }', ['format = "qcow3"', 'did you mean "qcow2"']),
    ("format-unknown", '{ format = "iso"; }', ['format = "iso"', '"raw"', '"vpc"']),
    ("fs-type", '{ fsType = "zfs"; }', ['fsType = "zfs"', '"ext4"', '"btrfs"']),
    ("fs-type-read-only-system", '{ fsType = "erofs"; }', ['fsType = "erofs"', "onlyNixStore = true"]),
    ("label-long-for-xfs", '{ fsType = "xfs"; label = "thirteen-char"; }', ['label = "thirteen-char"', "12"]),
    ("bool-string", '{ installBootLoader = "yes"; }', ['installBootLoader = "yes"', "true or false"]),
    ("bool-int", "{ copyChannel = 1; }", ["copyChannel = 1", "true or false"]),
    ("share-root-string", '{ shareRootFilesystem = "yes"; }', ['shareRootFilesystem = "yes"', "true or false"]),
    ("efi-vars-on-legacy", "{ touchEFIVars = true; }", ["touchEFIVars = true", 'partitionTableType = "legacy"']),
    ("store-only-bootloader", "{ onlyNixStore = true; }", ["installBootLoader = true", "onlyNixStore = true"]),
    ("store-only-contents",
     f'{{ onlyNixStore = true; installBootLoader = false; contents = [ {{ source = "{ENTRY}"; target = "/x"; }} ]; }}',
     ["contents = ", "onlyNixStore = true"]),
    ("store-only-config", f'{{ onlyNixStore = true; installBootLoader = false; configFile = "{ENTRY}"; }}',
     ["configFile = ", "onlyNixStore = true"]),
    ("deterministic-no-uuid", "{ rootFSUID = null; }", ["rootFSUID = null", "deterministic = true"]),
    ("gpuid-malformed", '{ rootGPUID = "not-a-guid"; }', ['rootGPUID = "not-a-guid"', "GUID"]),
    ("fsuid-malformed", '{ rootFSUID = "1234"; }', ['rootFSUID = "1234"', "UUID"]),
    ("label-slash", '{ label = "a/b"; }', ['label = "a/b"', '"/"']),
    ("label-null", "{ label = null; }", ["label = null", "filesystem label"]),
    ("mem-string", '{ memSize = "1024M"; }', ['memSize = "1024M"', "integer", "string of such digits"]),
    ("mem-string-zero", '{ memSize = "0"; }', ['memSize = "0"', "between 1 and"]),
    ("mem-float", "{ memSize = 1024.5; }", ["memSize = 1024.5", "integer"]),
    ("name-space", '{ name = "my image"; }', ['name = "my image"', "derivation name"]),
    ("name-leading-dot", '{ name = ".image"; }', ['name = ".image"', 'not starting with "."']),
    ("basename-slash", '{ baseName = "../x"; }', ['baseName = "../x"', "file name"]),
    ("contents-not-list", '{ contents = "file"; }', ['contents = "file"', "list"]),
    ("contents-no-target", f'{{ contents = [ {{ source = "{ENTRY}"; }} ]; }}', ["contents[0] has no target"]),
    ("contents-no-source", '{ contents = [ { target = "/x"; } ]; }', ["contents[0] has no source"]),
    ("contents-dotdot", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/a/../../x"; }} ]; }}',
     ['contents[0].target = "/a/../../x"', '".."']),
    ("contents-root-target", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/"; }} ]; }}',
     ['contents[0].target = "/"', "image root"]),
    ("contents-user-only", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; user = "root"; }} ]; }}',
     ["contents[0]", 'user = "root"', "group = null", "both"]),
    ("contents-mode", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; mode = "rwx"; }} ]; }}',
     ['contents[0].mode = "rwx"', "rsync --chmod string"]),
    ("contents-duplicate",
     f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; }} {{ source = "{EXTRA}"; target = "/x/"; }} ]; }}',
     ['contents[1].target = "/x/"', "duplicates"]),
    ("contents-bad-owner", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; user = "a b"; group = "c"; }} ]; }}',
     ['contents[0].user = "a b"', "user/group name"]),
    ("contents-uid-minus-one",
     f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; user = 4294967295; group = 0; }} ]; }}',
     ["contents[0].user = 4294967295", "0 to 4294967294"]),
    ("contents-gid-negative", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; user = 0; group = -1; }} ]; }}',
     ["contents[0].group = -1", "0 to 4294967294"]),
    ("contents-uid-huge-string",
     f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; user = "99999999999999999999"; group = "0"; }} ]; }}',
     ['contents[0].user = "99999999999999999999"', "0 to 4294967294"]),
    ("contents-relative-source", '{ contents = [ { source = "relative/file"; target = "/x"; } ]; }',
     ['contents[0].source = "relative/file"', "absolute path"]),
    ("additional-paths-relative", '{ additionalPaths = [ "relative" ]; }',
     ['additionalPaths = "relative"', "store path"]),
    ("additional-paths-not-list", f'{{ additionalPaths = "{ENTRY}"; }}', ["additionalPaths = ", "list"]),
    ("config-file-relative", '{ configFile = "configuration.nix"; }', ['configFile = "configuration.nix"', "path"]),
    ("post-vm-list", '{ postVM = [ "x" ]; }', ['postVM = [ "x" ]', "shell commands"]),
    ("efi-firmware-int", "{ efiFirmware = 3; }", ["efiFirmware = 3", "path"]),
    ("ovmf-string", '{ OVMF = "ovmf"; }', ['OVMF = "ovmf"', "pkgs.OVMF.fd"]),
    ("ovmf-without-variables", '{ partitionTableType = "efi"; touchEFIVars = true; OVMF = { firmware = "/f"; }; }',
     ["OVMF = ", "variables"]),
]


@pytest.mark.parametrize(("args", "fragments"), [pytest.param(a, f, id=i) for i, a, f in INVALID])
def test_invalid_arguments_fail_evaluation_naming_the_argument(args: str, fragments: list[str]) -> None:
    done = nix_eval(image_expr(args))
    assert done.returncode != 0, f"evaluation succeeded: {done.stdout[:300]}"
    message = done.stderr
    assert "makeDiskImage: " in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "assertion" not in message.lower() and "Traceback" not in message


def test_all_problems_are_reported_at_once() -> None:
    done = nix_eval(image_expr('{ diskSize = "x"; format = "iso"; memSize = 0; }'))
    assert done.returncode != 0
    for arg in ('diskSize = "x"', 'format = "iso"', "memSize = 0"):
        assert arg in done.stderr


def test_missing_required_argument_is_named() -> None:
    done = nix_eval(f"import {REPO}/nix/make-disk-image.nix {{ pkgs = {{ }}; lib = {{ }}; }}")
    assert done.returncode != 0
    assert "config" in done.stderr


def test_bad_grub_devices_from_config_are_named() -> None:
    done = nix_eval(image_expr("{ }", '{ grub = { enable = true; devices = [ "sda" ]; }; }'))
    assert done.returncode != 0
    assert 'config.boot.loader.grub.devices = [ "sda" ]' in done.stderr


def test_bad_limine_bios_device_from_config_is_named() -> None:
    done = nix_eval(image_expr("{ }", '{ limine = { enable = true; biosSupport = true; biosDevice = "sda"; }; }'))
    assert done.returncode != 0
    assert 'config.boot.loader.limine.biosDevice = "sda"' in done.stderr and '"nodev"' in done.stderr


def test_module_takes_any_ovmf_set_the_function_takes() -> None:
    # The function reads OVMF's firmware, variables and systemManagementModeRequired from any set.
    ovmf = '{ firmware = "/fw/CODE.fd"; variables = "/fw/VARS.fd"; systemManagementModeRequired = true; }'
    done = nix_eval(module_expr(f'{{ enable = true; partitionTableType = "efi"; touchEFIVars = true; OVMF = {ovmf};'
                                ' memSize = "2048"; }'))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["optionTypes"]["OVMF"] == {"name": "nullOr", "a": "attrs"}
    assert result["optionTypes"]["memSize"] == {"name": "either", "a": "positiveInt", "b": "strMatching"}
    spec = result["spec"]
    assert (spec["efiFirmware"], spec["efiVariables"], spec["memSize"]) == ("/fw/CODE.fd", "/fw/VARS.fd", 2048)
    assert "-machine q35,smm=on" in result["qemuOpts"]
    load_spec_document(spec)


# Arguments nixpkgs' function does not have (each off by default, so nixpkgs' callers get nixpkgs' behaviour).
OUR_ARGS = {"shareRootFilesystem"}


def test_every_nixpkgs_argument_is_accepted() -> None:
    # DESIGN §2 / nixpkgs-notes §1.1: every argument of the seed and of current nixpkgs, same names.
    nixpkgs_args = {
        "pkgs", "lib", "config", "diskSize", "additionalSpace", "bootSize", "contents", "partitionTableType",
        "installBootLoader", "touchEFIVars", "OVMF", "efiFirmware", "efiVariables", "fsType", "label",
        "configFile", "postVM", "memSize", "onlyNixStore", "name", "format", "baseName", "deterministic",
        "rootGPUID", "rootFSUID", "copyChannel", "additionalPaths",
    }
    done = nix_eval(f"(import {REPO}/nix/args).knownArgs")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == nixpkgs_args | OUR_ARGS


def _levenshtein(a: str, b: str) -> int:
    """Reference edit distance (case-insensitive) to check the Nix one against."""
    a, b = a.lower(), b.lower()
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_edit_distance_matches_a_reference() -> None:
    pairs = [("kitten", "sitting"), ("", "abc"), ("abc", ""), ("diskSize", "disksise"), ("flaw", "lawn"),
             ("partitionTableType", "partitiontabletype"), ("qcow3", "qcow2"), ("a", "a")]
    expr = "let A = import {}/nix/args; in [ {} ]".format(
        REPO, " ".join(f"(A.editDistance {json.dumps(a)} {json.dumps(b)})" for a, b in pairs)
    )
    done = nix_eval(expr)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [_levenshtein(a, b) for a, b in pairs]


def test_iec_parsing_matches_the_builder() -> None:
    from builder.units import parse_iec

    sizes = ["512M", "1.5G", "256MiB", "1", "0.5K", "3.333M", "1E", "100MB"]
    expr = "let A = import {}/nix/args; in map A.parseIEC [ {} ]".format(
        REPO, " ".join(json.dumps(s) for s in sizes)
    )
    done = nix_eval(expr)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [parse_iec(s) for s in sizes]


def module_expr(settings: str) -> str:
    """nix/module.nix evaluated by hand, without nixpkgs' module system (not available here).

    Options come from a stand-in lib.mkOption and types; config is the options' defaults overridden by
    `settings`, as the module system would merge them.
    """
    return f"""
let
  fake = import {FAKE} {{ }};
  inherit (fake) lib;
  eval = cfg: import {REPO}/nix/module.nix {{
    inherit lib;
    inherit (fake) pkgs;
    config = fake.config // {{ makeDiskImage = cfg; }};
  }};
  options = (eval {{ }}).options.makeDiskImage;
  cfg = builtins.mapAttrs (_: o: o.default) options // ({settings});
  # The module's config is lib.mkIf makeDiskImage.enable {{ ... }}, as the module system reads it.
  defined = (eval cfg).config;
  image = defined.content.system.build.diskImage;
in {{
  names = builtins.attrNames (removeAttrs options [ "enable" ]);
  defaults = builtins.mapAttrs (_: o: o.default) (removeAttrs options [ "label" "rootFSUID" "enable" ]);
  enableDefault = options.enable.default;
  definedIf = defined._type;
  condition = defined.condition;
  spec = image.spec;
  inVM = image.inVM or false;
  qemuOpts = image.env.QEMU_OPTS or "";
  optionTypes = builtins.mapAttrs (_: o: {{ inherit (o.type) name; }}
    // (if o.type ? a then {{ a = o.type.a.name; }} else {{ }})
    // (if o.type ? b then {{ b = o.type.b.name; }} else {{ }})) {{ inherit (options) OVMF memSize; }};
}}"""


def test_module_sets_the_image_only_when_enabled() -> None:
    # A configuration that defines system.build.diskImage itself (common, also in nixpkgs' tests) can
    # import the module: unless makeDiskImage.enable is set, the module defines nothing.
    done = nix_eval(module_expr("{ enable = false; }"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["enableDefault"] is False
    assert (result["definedIf"], result["condition"]) == ("if", False)
    enabled = json.loads(nix_eval(module_expr("{ enable = true; }")).stdout)
    assert (enabled["definedIf"], enabled["condition"]) == ("if", True)


def test_module_options_mirror_the_arguments() -> None:
    done = nix_eval(module_expr("{ enable = true; }"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    args = json.loads(nix_eval(f"(import {REPO}/nix/args).knownArgs").stdout)
    assert set(result["names"]) == set(args) - {"pkgs", "lib", "config"}
    defaults = json.loads(nix_eval(f"(import {REPO}/nix/args).defaults").stdout)
    assert result["defaults"] == defaults
    # Options left at their defaults give exactly the function's defaults (label, rootFSUID derived).
    assert result["spec"] == evaluate("{ }")["spec"]


def test_module_settings_reach_the_image() -> None:
    done = nix_eval(module_expr('{ enable = true; format = "vdi"; onlyNixStore = true; installBootLoader = false;'
                                ' partitionTableType = "none"; memSize = 2048; }'))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    spec = result["spec"]
    assert (spec["format"], spec["onlyNixStore"], spec["memSize"]) == ("vdi", True, 2048)
    assert spec["label"] == "nix-store", "label is not passed, so the function derives it from onlyNixStore"
    assert result["inVM"] is False
    load_spec_document(spec)
