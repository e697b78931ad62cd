"""Contents cannot redirect the bootloader prepare installs on the host into a build-host directory.

With GRUB (legacy: /boot/grub on the root) or systemd-boot (the ESP's mount point) installed by prepare, a
contents entry at /boot whose source is a symlink to a host directory once made the builder write GRUB's files
(and chmod, utime) through the link. Such an entry is refused when the spec is loaded (exit 2, naming
contents[0]), and prepare's own writes follow no symlink (builder/staging/nofollow.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.staging.nofollow import make_dir, write_file
from tests.fixtures.system import grub_system_spec, sdboot_system_spec
from tests.test_hostile_confinement import World, entry, snapshot


@pytest.fixture(scope="module")
def boot_specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The no-VM legacy GRUB and efi systemd-boot fixture specs (built once)."""
    tmp = tmp_path_factory.mktemp("bootspecs")
    return {"grub-legacy": grub_system_spec(tmp / "grub", "x86_64", "legacy"),
            "sdboot-efi": sdboot_system_spec(tmp / "sdboot", "x86_64", "efi")}


@pytest.mark.parametrize("loader", ["grub-legacy", "sdboot-efi"])
def test_a_symlinked_boot_directory_is_refused(loader: str, boot_specs: dict[str, Path], tmp_path: Path) -> None:
    world = World(tmp_path)
    os.utime(world.victim, (1_000_000, 1_000_000))
    doc = json.loads(boot_specs[loader].read_text())
    sd = doc["bootLoader"].get("systemdBoot")
    target = sd["efiSysMountPoint"] if sd else "/boot"
    link = world.src / "boot"
    link.symlink_to(world.victim)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**doc, "contents": [entry(link, target)]}))
    res = world.build(spec)  # asserts the victim (mode, mtime, entries) is unchanged
    assert res.returncode == 2, res.stderr
    assert f'$.contents[0].target: "{target}" is not allowed: it is or holds {target}' in res.stderr, res.stderr
    assert not world.out.exists() or os.listdir(world.out) == []


def test_prepares_boot_writes_follow_no_symlink(tmp_path: Path) -> None:
    """Defence in depth: a symlink met on the way fails the build instead of writing into the host."""
    root, victim = tmp_path / "root", tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (victim / "grub").mkdir()
    (root / "boot").symlink_to(victim)
    before = snapshot(victim)
    with pytest.raises(BuildError, match="'boot' is not a directory the builder made"):
        make_dir(root, "boot/grub", 0o700, 0)
    with pytest.raises(BuildError, match="'boot' is not a directory the builder made"):
        write_file(root, "boot/grub/grub.cfg", b"x", 0o644, 0)
    (root / "boot").unlink()
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.cfg").symlink_to(victim / "grub.cfg")
    with pytest.raises(BuildError, match="cannot be written without following a link"):
        write_file(root, "boot/grub/grub.cfg", b"x", 0o644, 0)
    assert snapshot(victim) == before
