"""A drop-in for nixpkgs' make-disk-image.nix as real callers see it (issue: drop-in on real nixpkgs).

Argument sets taken from nixpkgs' modules and tests, nixos-generators and third-party flakes evaluate
with real Nix and give a spec the builder loads; where nixpkgs does something surprising, the same is
done with an evaluation warning. The derivations carry what nixpkgs' carry (nixos-enter from pkgs, SMM
firmware options, Limine's device, postVM's PATH and shell functions), and images built without a VM
hold what nixpkgs' VM script writes (configFile, /etc/nixos) with identifiers random unless
deterministic. Images are read with debugfs, dumpe2fs and blkid, never with our own model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from builder.spec import SCHEMA_PATH, load_spec_document
from tests.support.imagecheck import debugfs, part_offset
from tests.support.nixeval import ENTRY, FAKE, REPO, nix_eval
from tests.support.specs import SpecFactory, spec_doc

# ---------------------------------------------------------------- real callers, evaluated by Nix


def call_expr(args: str, fake: str = "{ }") -> str:
    """makeDiskImage called with fake pkgs/config and args; returns the spec and the derivation's environment."""
    return f"""
let
  fake = import {FAKE} {fake};
  image = import {REPO}/nix/make-disk-image.nix ({{ inherit (fake) pkgs lib config; }} // ({args}));
in {{
  spec = image.spec;
  inVM = image.inVM or false;
  env = removeAttrs (image.env or {{ }}) [ "passthru" ];
  buildCommand = image.buildCommand;
}}"""


def call(args: str, fake: str = "{ }") -> tuple[dict[str, Any], str]:
    """Evaluate a call; the result and Nix's stderr (where warnings go). Fails the test on an error."""
    done = nix_eval(call_expr(args, fake))
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result, done.stderr


def warnings(stderr: str) -> list[str]:
    """The makeDiskImage evaluation warnings Nix printed (lib.warn)."""
    return re.findall(r"evaluation warning: makeDiskImage: (.*)", stderr)


# (id, where the call comes from, arguments, expected spec values, fragments of expected warnings)
REAL_CALLS: list[tuple[str, str, str, dict[str, Any], list[str]]] = [
    ("disk-image-module", "nixos/modules/virtualisation/disk-image.nix",
     '{ diskSize = "auto"; baseName = "nixos-image-qemu-25.11pre-git-x86_64-linux"; format = "qcow2";'
     ' partitionTableType = "efi"; }',
     {"diskSize": "auto", "format": "qcow2", "partitionTableType": "efi"}, []),
    ("image-contents-test", "nixos/tests/image-contents.nix",
     f'{{ format = "qcow2"; contents = [ {{ source = "{ENTRY}"; target = "/testFile"; user = "1234";'
     f' group = "5678"; mode = "755"; }} {{ source = "{ENTRY}/dir"; target = "/testDir"; }} ]; }}',
     {"contents": [{"source": ENTRY, "target": "/testFile", "mode": "755", "user": "1234", "group": "5678"},
                   {"source": f"{ENTRY}/dir", "target": "/testDir", "mode": None, "user": None, "group": None}]},
     []),
    ("disk-size-string", "nixos-generators users (diskSize from a string option)",
     '{ diskSize = "102400"; format = "raw"; }', {"diskSize": 102400}, []),
    ("relative-target", "make-disk-image.nix's own documented example (boot/memtest.bin)",
     f'{{ contents = [ {{ source = "{ENTRY}/memtest.bin"; target = "boot/memtest.bin"; }} ]; }}',
     {"contents": [{"source": f"{ENTRY}/memtest.bin", "target": "/boot/memtest.bin", "mode": None,
                    "user": None, "group": None}]}, []),
    ("rsync-chmod-modes", "third-party flakes (rsync --chmod strings)",
     f'{{ contents = [ {{ source = "{ENTRY}/a"; target = "/a"; mode = "u+x"; }}'
     f' {{ source = "{ENTRY}/b"; target = "/b"; mode = "a=r,u+w"; }}'
     f' {{ source = "{ENTRY}/c"; target = "/c"; mode = "D755,F644"; }} ]; }}',
     {}, []),
    ("unknown-content-key", "a typo nixpkgs ignores",
     f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; permissions = "0644"; }} ]; }}',
     {"contents": [{"source": ENTRY, "target": "/x", "mode": None, "user": None, "group": None}]},
     ['contents[0] has an unknown attribute "permissions", which is ignored']),
    ("ext2-none", "nixpkgs runs mkfs.${fsType} for partitionTableType = \"none\"",
     '{ fsType = "ext2"; partitionTableType = "none"; installBootLoader = false; }',
     {"fsType": "ext2", "rootFSUID": "F222513B-DED1-49FA-B591-20CE86A2FE7F"}, []),
    ("ext3-none", "nixpkgs runs mkfs.${fsType} for partitionTableType = \"none\"",
     '{ fsType = "ext3"; partitionTableType = "none"; }', {"fsType": "ext3"}, []),
    ("long-ext4-label", "mke2fs truncates labels over 16 bytes",
     '{ label = "a-label-longer-than-sixteen"; }', {"label": "a-label-longer-than-sixteen"},
     ['label = "a-label-longer-than-sixteen" is longer than the 16 bytes ext4 stores']),
    ("small-mem-size", "nixpkgs passes memSize to qemu as it is", "{ memSize = 96; }", {"memSize": 96},
     ["memSize = 96 MiB is below 128"]),
    ("uuid-not-deterministic", "nixpkgs ignores rootFSUID unless deterministic",
     '{ deterministic = false; rootFSUID = "12345678-1234-1234-1234-123456789ABC"; }', {"deterministic": False},
     ['rootFSUID = "12345678-1234-1234-1234-123456789ABC" is ignored with deterministic = false']),
    ("amazon-like", "nixos/maintainers/scripts/ec2/amazon-image.nix",
     f'{{ fsType = "ext4"; configFile = "{ENTRY}/configuration.nix"; format = "vpc"; partitionTableType = "legacy+gpt";'
     f' diskSize = 3072; copyChannel = false; postVM = "{ENTRY}/bin/jq . $diskImage.json || true"; }}',
     {"format": "vpc", "diskSize": 3072, "copyChannel": False}, []),
]


@pytest.mark.parametrize(("args", "expected", "warned"),
                         [pytest.param(a, e, w, id=i) for i, _, a, e, w in REAL_CALLS])
def test_real_callers_arguments_are_accepted(args: str, expected: dict[str, Any], warned: list[str]) -> None:
    result, stderr = call(args)
    spec = result["spec"]
    for key, value in expected.items():
        assert spec[key] == value, key
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    assert [e.message for e in validator.iter_errors(spec)] == []
    load_spec_document(spec)
    said = warnings(stderr)
    assert len(said) == len(warned), said
    for fragment, message in zip(warned, said, strict=True):
        assert fragment in message


def test_the_builder_truncates_a_long_ext4_label_as_mke2fs_does() -> None:
    result, _ = call('{ label = "ééééééééé"; }')  # 18 bytes: 8 whole characters fit in 16
    assert load_spec_document(result["spec"]).label == "éééééééé"


# ---------------------------------------------------------------- the derivations, as nixpkgs' carry them


def test_nixos_enter_comes_from_pkgs() -> None:
    # nixpkgs 25.11 deprecates config.system.build.nixos-enter; the fake's is named differently to tell.
    result, stderr = call("{ }")
    inputs = result["env"]["nativeBuildInputs"]
    assert any(str(p).endswith("-nixos-enter") for p in inputs), inputs
    assert not any("nixos-enter-from-config" in str(p) for p in inputs)
    assert "deprecated" not in stderr
    older, _ = call("{ }", "{ nixosEnterPackage = false; }")
    assert any("nixos-enter-from-config" in str(p) for p in older["env"]["nativeBuildInputs"])


SMM = ["-machine q35,smm=on", "-global driver=cfi.pflash01,property=secure,value=on"]


def test_secure_boot_firmware_gets_system_management_mode() -> None:
    # nixpkgs: QEMU_OPTS gets these when OVMF.systemManagementModeRequired (OVMFFull, secure boot).
    ovmf = ('OVMF = { firmware = "/fw/code.secboot.fd"; variables = "/fw/vars.fd";'
            " systemManagementModeRequired = true; };")
    result, _ = call(f'{{ partitionTableType = "efi"; touchEFIVars = true; {ovmf} }}')
    opts = result["env"]["QEMU_OPTS"]
    assert all(o in opts for o in SMM), opts
    assert "file=/fw/code.secboot.fd" in opts
    by_default, _ = call('{ partitionTableType = "efi"; touchEFIVars = true; }', "{ smm = true; }")
    assert all(o in by_default["env"]["QEMU_OPTS"] for o in SMM), "pkgs.OVMF.fd's own flag counts too"
    plain, _ = call('{ partitionTableType = "efi"; touchEFIVars = true; }')
    assert not any(o in plain["env"]["QEMU_OPTS"] for o in SMM)


@pytest.mark.parametrize("args", ["{ }", '{ partitionTableType = "efi"; }',
                                  '{ partitionTableType = "efi"; touchEFIVars = true; }'])
def test_default_firmware_needing_smm_gets_it_with_or_without_efi_vars(args: str) -> None:
    # nixpkgs' make-disk-image.nix: `lib.optionals (OVMF.systemManagementModeRequired or false)`, OVMF being
    # its argument's default pkgs.OVMF.fd, whatever touchEFIVars is (issue 21).
    result, _ = call(args, "{ smm = true; }")
    assert result["inVM"] is True
    opts = result["env"]["QEMU_OPTS"]
    assert all(o in opts for o in SMM), opts
    assert ("if=pflash" in opts) == ("touchEFIVars" in args)
    given = ('OVMF = { firmware = "/fw/code.fd"; variables = "/fw/vars.fd"; systemManagementModeRequired = true; };')
    with_ovmf, _ = call(args.replace("{", "{ " + given, 1))
    assert all(o in with_ovmf["env"]["QEMU_OPTS"] for o in SMM)
    without, _ = call(args)
    assert not any(o in without["env"]["QEMU_OPTS"] for o in SMM)


def test_mem_size_as_digits_reaches_the_vm() -> None:
    # nixpkgs passes memSize to vmTools, which reads it through toString: "2048" and 2048 are one value.
    as_string, _ = call('{ memSize = "2048"; }')
    as_int, _ = call("{ memSize = 2048; }")
    assert as_string["env"]["memSize"] == as_int["env"]["memSize"] == 2048
    assert as_string["spec"] == as_int["spec"]


def test_limine_bios_device_reaches_the_spec() -> None:
    limine = '{ limine = { enable = true; biosSupport = true; biosDevice = "/dev/disk/by-id/virtio-root"; }; }'
    result, _ = call('{ partitionTableType = "legacy+boot"; }', limine)
    assert result["spec"]["bootLoader"]["limineBiosDevice"] == "/dev/disk/by-id/virtio-root"
    # NixOS' default "nodev": built as nixpkgs builds it; finalize links nothing, limine-install.py installs
    # Limine's stage 2 only.
    nodev, _ = call('{ partitionTableType = "legacy+boot"; }', "{ limine = { enable = true; biosSupport = true; }; }")
    assert nodev["spec"]["bootLoader"]["limineBiosDevice"] == "nodev"
    from builder.vm.finalize import render

    script = render(load_spec_document(nodev["spec"]), "/dev/vda")
    assert "ln -sfn /dev/vda nodev" not in script and "NIXOS_INSTALL_BOOTLOADER=1" in script
    efi_only = '{ limine = { enable = true; biosSupport = false; biosDevice = "/dev/sda"; }; }'
    assert call("{ }", efi_only)[0]["spec"]["bootLoader"]["limineBiosDevice"] is None
    assert call("{ }")[0]["spec"]["bootLoader"]["limineBiosDevice"] is None


POST_VM_TOOLS = ["rsync", "util-linux", "parted", "e2fsprogs", "gptfdisk", "nix", "systemd-minimal",
                 "coreutils", "gnutar", "gzip", "xz", "bzip2", "findutils", "gnused", "gnugrep", "gawk"]


@pytest.mark.parametrize("args", ["{ }", "{ installBootLoader = false; }", "{ deterministic = false; }"])
def test_post_vm_runs_after_the_checks_with_nixpkgs_path_and_functions(args: str) -> None:
    result, _ = call(args)
    script = result["env"]["postVM"] if result["inVM"] else result["buildCommand"]
    user_part = script[script.index("export PATH="):]
    path = user_part.split("\n", 1)[0].removeprefix("export PATH=").split(":")
    for tool in POST_VM_TOOLS:
        assert any(p.endswith(f"-{tool}/bin") for p in path), (tool, path)
    assert "post-vm-env.sh" in user_part.split("\n", 2)[1]
    # nixpkgs' preVM variables (root, bootSize, bootSizeMiB, START, SECTORS), written by prepare, are sourced
    # before the user's part.
    assert "source ./pre-vm-variables.sh" in user_part.split("\n", 3)[2]
    prepare = script if not result["inVM"] else result["env"]["preVM"]
    assert "--pre-vm-variables pre-vm-variables.sh" in prepare
    if result["inVM"]:
        # Checked after the VM whether or not the build is deterministic; then converted.
        assert script.index("make-disk-image after-vm") < script.index("make-disk-image convert")
        assert script.index("make-disk-image convert") < script.index("export PATH=")
        assert result["env"]["enableParallelBuilding"] is ("deterministic = false" in args)


# ---------------------------------------------------------------- the spec loader takes the same


def test_the_loader_accepts_what_nixpkgs_accepts(fixture_spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = spec_doc(fixture_spec)
    entry = {**base["contents"][0], "target": "srv/relative", "permissions": "0644"}
    doc = {**base, "diskSize": "2048", "label": "a-label-longer-than-sixteen", "memSize": 64,
           "contents": [entry], "fsType": "ext3"}
    spec = load_spec_document(doc)
    assert spec.disk_size == 2048 * 1024 * 1024
    assert spec.contents[0].target == "/srv/relative"
    assert spec.label == "a-label-longer-t"
    assert spec.fs_type == "ext3"
    said = " ".join(spec.warnings)
    for fragment in ("truncated to \"a-label-longer-t\"", "memSize = 64 MiB", 'unknown attribute "permissions"'):
        assert fragment in said


# ---------------------------------------------------------------- images built without a VM


def inode_mode(image: Path, offset: int, path: str) -> str:
    """'<type> <permission bits>' as debugfs reports them for path, or '' when the path does not exist."""
    out = debugfs(image, offset, f'stat "{path}"')
    found = re.search(r"Type:\s+(\w+)\s+Mode:\s+(\d+)", out)
    return f"{found.group(1)} {found.group(2)}" if found else ""


def prepare(spec: Path, image: Path) -> None:
    """Run `python -m builder prepare` on a spec; fail with its stderr."""
    done = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(image)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_config_file_and_etc_nixos_without_a_vm(make_spec: SpecFactory, tmp_path: Path) -> None:
    # nixpkgs' VM script runs `mkdir -p /mnt/etc/nixos` and `cp $configFile ...configuration.nix` for every
    # image that is not store-only; here no VM runs (no bootloader, numeric owners) and both must be there.
    config = tmp_path / "configuration.nix"
    config.write_text("{ ... }: { networking.hostName = \"dropin\"; }\n")
    os.chmod(config, 0o444)  # as a store path is: cp keeps it (minus the umask 022)
    with_config = make_spec(installBootLoader=False, configFile=str(config))
    without = make_spec(installBootLoader=False, configFile=None)
    for spec, image in ((with_config, tmp_path / "with.img"), (without, tmp_path / "without.img")):
        assert not load_spec_document(spec_doc(spec)).needs_vm
        prepare(spec, image)
    offset = part_offset(tmp_path / "with.img", 2)
    assert inode_mode(tmp_path / "with.img", offset, "/etc/nixos") == "directory 0755"
    assert inode_mode(tmp_path / "with.img", offset, "/etc/nixos/configuration.nix") == "regular 0444"
    assert debugfs(tmp_path / "with.img", offset, 'cat "/etc/nixos/configuration.nix"') == config.read_text()
    assert inode_mode(tmp_path / "without.img", offset, "/etc/nixos") == "directory 0755"
    assert inode_mode(tmp_path / "without.img", offset, "/etc/nixos/configuration.nix") == ""


def blkid(image: Path, offset: int, tag: str) -> str:
    """A tag blkid reads from the filesystem at offset."""
    done = subprocess.run(["blkid", "-p", "-O", str(offset), "-s", tag, "-o", "value", str(image)],
                          capture_output=True, text=True)
    return done.stdout.strip()


def test_not_deterministic_draws_fresh_identifiers(make_spec: SpecFactory, tmp_path: Path) -> None:
    # nixpkgs pins the ext4 UUID (to rootFSUID) only when deterministic; two images attached to one machine
    # must not collide. The ESP's FAT volume id and the directory hash seed are drawn afresh too.
    given = "12345678-1234-1234-1234-123456789abc"
    spec = make_spec(installBootLoader=False, deterministic=False, rootFSUID=given)
    images = [tmp_path / "one.img", tmp_path / "two.img"]
    for image in images:
        prepare(spec, image)
    root = part_offset(images[0], 2)
    esp = part_offset(images[0], 1)
    uuids = [blkid(i, root, "UUID") for i in images]
    assert uuids[0] != uuids[1] and given not in uuids and all(uuids)
    seeds = [re.search(r"Directory Hash Seed:\s+(\S+)", subprocess.run(
        ["dumpe2fs", "-h", f"{i}?offset={root}"], capture_output=True, text=True).stdout) for i in images]
    assert seeds[0] and seeds[1] and seeds[0].group(1) != seeds[1].group(1)
    fat_ids = [blkid(i, esp, "UUID") for i in images]
    assert fat_ids[0] != fat_ids[1] and all(fat_ids)
    pinned = make_spec(installBootLoader=False, deterministic=True, rootFSUID=given)
    prepare(pinned, tmp_path / "pinned.img")
    assert blkid(tmp_path / "pinned.img", root, "UUID") == given


@pytest.mark.parametrize("fs", ["ext2", "ext3"])
def test_ext2_and_ext3_roots(fs: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    # nixpkgs runs mkfs.${fsType} for partitionTableType = "none"; the builder makes them with mke2fs -d.
    spec = make_spec(installBootLoader=False, partitionTableType="none", fsType=fs, label="root-label-of-20b")
    image = tmp_path / "root.img"
    prepare(spec, image)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert blkid(image, 0, "TYPE") == fs
    assert blkid(image, 0, "LABEL") == "root-label-of-20"
    features = re.search(r"Filesystem features:\s+(.*)", subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout)
    assert features is not None
    assert ("has_journal" in features.group(1)) == (fs == "ext3")
    assert "extent" not in features.group(1)
    assert "Type: regular" in debugfs(image, 0, 'stat "/etc/NIXOS"')


def test_post_vm_sees_nixpkgs_functions_and_out(make_spec: SpecFactory, tmp_path: Path) -> None:
    post = ('echo "$(sectorsToBytes 2048) $(sectorsToKilobytes 2048) $(round_to_nearest 4096 4096) $mebibyte" '
            '> "$out/functions"; printf "3\\n4\\n" | sum_lines >> "$out/functions"; test -f "$diskImage"')
    spec = make_spec(installBootLoader=False, postVM=post)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "functions").read_text() == f"1048576 1024 8192 {1024 * 1024}\n7\n"


TABLES = ["legacy", "legacy+boot", "legacy+gpt", "efi", "efixbootldr", "hybrid", "none"]


@pytest.mark.parametrize("table", TABLES)
def test_post_vm_sees_nixpkgs_pre_vm_variables(table: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    # nixpkgs' preVM: root="$PWD/root"; bootSize=$(round_to_nearest $(numfmt --from=iec bootSize) $mebibyte);
    # bootSizeMiB=$((bootSize / 1024 / 1024))MiB; `eval $(partx $diskImage -o START,SECTORS --nr N --pairs)`
    # with a table. The same shell runs postVM, so it sees them; compared with partx on the image itself.
    post = 'echo "$root|$bootSize|$bootSizeMiB|${START-unset}|${SECTORS-unset}" > "$out/vars"'
    fs = {"fsType": "erofs", "onlyNixStore": True, "contents": [], "label": "nix-store"} if table == "none" else {}
    spec = make_spec(installBootLoader=False, partitionTableType=table, bootSize="200M", postVM=post, **fs)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    root, boot, boot_mib, start, sectors = (out / "vars").read_text().rstrip("\n").split("|")
    assert (root, boot, boot_mib) == (f"{tmp_path}/root", str(201 * 1024 * 1024), "201MiB")
    if table == "none":
        assert (start, sectors) == ("unset", "unset")
        return
    number = {"legacy": 1, "legacy+boot": 2, "legacy+gpt": 2, "efi": 2, "efixbootldr": 3, "hybrid": 3}[table]
    image = next(out.glob("*.img"))
    real = subprocess.run(["partx", str(image), "-o", "START,SECTORS", "--nr", str(number), "--pairs"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert real == f'START="{start}" SECTORS="{sectors}"'
