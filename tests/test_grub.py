"""GRUB installed by prepare without a VM: legacy, legacy+gpt, efi, hybrid on x86_64 and efi on aarch64.

The fixture system (Debian parts, not NixOS) with `--loader grub` and Debian's GRUB modules; `python -m builder
build` must start no VM (a poisoned qemu on PATH proves it), write grub.cfg as install-grub.pl writes it on a
first install (nixpkgs f5271680c4a5 nixos/modules/system/boot/loader/grub/install-grub.pl, read by the real
debugfs/mtools out of the image and compared line by line with text written here from that script), be
bit-for-bit reproducible (legacy, efi, hybrid, aarch64 efi), and boot: BIOS tables under SeaBIOS, EFI under
OVMF or AAVMF, hybrid under both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.boot.bootspec import parse_bootspec, read_bootspec
from builder.boot.grub import FsId, grub_cfg, grubenv, load_plan, mkimage
from builder.boot.grub_config import parse_grub
from builder.errors import BuildError, SpecError, UserError
from builder.spec import load_spec_document
from tests.fixtures.system import grub_system_spec
from tests.support.imagecheck import blkid, debugfs, e2fsck_clean, part_offset, sfdisk_json
from tests.support.qemu_boot import boot_facts
from tests.test_sdboot import mdir_tree, mtype, poisoned_qemu

REPO = Path(__file__).resolve().parent.parent
SECTOR = 512


def test_grubenv_is_grub_editenvs(tmp_path: Path) -> None:
    subprocess.run(["grub-editenv", str(tmp_path / "grubenv"), "create"], check=True)
    assert grubenv() == (tmp_path / "grubenv").read_bytes()


def test_options_place_their_text_as_install_grub_does(tmp_path: Path) -> None:
    # A store with a toplevel (kernel, initrd, init), read through realpath as install-grub.pl's abs_path does.
    store = tmp_path / "store"
    top = store / "t-toplevel"
    for name in ("k-linux/bzImage", "i-initrd/initrd", "t-toplevel/init"):
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_text("x")
    boot = parse_bootspec({"org.nixos.bootspec.v1": {
        "init": f"{top}/init", "initrd": f"{store}/i-initrd/initrd", "kernel": f"{store}/k-linux/bzImage",
        "kernelParams": ["quiet"], "label": "L", "system": "x86_64-linux", "toplevel": str(top)}}, "b", str(store))
    cfg = parse_grub({**grub_section_defaults(), "splashImage": "/nix/store/s-splash.png", "fsIdentifier": "label",
                      "extraEntries": "menuentry x { chainloader @bootRoot@/x.efi }", "extraEntriesBeforeNixOS": True,
                      "extraPerEntryConfig": "insmod ext2", "extraConfig": "serial --unit=0"})
    assert cfg is not None
    text, copied = grub_cfg(cfg, boot, str(top), str(store), FsId("AAAA-BBBB", "ESP"), None, "2023-11-14")
    lines = text.split("\n")
    # /boot is the ESP: search by label, kernels copied to ($drive1)//kernels/<name>.
    assert lines[2] == "        search --set=drive1 --label ESP"
    splash = lines.index("            insmod png")
    assert lines[splash - 1:splash + 10] == [
        "    ",  # the header's closing line, then the splash block's "\n"
        "            insmod png",
        "            if background_image ($drive1)//background.png; then",
        "              set color_normal=white/black",
        "              set color_highlight=black/white",
        "            else",
        "              set menu_color_normal=cyan/blue",
        "              set menu_color_highlight=white/blue",
        "            fi",
        "        serial --unit=0",  # the block's closing `        ";` then "$extraConfig\n"
        "",
    ]
    # extraEntries before the default entry, @bootRoot@ replaced by $grubBoot->path; extraPerEntryConfig indented.
    start = lines.index("menuentry x { chainloader ($drive1)//x.efi }")
    assert lines[start + 1:start + 8] == [
        'menuentry "NixOS - Default" {', "search --set=drive1 --label ESP", "  insmod ext2",
        f"  linux ($drive1)//kernels/k-linux-bzImage systemConfig={top} init={top}/init quiet",
        "  initrd ($drive1)//kernels/i-initrd-initrd", "}", ""]
    assert copied == [f"{store}/k-linux/bzImage", f"{store}/i-initrd/initrd"]
    # No nixos-version in the toplevel: addProfile skips the generation, the submenu is empty.
    assert lines[-3:] == ['submenu "NixOS - All configurations" {', "}", ""]


def test_a_splash_image_fifo_is_refused_without_blocking(grub_doc: dict[str, Any], tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "splash.png")
    doc = json.loads(json.dumps(grub_doc))
    doc["bootLoader"]["grub"]["splashImage"] = str(tmp_path / "splash.png")
    with pytest.raises(UserError, match="splashImage .*a FIFO, not a regular file"):
        load_plan(load_spec_document(doc))


def test_negative_timeout_and_configuration_limit_are_written_as_install_grub_does(grub_doc: dict[str, Any]) -> None:
    # grub.nix hands boot.loader.timeout (null as -1) and configurationLimit to install-grub.pl, which writes
    # `set timeout=$timeout` with Perl's int() and stops its generation loop at once when the limit is < 1.
    doc = json.loads(json.dumps(grub_doc))
    doc["bootLoader"]["grub"].update(timeout=-1, configurationLimit=-1)
    spec = load_spec_document(doc)
    assert spec.grub is not None
    text, _ = grub_cfg(spec.grub, read_bootspec(spec.toplevel, spec.store_dir), spec.toplevel, spec.store_dir,
                       FsId(str(spec.root_fsuid), spec.label), FsId(str(spec.root_fsuid), spec.label), "2023-11-14")
    assert "          set timeout=-1\n" in text
    assert text.endswith('submenu "NixOS - All configurations" {\n}\n')


def test_grub_mkimage_runs_through_the_process_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # builder/process.run: logged under MDI_DEBUG=1, the exit status and output's end in the error.
    monkeypatch.setenv("MDI_DEBUG", "1")
    cfg = parse_grub({**grub_section_defaults(), "mkimage": "/bin/false"})
    assert cfg is not None
    with pytest.raises(BuildError, match=r"grub-mkimage for x86_64-efi \(/bin/false\) \(exit 1\)"):
        mkimage(cfg, "/nix/store/g-grub", "x86_64-efi", "(,gpt1)/grub", ["part_gpt"], tmp_path / "core.efi")
    assert "$ /bin/false -O x86_64-efi -d /nix/store/g-grub/lib/grub/x86_64-efi" in capsys.readouterr().err


def grub_section_defaults() -> dict[str, Any]:
    """A bootLoader.grub section with grub.nix's defaults (packages are not read by grub_cfg)."""
    return {"biosPackage": None, "efiPackage": "/nix/store/g-grub", "mkimage": "/usr/bin/grub-mkimage",
            "system": "x86_64-linux", "fullName": "grub", "fullVersion": "2.12", "timeout": 5, "default": 0,
            "extraConfig": "", "extraEntries": "", "extraEntriesBeforeNixOS": False, "extraPerEntryConfig": "",
            "splashImage": None, "configurationLimit": 100, "fsIdentifier": "uuid", "gfxmodeEfi": "auto",
            "gfxmodeBios": "1024x768", "bootloaderId": "NixOS-boot", "efiSysMountPoint": "/boot",
            "efiInstallAsRemovable": False}


@pytest.fixture(scope="module")
def grub_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The x86_64 legacy fixture's no-VM GRUB spec document."""
    doc: dict[str, Any] = json.loads(grub_system_spec(tmp_path_factory.mktemp("grub-spec")).read_text())
    return doc


def test_grub_needs_no_vm_unless_something_else_does(grub_doc: dict[str, Any]) -> None:
    spec = load_spec_document(grub_doc)
    assert spec.installs_grub and not spec.needs_vm
    spec = load_spec_document({**grub_doc, "touchEFIVars": False, "contents": [
        {"source": "/etc/hostname", "target": "/srv/x", "mode": None, "user": "fixtureuser", "group": "root"}]})
    assert spec.needs_vm and not spec.installs_grub  # the system's own installer runs in the VM


@pytest.mark.parametrize(("change", "fragment"), [
    ({"fsType": "xfs", "rootFSUID": "F222513B-DED1-49FA-B591-20CE86A2FE7F"}, "ext2, ext3 or ext4"),
    ({"deterministic": False}, "needs the root's UUID"),
    ({"partitionTableType": "efixbootldr", "bootSize": "160M"}, "biosPackage"),
    ({"grubDevices": []}, "names no disk"),
])
def test_grub_sections_that_cannot_work_are_refused(grub_doc: dict[str, Any], change: dict[str, Any],
                                                     fragment: str) -> None:
    doc = json.loads(json.dumps(grub_doc))
    if "grubDevices" in change:
        doc["bootLoader"]["grubDevices"] = change.pop("grubDevices")
    doc.update(change)
    with pytest.raises(SpecError, match=fragment):
        load_spec_document(doc)


def test_grub_for_bios_on_aarch64_is_refused(grub_doc: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(grub_doc))
    doc["bootLoader"]["grub"]["system"] = "aarch64-linux"
    with pytest.raises(SpecError, match="cannot boot GRUB's i386-pc"):
        load_spec_document(doc)


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value", "message"), [
    ("mkimage", "/nonexistent/bin/grub-mkimage",
     "bootLoader.grub.mkimage: '/nonexistent/bin/grub-mkimage' is not an executable file"),
    ("splashImage", "/dev/zero", "bootLoader.grub.splashImage: '/dev/zero' is under /dev"),
    # procfs reads as a regular file: only the /proc, /sys, /dev refusal keeps the builder's environment out.
    ("splashImage", "/proc/self/environ", "bootLoader.grub.splashImage: '/proc/self/environ' is under /proc"),
])
def test_unusable_grub_files_are_the_users_error_before_any_work(grub_doc: dict[str, Any], tmp_path: Path, key: str,
                                                                 value: str, message: str) -> None:
    doc = json.loads(json.dumps(grub_doc))
    doc["bootLoader"]["grub"][key] = value
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(doc))
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-3000:]
    assert message in res.stderr
    assert "Traceback" not in res.stderr and "mkfs" not in res.stderr
    assert not (tmp_path / "out" / "fixture.img").exists()


# ---------------------------------------------------------------- images built with `python -m builder build`

@dataclass(frozen=True)
class Built:
    """An image built without a VM, its spec document and the fixture's bootspec."""

    image: Path
    doc: dict[str, Any]
    bootspec: dict[str, Any]


def build_no_vm(tmp: Path, arch: str, table: str, work: str = "work") -> Built:
    """Build the fixture's no-VM GRUB image; fail if it started a VM."""
    spec = grub_system_spec(tmp / "spec", arch, table)
    env, marker = poisoned_qemu(tmp / "poison")
    res = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--out", str(tmp / f"out-{work}"),
                          "--work", str(tmp / work)], cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not marker.exists(), f"a VM was started: {marker.read_text()}"
    assert "finalize (VM)" not in res.stderr
    doc = json.loads(spec.read_text())
    bootspec = json.loads((Path(doc["system"]["toplevel"]) / "boot.json").read_text())
    return Built(Path(res.stdout.strip()), doc, bootspec)


JOBS = {  # name -> (arch, table, firmwares it boots with)
    "legacy": ("x86_64", "legacy", ("bios",)),
    "legacy+gpt": ("x86_64", "legacy+gpt", ("bios",)),
    "efi": ("x86_64", "efi", ("uefi",)),
    "hybrid": ("x86_64", "hybrid", ("bios", "uefi")),
    "aarch64-efi": ("aarch64", "efi", ("uefi",)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Every image, built one after the other (about a second each)."""
    return {name: build_no_vm(tmp_path_factory.mktemp(name), arch, table) for name, (arch, table, _) in JOBS.items()}


def header(store_search: str | None, boot_search: str, boot_path: str) -> list[str]:
    """The lines install-grub.pl's "Generate the header" block gives for GRUB 2 (no splash image, no extraConfig).

    `$conf .= "\\n            " . $grubStore->search` only when the kernels are not copied; then the block
    from `"\\n        " . $grubBoot->search` to the closing `    ";` with default 0, timeout 0 (the fixture's),
    gfxmodeEfi "auto" and gfxmodeBios "1024x768" (grub.nix's defaults); then `"$extraConfig\\n"` and `"\\n"`.
    """
    lines = ["# Automatically generated.  DO NOT EDIT THIS FILE!", ""]
    if store_search is not None:
        lines += ["            " + store_search]
    return lines + [
        "        " + boot_search,
        "        if [ -s $prefix/grubenv ]; then",
        "          load_env",
        "        fi",
        "",
        "        # \u2018grub-reboot\u2019 sets a one-time saved entry, which we process here and",
        "        # then delete.",
        '        if [ "${next_entry}" ]; then',
        "          # FIXME: KDM expects the next line to be present.",
        '          set default="${saved_entry}"',
        '          set default="${next_entry}"',
        "          set next_entry=",
        "          save_env next_entry",
        "          set timeout=1",
        "        else",
        "          set default=0",
        "          set timeout=0",
        "        fi",
        "",
        "        # Setup the graphics stack for bios and efi systems",
        '        if [ "${grub_platform}" = "efi" ]; then',
        "          insmod efi_gop",
        "          insmod efi_uga",
        "        else",
        "          insmod vbe",
        "        fi",
        "        insmod font",
        f"        if loadfont {boot_path}/grub/fonts/unicode.pf2; then",
        "          insmod gfxterm",
        '          if [ "${grub_platform}" = "efi" ]; then',
        "            set gfxmode=auto",
        "            set gfxpayload=keep",
        "          else",
        "            set gfxmode=1024x768",
        "            set gfxpayload=text",
        "          fi",
        "          terminal_output gfxterm",
        "        fi",
        "    ",  # the block's closing `    ";`, then "$extraConfig\n" with extraConfig = ""
        "",  # $conf .= "\n"
    ]


def entry(name: str, searches: list[str], kernel: str, initrd: str, params: str) -> list[str]:
    """addEntry's lines for GRUB 2 without xen or extraPerEntryConfig: the searches unindented, then a blank line."""
    return [f'menuentry "{name}" {{', *searches, f"  linux {kernel} {params}", f"  initrd {initrd}", "}", ""]


def expected_cfg(b: Built, boot_search: str, store_search: str | None, boot_path: str, kernel: str,
                 initrd: str) -> list[str]:
    """grub.cfg's lines on a first install: header, the default entry, extraEntries (""), the submenu."""
    main = b.bootspec["org.nixos.bootspec.v1"]
    toplevel = main["toplevel"]
    params = f"systemConfig={toplevel} init={toplevel}/init {' '.join(main['kernelParams'])}"
    searches = [boot_search] + ([store_search] if store_search else [])
    version = Path(toplevel, "nixos-version").read_text().rstrip("\n")
    return (header(store_search, boot_search, boot_path)
            + entry("NixOS - Default", searches, kernel, initrd, params)
            + [""]  # "$extraEntries\n" with extraEntries = ""
            + ['submenu "NixOS - All configurations" {']
            # addProfile: system-1-link, dated by its mtime (the epoch, 2023-11-14) and its nixos-version.
            + entry(f"NixOS - Configuration 1 (2023-11-14 - {version})", searches, kernel, initrd, params)
            + ["}"])


@pytest.mark.slow
def test_legacy_grub_cfg_is_install_grubs_line_by_line(built: dict[str, Built]) -> None:
    b = built["legacy"]
    root = part_offset(b.image, 1)
    assert e2fsck_clean(b.image, root).returncode == 0
    uuid = blkid(b.image, root)["UUID"]
    main = b.bootspec["org.nixos.bootspec.v1"]
    # /boot and the store are on the root: no copy, drive1 for /boot, drive2 for the store (GrubFs order).
    boot_search, store_search = f"search --set=drive1 --fs-uuid {uuid}", f"search --set=drive2 --fs-uuid {uuid}"
    kernel = "($drive2)" + os.path.realpath(main["kernel"])
    initrd = "($drive2)" + os.path.realpath(main["initrd"])
    cfg = debugfs(b.image, root, "cat /boot/grub/grub.cfg")
    assert cfg.split("\n") == expected_cfg(b, boot_search, store_search, "($drive1)/boot", kernel, initrd) + [""]
    assert debugfs(b.image, root, "cat /boot/grub/state") == "grub\n2.06\nno\n/dev/vda\n/boot\n"
    listing = debugfs(b.image, root, "ls -p /boot/grub")
    assert "/040700/0/0/.//" in listing  # mkpath("$bootPath/grub", 0, 0700), owned by root
    for name in ("grubenv", "fonts", "i386-pc"):
        assert f"/{name}/" in listing, name
    platform = debugfs(b.image, root, "ls -p /boot/grub/i386-pc")
    for name in ("normal.mod", "ext2.mod", "moddep.lst", "modinfo.sh", "boot.img", "core.img"):
        assert f"/{name}/" in platform, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["legacy", "legacy+gpt", "hybrid"])
def test_boot_code_keeps_the_partition_table(built: dict[str, Built], name: str, tmp_path: Path) -> None:
    b = built[name]
    table = sfdisk_json(b.image)
    assert table["id"].lower() in ("0x97fd5997", "97fd5997-f390-0b4a-a3f8-d106c1723aea")  # disk signature / GUID
    assert len(table["partitions"]) == {"legacy": 1, "legacy+gpt": 2, "hybrid": 3}[name]
    head = b.image.read_bytes()[:SECTOR]
    boot_img = Path(b.doc["bootLoader"]["grub"]["biosPackage"], "lib/grub/i386-pc/boot.img").read_bytes()
    assert head[0x1FE:] == b"\x55\xaa"
    # The code bytes are boot.img's but for the fields util/setup.c sets (BPB area, kernel sector, boot drive,
    # drive check) and the table region it copies from the disk.
    same = [i for i in range(0x1B8) if not (0x3 <= i < 0x5A or 0x5C <= i < 0x68)]
    assert all(head[i] == boot_img[i] for i in same)


@pytest.mark.slow
def test_efi_esp_holds_grub_and_the_copied_kernels(built: dict[str, Built]) -> None:
    b = built["efi"]
    esp = part_offset(b.image, 1)
    tree = mdir_tree(b.image, esp)
    main = b.bootspec["org.nixos.bootspec.v1"]
    names = [os.path.realpath(main[k]).removeprefix("/nix/store/").replace("/", "-") for k in ("kernel", "initrd")]
    for path in ("EFI/BOOT/BOOTX64.EFI", "grub/grub.cfg", "grub/grubenv", "grub/state", "grub/fonts/unicode.pf2",
                 "grub/x86_64-efi/normal.mod", "grub/x86_64-efi/core.efi", *(f"kernels/{n}" for n in names)):
        assert path in tree, path
    uuid = blkid(b.image, esp)["UUID"]
    boot_search = f"search --set=drive1 --fs-uuid {uuid}"
    # /boot is the ESP: kernels copied (copyToKernelsDir), no store search, $grubBoot->path is "($drive1)/".
    cfg = mtype(b.image, esp, "grub/grub.cfg")
    kernel, initrd = (f"($drive1)//kernels/{n}" for n in names)
    assert cfg.split("\n") == expected_cfg(b, boot_search, None, "($drive1)/", kernel, initrd) + [""]
    assert mtype(b.image, esp, "grub/state") == "grub\n2.06\nonly\nnodev\n/boot\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["legacy", "efi", "hybrid", "aarch64-efi"])
def test_grub_image_is_bit_for_bit_reproducible(tmp_path: Path, name: str) -> None:
    arch, table, _ = JOBS[name]
    first = build_no_vm(tmp_path, arch, table, work="work-1")
    time.sleep(1.1)
    second = build_no_vm(tmp_path, arch, table, work="work-2")
    digests = [hashlib.sha256(b.image.read_bytes()).hexdigest() for b in (first, second)]
    print(f"{name} GRUB no-VM image sha256: {digests[0]}")
    assert digests[0] == digests[1]


BOOTS = [(name, firmware) for name, (_, _, firmwares) in JOBS.items() for firmware in firmwares]


@pytest.fixture(scope="module")
def booted(built: dict[str, Built], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[tuple[str, str], Future[tuple[dict[str, Any], float]]]]:
    """Each image booted with each of its firmwares, two at a time: the facts and the seconds taken."""
    def boot(name: str, firmware: str) -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        facts = boot_facts(built[name].image, tmp_path_factory.mktemp(f"boot-{name}-{firmware}"),
                           firmware=firmware, arch=JOBS[name][0])
        return facts, time.monotonic() - started

    pool = ThreadPoolExecutor(max_workers=2)
    yield {key: pool.submit(boot, *key) for key in BOOTS}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.boot
@pytest.mark.parametrize(("name", "firmware"), BOOTS)
def test_grub_images_built_without_a_vm_boot(booted: dict[tuple[str, str], Future[tuple[dict[str, Any], float]]],
                                             name: str, firmware: str) -> None:
    facts, seconds = booted[(name, firmware)].result()
    arch, table, _ = JOBS[name]
    print(f"{name} ({firmware}): booted to the fixture's facts in {seconds:.1f} s")
    assert facts["machine"] == arch
    assert (facts["loader"], facts["efi"], facts["root_label"]) == ("grub", firmware == "uefi", "nixos")
    root = {"legacy": "/dev/vda1", "legacy+gpt": "/dev/vda2", "efi": "/dev/vda2", "hybrid": "/dev/vda3"}[table]
    assert facts["root_device"] == root
