"""`python -m builder pin`: nix/pin.json refreshed from nix-prefetch-github's answer.

The network is unreachable here, so a stand-in `nix-prefetch-github` on PATH prints the answer the real
one (7.x, `--json`) gives and records how it was called; hashes are checked with Nix's own converter.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REV = "8fd9daa3db09ced9700431c5b7ad0e8ba199b575"
SRI = "sha256-Ti+ZBvW6yrWWAg2szExVTwCd4qOJ3KlVr1tFHfyfi8Q="
NIX = ["nix", "--extra-experimental-features", "nix-command"]


def fake_prefetch(bin_dir: Path, answer: str, status: int = 0) -> Path:
    """Install a nix-prefetch-github that records its argv and prints answer; returns the argv log."""
    log = bin_dir / "argv.json"
    script = bin_dir / "nix-prefetch-github"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"sys.stdout.write({answer!r})\n"
        f"sys.stderr.write('fake prefetch stderr\\n')\n"
        f"sys.exit({status})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def run_pin(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m builder pin` with the stand-in first on PATH."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "builder", "pin", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, check=False)


@pytest.mark.nix
def test_pin_refresh_writes_what_fetch_tarball_needs(tmp_path: Path) -> None:
    answer = json.dumps({"owner": "NixOS", "repo": "nixpkgs", "rev": REV, "hash": SRI}, indent=2)
    log = fake_prefetch(tmp_path, answer)
    pin = tmp_path / "pin.json"
    done = run_pin(tmp_path, "--file", str(pin), "--rev", "nixos-25.11")
    assert done.returncode == 0, done.stderr
    assert json.loads(log.read_text()) == ["--json", "--rev", "nixos-25.11", "NixOS", "nixpkgs"]
    doc = json.loads(pin.read_text())
    nix32 = subprocess.run([*NIX, "hash", "to-base32", SRI], capture_output=True, text=True, check=True).stdout.strip()
    assert doc == {
        "owner": "NixOS",
        "repo": "nixpkgs",
        "branch": "nixos-25.11",
        "rev": REV,
        "url": f"https://github.com/NixOS/nixpkgs/archive/{REV}.tar.gz",
        "hash": SRI,
        "sha256": nix32,
    }
    # The committed pin is exactly what a refresh at this commit writes.
    assert doc == json.loads((REPO / "nix" / "pin.json").read_text())


def test_pin_accepts_the_older_nix32_answer(tmp_path: Path) -> None:
    nix32 = "1i4bkzy1siavmxaskp49lgi9s02gam6crb0d0abbbjmsyl39jbsf"
    fake_prefetch(tmp_path, json.dumps({"owner": "NixOS", "repo": "nixpkgs", "rev": REV, "sha256": nix32}))
    pin = tmp_path / "pin.json"
    done = run_pin(tmp_path, "--file", str(pin), "--rev", REV)
    assert done.returncode == 0, done.stderr
    doc = json.loads(pin.read_text())
    assert doc["sha256"] == nix32 and "hash" not in doc and "branch" not in doc


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        ("", 1, "fake prefetch stderr"),
        ("not json", 0, "printed no JSON"),
        (json.dumps({"rev": "nixos-25.11", "hash": SRI}), 0, "40-digit commit id"),
        (json.dumps({"rev": REV, "hash": "sha256-AAAA"}), 0, "hash of 3 bytes"),
        (json.dumps({"rev": REV, "hash": "md5-1B2M2Y8AsgTpgAmY7PhCfg=="}), 0, "'md5' hash"),
        (json.dumps({"rev": REV}), 0, "no usable hash"),
    ],
)
def test_failed_prefetch_leaves_the_pin_untouched(tmp_path: Path, answer: str, status: int, message: str) -> None:
    fake_prefetch(tmp_path, answer, status)
    pin = tmp_path / "pin.json"
    pin.write_text("{}\n")
    done = run_pin(tmp_path, "--file", str(pin))
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert pin.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["argv.json", "nix-prefetch-github", "pin.json"]


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    fake_prefetch(tmp_path, "{}")
    done = run_pin(tmp_path, "--file", str(tmp_path / "pin.json"), "--rev", "main; rm -rf /")
    assert done.returncode == 2
    assert "--rev 'main; rm -rf /' is not allowed" in done.stderr
    assert not (tmp_path / "argv.json").exists(), "nothing is run for a bad argument"


@pytest.mark.parametrize("flag", ["--owner", "--repo", "--rev"])
def test_a_trailing_newline_is_a_user_error(flag: str, tmp_path: Path) -> None:
    """The name check ended in $, which let "NixOS\\n" through to the prefetch."""
    fake_prefetch(tmp_path, "{}")
    done = run_pin(tmp_path, "--file", str(tmp_path / "pin.json"), flag, "nixpkgs\n")
    assert done.returncode == 2, done.stderr
    assert f"{flag} 'nixpkgs\\n' is not allowed" in done.stderr
    assert not (tmp_path / "argv.json").exists()


@pytest.mark.nix
def test_a_symlink_planted_at_the_temporary_pin_is_not_written_through(tmp_path: Path) -> None:
    """The pin was written to FILE.tmp (following a symlink there) and renamed: now a fresh private name."""
    fake_prefetch(tmp_path, json.dumps({"owner": "NixOS", "repo": "nixpkgs", "rev": REV, "hash": SRI}))
    victim = tmp_path / "victim"
    victim.write_text("must stay as it is\n")
    (tmp_path / "pin.json.tmp").symlink_to(victim)
    done = run_pin(tmp_path, "--file", str(tmp_path / "pin.json"), "--rev", REV)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "must stay as it is\n"
    assert json.loads((tmp_path / "pin.json").read_text())["rev"] == REV
    assert (tmp_path / "pin.json.tmp").is_symlink()
