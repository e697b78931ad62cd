"""`python -m builder build`: the whole pipeline for an image that needs no VM, checked with qemu-img and inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent


def builder(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the builder's CLI."""
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, cwd=REPO)


def test_build_qcow2_without_vm(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(format="qcow2", postVM='echo "post $diskImage" > "$(dirname "$diskImage")/post.txt"')
    out = tmp_path / "out"
    res = builder("build", str(spec), "--out", str(out))
    assert res.returncode == 0, res.stderr
    image = out / "fixture.qcow2"
    assert res.stdout.strip() == str(image)
    assert "finalize" not in res.stderr  # nothing needs root: no VM was started
    assert (out / "nix-support/hydra-build-products").read_text() == f"file qcow2-image {image}\n"
    assert (out / "post.txt").read_text() == f"post {image}\n"
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    report = json.loads(builder("inspect", str(image)).stdout)
    assert report["format"] == "qcow2" and report["table"] == "gpt"
    esp, root = report["partitions"]
    # bootSize "64M" ends the ESP at 65 MiB, as nixpkgs' round_to_nearest has it
    assert (esp["label"], esp["fsType"], esp["start"], esp["end"]) == ("ESP", "vfat", 8 << 20, 65 << 20)
    assert (root["label"], root["fsType"], root["guid"]) == ("nixos", "ext4", "F222513B-DED1-49FA-B591-20CE86A2FE7F")
    assert report["root"]["freeBytes"] >= 16 << 20
    assert sorted(os.listdir(out)) == ["fixture.qcow2", "nix-support", "post.txt"]


def test_failed_post_vm_fails_the_build(make_spec: SpecFactory, tmp_path: Path) -> None:
    res = builder("build", str(make_spec(postVM="exit 3")), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    assert "postVM exited with status 3" in res.stderr
