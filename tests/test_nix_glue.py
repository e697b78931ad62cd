"""The flake end to end under real Nix 2.8, with tests/nixpkgs-stub standing in for nixpkgs.

The stub (assembled into a temporary directory with this venv's python baked in) provides host-tool
versions of the pkgs attributes makeDiskImage uses. `nix build .#image --override-input nixpkgs path:<stub>`
then runs real evaluation and real derivations with the real builder; the image is read back with
independent tools (qemu-img, sfdisk via inspect, e2fsck, debugfs, nix-store --verify).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import imagecheck
from tests.support.qemu_boot import boot_facts

pytestmark = [pytest.mark.nix, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
STUB_SOURCE = REPO / "tests" / "nixpkgs-stub"
NIX = ["nix", "--extra-experimental-features", "nix-command flakes"]
COMMON = ["--no-write-lock-file", "--option", "substituters", "", "--option", "sandbox", "false"]


@dataclass(frozen=True)
class Glue:
    """A copy of this flake and the assembled nixpkgs stand-in it is built against."""

    flake: Path
    stub: Path
    work: Path

    def ref(self, attr: str) -> str:
        """A flake reference to an output of the copied flake."""
        return f"path:{self.flake}#{attr}"

    def nix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a nix subcommand against the copy with nixpkgs overridden by the stand-in."""
        cmd = [*NIX, *args, "--override-input", "nixpkgs", f"path:{self.stub}", *COMMON]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.work)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done

    def eval_json(self, attr: str) -> Any:
        """`nix eval --json` of an output."""
        return json.loads(self.nix("eval", "--json", self.ref(attr)).stdout)

    def build(self, attr: str, link: str) -> Path:
        """`nix build` an output; returns the resolved out path (via the -o link)."""
        out_link = self.work / link
        self.nix("build", "-o", str(out_link), self.ref(attr))
        return out_link.resolve()


def _copy_tracked(dest: Path) -> None:
    """Copy the files git tracks (what a git flake would see), as they are in the working tree."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        if not name or not (REPO / name).exists():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Glue:
    """Assemble the stand-in (with the fixture system and the VM stand-in) and a copy of the flake."""
    return assemble_glue(tmp_path_factory.mktemp("nix-glue"))


def assemble_glue(base: Path) -> Glue:
    """A copy of the flake in base/flake and the stand-in for nixpkgs in base/nixpkgs (also for other modules)."""
    flake = base / "flake"
    _copy_tracked(flake)
    stub = base / "nixpkgs"
    shutil.copytree(STUB_SOURCE, stub)
    shutil.copytree(REPO / "tests" / "fixtures" / "system", stub / "fixtures" / "system")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    host = {
        "python": sys.executable,
        "vmRunner": True,
        "builderSource": str(flake),
        "cacheDir": str(cache),
        "system": "fixtures/system",
    }
    (stub / "host.json").write_text(json.dumps(host, indent=2))
    work = base / "work"
    work.mkdir()
    return Glue(flake=flake, stub=stub, work=work)


def test_flake_show_lists_every_output(glue: Glue) -> None:
    shown = json.loads(glue.nix("flake", "show", "--json", f"path:{glue.flake}").stdout)
    for system in ("x86_64-linux", "aarch64-linux"):
        cross = {"image-aarch64"} if system == "x86_64-linux" else set()
        assert set(shown["packages"][system]) == {"builder", "image", "default"} | cross
        assert shown["packages"][system]["image"]["name"] == "nixos-disk-image"
        assert "eval" in shown["checks"][system]
        assert system in shown["formatter"]
    assert shown["nixosModules"]["default"]["type"] == "nixos-module"
    assert shown["overlays"]["default"]["type"] == "nixpkgs-overlay"
    assert "lib" in shown
    assert set(shown["hydraJobs"]) >= {"legacy-qcow2", "legacy-raw", "legacy-gpt-vdi", "efi-qcow2-compressed",
                                       "hybrid-vpc", "efi-vars-qcow2", "store-only-raw"}


def test_each_system_gets_its_own_image(glue: Glue) -> None:
    assert glue.eval_json("packages.x86_64-linux.image.system") == "x86_64-linux"
    assert glue.eval_json("packages.x86_64-linux.image.spec.partitionTableType") == "legacy"
    # aarch64 has no BIOS: its example image boots systemd-boot from an ESP, and nothing asks for GRUB.
    assert glue.eval_json("packages.aarch64-linux.image.system") == "aarch64-linux"
    aarch64 = glue.eval_json("packages.aarch64-linux.image.spec")
    assert aarch64["partitionTableType"] == "efi" and aarch64["bootLoader"]["grubDevices"] == []


def test_flake_check_evaluates_everything(glue: Glue) -> None:
    done = glue.nix("flake", "check", "--no-build", f"path:{glue.flake}", check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def test_lib_make_disk_image_is_the_function(glue: Glue) -> None:
    expr = (
        "let f = builtins.getFlake " + json.dumps(f"path:{glue.flake}") + "; in "
        "builtins.functionArgs f.lib.makeDiskImage"
    )
    done = subprocess.run([*NIX, "eval", "--json", "--impure", "--expr", expr], capture_output=True, text=True,
                          check=False, cwd=glue.work)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"pkgs": False, "lib": False, "config": False}


# postVM as real callers write it: nixpkgs' preVM put these tools on PATH and defined these functions.
POST_VM = r"""
mkdir -p $out/report
echo "$START $SECTORS $bootSize $bootSizeMiB $root" > $out/report/pre-vm
eval $(partx $diskImage -o START,SECTORS --nr 1 --pairs)
echo "$START $SECTORS" > $out/report/partx
sectorsToBytes $START > $out/report/root-offset
sectorsToKilobytes $SECTORS > $out/report/root-kib
parted -s $diskImage unit s print > $out/report/parted
dumpe2fs -h "$diskImage?offset=$(sectorsToBytes $START)" 2>/dev/null | grep '^Filesystem volume' > $out/report/label
mkfs.ext4 -V 2> $out/report/mkfs-version
sgdisk --version > $out/report/sgdisk-version
rsync --version | head -n 1 > $out/report/rsync-version
nix-store --version > $out/report/nix-version
printf '%s\n' 1 2 3 | sum_lines > $out/report/sum
tar -cf - -C $out/report sum | xz | xz -d | tar -xOf - sum > $out/report/tar-roundtrip
echo "$(find $out/report -name sum | wc -l) $(echo abc | sed s/b/B/ | awk '{print toupper($0)}')" > $out/report/tools
gzip -c $out/report/sum | bzip2 | bzip2 -d | gzip -d | grep -q 6
"""


def post_vm_expr(glue: Glue) -> str:
    """Two images of the stand-in's system built by the flake's makeDiskImage, both with POST_VM: one through
    the build VM (deterministic = false, so only the after-VM check guards it) and one without a VM."""
    return f"""
let
  pkgs = import {glue.stub}/default.nix {{ system = "x86_64-linux"; }};
  inherit (pkgs.lib.nixosSystem {{ system = "x86_64-linux"; modules = [ ]; }}) config;
  make = args: import {glue.flake}/nix/make-disk-image.nix ({{
    inherit pkgs config;
    inherit (pkgs) lib;
    format = "raw";
    copyChannel = false;
    additionalSpace = "16M";
    postVM = {json.dumps(POST_VM)};
  }} // args);
in {{
  vm = make {{ deterministic = false; name = "post-vm-in-vm"; }};
  plain = make {{ installBootLoader = false; name = "post-vm-plain"; }};
}}"""


def _build_post_vm_images(glue: Glue) -> tuple[dict[str, Path], str]:
    """nix-build both POST_VM images; their outputs by attribute, and the build log (stderr)."""
    out: dict[str, Path] = {}
    cmd = ["nix-build", "--max-jobs", "2", "--option", "substituters", "", "--option", "sandbox", "false",
           "-o", str(glue.work / "result-post-vm"), "-A", "vm", "-A", "plain", "--expr", post_vm_expr(glue)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=glue.work)
    assert done.returncode == 0, done.stderr[-6000:]
    paths = [Path(p) for p in done.stdout.split()]
    for path in paths:
        out["vm" if path.name.endswith("post-vm-in-vm") else "plain"] = path
    return out, done.stderr


@pytest.fixture(scope="module")
def vm_builds(glue: Glue) -> tuple[tuple[Path, Path], tuple[dict[str, Path], str]]:
    """The flake's two VM jobs and the two postVM images, built at once (each VM on one TCG core)."""
    def flake_jobs() -> tuple[Path, Path]:
        attrs = ["image", "hydraJobs.efi-vars-qcow2.x86_64-linux"]
        glue.nix("build", "--max-jobs", "2", "-o", str(glue.work / "result-vm"), *map(glue.ref, attrs))
        links = {p.resolve() for p in glue.work.glob("result-vm*")}
        image, efi = (Path(glue.eval_json(f"{attr}.outPath")) for attr in attrs)
        assert links == {image, efi}, "both builds are kept alive by their result links"
        return image, efi

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = pool.submit(flake_jobs)
        post_vm = pool.submit(_build_post_vm_images, glue)
        return jobs.result(), post_vm.result()


@pytest.fixture(scope="module")
def vm_images(vm_builds: tuple[tuple[Path, Path], tuple[dict[str, Path], str]]) -> tuple[Path, Path]:
    """`nix build .#image` (the project's main job) and the touchEFIVars job."""
    return vm_builds[0]


@pytest.mark.parametrize("variant", ["vm", "plain"])
def test_post_vm_has_nixpkgs_tools_and_functions(vm_builds: tuple[tuple[Path, Path], tuple[dict[str, Path], str]],
                                                 variant: str) -> None:
    # The stand-in gives postVM only what the derivation puts on PATH, as nixpkgs' stdenv does: partx,
    # parted, mkfs.ext4, sgdisk, rsync, nix-store and the functions must come from makeDiskImage.
    outs, _ = vm_builds[1]
    report = outs[variant] / "report"
    assert (report / "root-offset").read_text() == f"{1024 * 1024}\n"
    # nixpkgs' preVM variables, as its postVM (the same shell) sees them: the root partition's START and
    # SECTORS as partx reads them from the image, bootSize rounded as nixpkgs does, root under the build dir.
    start, sectors, boot, boot_mib, root = (report / "pre-vm").read_text().split()  # five: each one set
    assert f"{start} {sectors}\n" == (report / "partx").read_text()
    assert (boot, boot_mib) == (str(257 * 1024 * 1024), "257MiB")
    assert root.endswith("/root") and root != "/root"
    assert int((report / "root-kib").read_text()) > 16 * 1024
    assert "Partition Table: msdos" in (report / "parted").read_text()
    assert "nixos" in (report / "label").read_text()
    assert "mke2fs" in (report / "mkfs-version").read_text()
    assert "GPT fdisk" in (report / "sgdisk-version").read_text()
    assert "rsync" in (report / "rsync-version").read_text()
    assert "nix-store" in (report / "nix-version").read_text()
    assert (report / "sum").read_text() == "6\n"
    assert (report / "tar-roundtrip").read_text() == "6\n"
    assert (report / "tools").read_text() == "1 ABC\n"
    products = (outs[variant] / "nix-support" / "hydra-build-products").read_text()
    assert products == f"file raw-image {outs[variant]}/nixos.img\n"


def test_after_vm_check_runs_without_determinism(vm_builds: tuple[tuple[Path, Path], tuple[dict[str, Path], str]]
                                                 ) -> None:
    # nixpkgs' function has no such check; ours runs it on every VM build, deterministic or not.
    _, log = vm_builds[1]
    vm_log = log[log.index("post-vm-in-vm"):]
    assert "[makeDiskImage] check after finalize done" in vm_log
    assert "settle the VM's writes" not in vm_log, "nothing to settle without determinism"


@pytest.fixture(scope="module")
def image(vm_images: tuple[Path, Path]) -> Path:
    """`nix build .#image`: the project's main job, built against the stand-in."""
    return vm_images[0]


def test_image_has_the_file_and_the_hydra_product_line(image: Path) -> None:
    assert sorted(p.name for p in image.iterdir()) == ["nix-support", "nixos.qcow2"]
    products = (image / "nix-support" / "hydra-build-products").read_text()
    assert products == f"file qcow2-image {image}/nixos.qcow2\n"


def test_image_matches_the_arguments(glue: Glue, image: Path) -> None:
    spec = glue.eval_json("image.spec")
    described = json.loads(subprocess.run([sys.executable, "-m", "builder", "inspect", str(image / "nixos.qcow2")],
                                          capture_output=True, text=True, check=True, cwd=REPO).stdout)
    assert described["format"] == "qcow2"
    assert described["table"] == "dos"
    (part,) = described["partitions"]
    assert part["start"] == 1024 * 1024 and part["type"] == "83"
    assert described["root"]["fsType"] == "ext4"
    assert described["root"]["label"] == spec["label"] == "nixos"
    assert described["root"]["uuid"] == spec["rootFSUID"].lower()
    # diskSize = "auto" with additionalSpace = "64M": the disk holds the closure plus that much (the space
    # is added at sizing time, before the bootloader installed in the VM uses some of it, as in nixpkgs).
    assert spec["diskSize"] == "auto" and spec["additionalSpace"] == "64M"
    nar_size = int((Path(spec["system"]["closureInfo"]) / "total-nar-size").read_text())
    assert described["virtualSize"] >= nar_size + 64 * 1024 * 1024
    assert described["root"]["freeBytes"] >= 32 * 1024 * 1024


def test_image_holds_the_installed_system(glue: Glue, image: Path, tmp_path: Path) -> None:
    spec = glue.eval_json("image.spec")
    raw = tmp_path / "image.raw"
    subprocess.run(["qemu-img", "check", str(image / "nixos.qcow2")], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image / "nixos.qcow2"), str(raw)], check=True)
    offset = imagecheck.part_offset(raw, 1)
    fsck = imagecheck.e2fsck_clean(raw, offset)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    root = imagecheck.extract_root(raw, offset, tmp_path / "root")
    try:
        _check_installed_system(root, spec["system"])
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)
        shutil.rmtree(root)
    assert "Type: regular" in imagecheck.debugfs(raw, offset, 'stat "/etc/NIXOS"')
    # installBootLoader ran the system's switch-to-configuration in the VM: GRUB in the MBR and its config.
    assert spec["installBootLoader"] is True and spec["bootLoader"]["grubDevices"] == ["/dev/vda"]
    with open(raw, "rb") as disk:
        assert b"GRUB" in disk.read(512), "no GRUB boot code in the MBR"
    assert "Type: regular" in imagecheck.debugfs(raw, offset, 'stat "/boot/grub/grub.cfg"')


def _check_installed_system(root: Path, system: dict[str, Any]) -> None:
    """What nixos-install leaves (DESIGN §2): profiles, channel, /etc/NIXOS, exactly the closure, a valid DB."""
    profiles = root / "nix" / "var" / "nix" / "profiles"
    assert os.readlink(profiles / "system") == "system-1-link"
    assert os.readlink(profiles / "system-1-link") == system["toplevel"]
    assert os.readlink(profiles / "per-user" / "root" / "channels") == "channels-1-link"
    assert os.readlink(profiles / "per-user" / "root" / "channels-1-link") == system["channel"]
    assert (root / "etc" / "NIXOS").is_file() and not (root / "etc" / "NIXOS").is_symlink()

    closure = (Path(system["closureInfo"]) / "store-paths").read_text().split()
    assert system["toplevel"] in closure and system["channel"] in closure
    assert sorted(p.name for p in (root / "nix" / "store").iterdir() if not p.name.startswith(".")) == sorted(
        Path(p).name for p in closure
    )
    verify = subprocess.run(["nix-store", "--store", str(root), "--verify", "--check-contents"],
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and "error" not in verify.stderr.lower(), verify.stderr
    in_image = subprocess.run(["nix-store", "--store", str(root), "--query", "--requisites", system["toplevel"]],
                              capture_output=True, text=True, check=True).stdout.split()
    on_host = subprocess.run(["nix-store", "--query", "--requisites", system["toplevel"]],
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(in_image) == sorted(on_host), "the image's database registers the system with its references"


def test_spec_file_depends_on_every_store_path_it_names(glue: Glue) -> None:
    spec_file = glue.build("image.specFile", "result-spec")
    spec = json.loads(spec_file.read_text())
    refs = subprocess.run(["nix-store", "--query", "--references", str(spec_file)],
                          capture_output=True, text=True, check=True).stdout.split()
    system = spec["system"]
    assert set(refs) == {system["toplevel"], system["closureInfo"], system["channel"]}


def test_derivations_ask_for_kvm_only_when_a_vm_is_needed(glue: Glue) -> None:
    def drv(attr: str) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(glue.nix("show-derivation", glue.ref(attr)).stdout)
        (only,) = shown.values()
        assert isinstance(only, dict)
        return only

    with_vm = drv("hydraJobs.legacy-raw.x86_64-linux")  # installBootLoader = true
    assert with_vm["env"]["requiredSystemFeatures"] == "kvm"
    assert "make-disk-image prepare" in with_vm["env"]["preVM"]
    assert "make-disk-image finalize" in with_vm["env"]["buildCommand"]
    assert with_vm["env"]["memSize"] == "1024"

    without_vm = drv("hydraJobs.store-only-raw.x86_64-linux")
    assert "requiredSystemFeatures" not in without_vm["env"]
    assert "preVM" not in without_vm["env"]


def test_store_only_image(glue: Glue, tmp_path: Path) -> None:
    out = glue.build("hydraJobs.store-only-raw.x86_64-linux", "result-store-only")
    assert (out / "nix-support" / "hydra-build-products").read_text() == f"file raw-image {out}/nixos.img\n"
    described = json.loads(subprocess.run([sys.executable, "-m", "builder", "inspect", str(out / "nixos.img")],
                                          capture_output=True, text=True, check=True, cwd=REPO).stdout)
    assert described["table"] is None
    assert described["root"]["label"] == "nix-store"
    assert imagecheck.e2fsck_clean(out / "nixos.img", 0).returncode == 0
    listing = imagecheck.debugfs(out / "nixos.img", 0, "ls -p /")
    spec = glue.eval_json("hydraJobs.store-only-raw.x86_64-linux.spec")
    assert Path(spec["system"]["toplevel"]).name in listing, "the store paths are the filesystem's top level"
    assert "/nix/" not in listing and "\tnix\t" not in listing.replace("/", "\t")


@pytest.fixture(scope="module")
def efi_image(vm_images: tuple[Path, Path]) -> Path:
    """hydraJobs.efi-vars-qcow2: an efi layout with touchEFIVars, the fixture system on systemd-boot."""
    return vm_images[1]


def test_efi_vars_image(glue: Glue, efi_image: Path, tmp_path: Path) -> None:
    # touchEFIVars: preVM copies the OVMF variables into $out, the VM boots OVMF with them as pflash and the
    # system's bootloader install (systemd-boot's bootctl) registers itself there.
    out = efi_image
    spec = glue.eval_json("hydraJobs.efi-vars-qcow2.x86_64-linux.spec")
    assert spec["touchEFIVars"] is True and spec["partitionTableType"] == "efi"
    assert sorted(p.name for p in out.iterdir()) == ["efi-vars.fd", "nix-support", "nixos.qcow2"]
    assert (out / "nix-support" / "hydra-build-products").read_text() == f"file qcow2-image {out}/nixos.qcow2\n"
    template = Path(spec["efiVariables"])
    assert (out / "efi-vars.fd").stat().st_size == template.stat().st_size
    variables = subprocess.run([str(Path(sys.executable).parent / "virt-fw-vars"), "-i", str(out / "efi-vars.fd"),
                                "--print"], capture_output=True, text=True, check=True).stdout
    assert re.search(r'Boot\d{4}\s+: boot entry: title="Linux Boot Manager" '
                     r"devpath=Partition\(nr=1\)/FilePath\(\\EFI\\systemd\\systemd-bootx64.efi\)", variables), variables

    described = json.loads(subprocess.run([sys.executable, "-m", "builder", "inspect", str(out / "nixos.qcow2")],
                                          capture_output=True, text=True, check=True, cwd=REPO).stdout)
    assert described["table"] == "gpt"
    esp, root = described["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and esp["label"] == "ESP"
    # bootSize "256M" through nixpkgs' round_to_nearest: the ESP ends at 257 MiB, as parted makes it there.
    assert esp["start"] == 8 * 1024 * 1024 and esp["end"] == 257 * 1024 * 1024
    assert root["guid"].upper() == spec["rootGPUID"].upper() and root["label"] == "nixos"
    raw = tmp_path / "efi.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out / "nixos.qcow2"), str(raw)], check=True)
    listing = subprocess.run(["mdir", "-b", "-i", f"{raw}@@{esp['start']}", "::/EFI/systemd"],
                             capture_output=True, text=True, check=True).stdout
    assert "systemd-bootx64.efi" in listing.lower()


@pytest.fixture(scope="module")
def boots(image: Path, efi_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Boot both VM-built images at once (one TCG core each): SeaBIOS for .#image, OVMF for the EFI job.

    OVMF starts with the variables the build wrote, so the "Linux Boot Manager" entry bootctl added is used.
    """
    scratch = tmp_path_factory.mktemp("nix-boots")
    with ThreadPoolExecutor(max_workers=2) as pool:
        grub = pool.submit(boot_facts, image / "nixos.qcow2", scratch, fmt="qcow2")
        efi = pool.submit(boot_facts, efi_image / "nixos.qcow2", scratch, fmt="qcow2", firmware="uefi",
                          efi_vars=efi_image / "efi-vars.fd")
        return {"grub": grub.result(), "efi": efi.result()}


@pytest.mark.boot
def test_image_boots_with_grub(boots: dict[str, dict[str, Any]]) -> None:
    facts = boots["grub"]
    assert (facts["loader"], facts["efi"]) == ("grub-bios", False)
    assert (facts["root_device"], facts["root_label"]) == ("/dev/vda1", "nixos")


@pytest.mark.boot
def test_efi_image_boots_from_its_own_efi_variables(boots: dict[str, dict[str, Any]]) -> None:
    facts = boots["efi"]
    assert (facts["loader"], facts["efi"]) == ("systemd-boot", True)
    assert (facts["root_device"], facts["root_label"]) == ("/dev/vda2", "nixos")


def test_store_only_image_rebuilds_bit_for_bit(glue: Glue) -> None:
    # `nix build --rebuild` builds the derivation again and fails if the output differs from the first build.
    glue.build("hydraJobs.store-only-raw.x86_64-linux", "result-store-only-first")
    done = glue.nix("build", "--rebuild", "--no-link", glue.ref("hydraJobs.store-only-raw.x86_64-linux"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "may not be deterministic" not in done.stderr


def test_default_nix_gives_the_same_derivations_as_the_flake(glue: Glue) -> None:
    # Non-flake users: default.nix with the same nixpkgs must give the flake's image and builder exactly.
    args = (
        f"{{ nixpkgs = {glue.stub}; "
        f'pkgs = import {glue.stub}/default.nix {{ system = "x86_64-linux"; }}; system = "x86_64-linux"; }}'
    )
    expr = f"let d = import {glue.flake}/default.nix {args}; in [ d.image.drvPath d.builder.drvPath ]"
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    image_drv, builder_drv = json.loads(done.stdout)
    assert image_drv == glue.eval_json("packages.x86_64-linux.image.drvPath")
    assert builder_drv == glue.eval_json("packages.x86_64-linux.builder.drvPath")


def test_flake_lock_and_pin_json_pin_the_same_nixpkgs() -> None:
    lock = json.loads((REPO / "flake.lock").read_text())["nodes"]["nixpkgs"]
    pin = json.loads((REPO / "nix" / "pin.json").read_text())
    assert lock["locked"]["rev"] == pin["rev"] == "8fd9daa3db09ced9700431c5b7ad0e8ba199b575"
    assert lock["locked"]["narHash"] == pin["hash"]
    assert lock["original"]["ref"] == pin["branch"] == "nixos-25.11"
    nix32 = subprocess.run([*NIX, "hash", "to-base32", pin["hash"]], capture_output=True, text=True, check=True)
    assert nix32.stdout.strip() == pin["sha256"]
    assert pin["url"] == f"https://github.com/NixOS/nixpkgs/archive/{pin['rev']}.tar.gz"


def test_stand_in_is_as_strict_as_nixpkgs(glue: Glue) -> None:
    # Each package holds only its own programs, and a runCommand's PATH is its inputs and stdenv's
    # initialPath: a derivation that forgets an input fails here as it fails with nixpkgs (DESIGN §5a).
    probe = ("{ for t in cp sed awk xz partx mkfs.ext4 parted qemu-img; do"
             " command -v $t >/dev/null && echo \"$t found\" || echo \"$t missing\"; done; } > $out")
    expr = (f'let p = import {glue.stub}/default.nix {{ system = "x86_64-linux"; }}; in '
            f'[ p.parted p.util-linux (p.runCommand "path-probe" {{ nativeBuildInputs = [ p.parted ]; }} '
            f"{json.dumps(probe)}) ]")
    done = subprocess.run(["nix-build", "--no-out-link", "--option", "substituters", "", "--option", "sandbox",
                           "false", "--expr", expr], capture_output=True, text=True, check=False, cwd=glue.work)
    assert done.returncode == 0, done.stderr[-3000:]
    parted, util_linux, probe_out = (Path(p) for p in done.stdout.split())
    assert {p.name for p in (parted / "bin").iterdir()} >= {"parted"}
    assert not (parted / "bin" / "mkfs.ext4").exists()
    assert {"partx", "sfdisk", "mount", "losetup"} <= {p.name for p in (util_linux / "bin").iterdir()}
    found = dict(line.split() for line in probe_out.read_text().splitlines())
    assert found == {"cp": "found", "sed": "found", "awk": "found", "xz": "found", "parted": "found",
                     "partx": "missing", "mkfs.ext4": "missing", "qemu-img": "missing"}


def test_example_system_has_virtio_drivers(glue: Glue) -> None:
    # profiles/qemu-guest.nix puts virtio_blk and friends in the initrd: the image boots as a virtio disk.
    expr = f'(import {glue.flake}/nix/example/configuration.nix {{ modulesPath = "/M"; }}).imports'
    imports = json.loads(subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
                                        capture_output=True, text=True, check=True).stdout)
    assert "/M/profiles/qemu-guest.nix" in imports and "/M/profiles/minimal.nix" in imports


def test_vm_test_boots_with_nixpkgs_qemu_and_the_enabled_module(glue: Glue) -> None:
    # nix/vm-test.nix needs nixpkgs' test framework and KVM; here its wiring is evaluated: the image comes
    # from the module with makeDiskImage.enable, and the machine runs nixpkgs' own qemu command.
    expr = f"""
let
  stub = import {glue.stub}/default.nix {{ system = "x86_64-linux"; }};
  pkgs = stub // {{ testers.runNixOSTest = t: t; }};
  nixosSystem = {{ system, modules }}:
    let
      user = builtins.elemAt modules 2 {{ modulesPath = "/M"; }};
    in {{
      config.system.build.diskImage =
        if user.makeDiskImage.enable or false then {{ outPath = "/nix/store/image"; filePath = "nixos.qcow2"; }}
        else throw "the module is imported but makeDiskImage.enable is not set: no system.build.diskImage";
    }};
  t = import {glue.flake}/nix/vm-test.nix {{ inherit pkgs nixosSystem; module = {{ }}; }};
in {{ script = t.testScript; }}"""
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    script = json.loads(done.stdout)["script"]
    assert re.search(r"-qemu-test/bin/qemu-system-x86_64 -machine accel=kvm:tcg -cpu max -m 1024", script), script
    assert "/nix/store/image/nixos.qcow2" in script
