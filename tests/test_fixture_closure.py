"""The closure fixture is real Nix store content and its closureInfo files match what Nix itself reports."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.spec import load_spec
from tests.fixtures import make_fixture

pytestmark = pytest.mark.nix

REPO = Path(__file__).resolve().parent.parent


def nix_store(*args: str, env: dict[str, str] | None = None) -> str:
    """Run nix-store and return its stdout."""
    return subprocess.run(["nix-store", *args], check=True, stdout=subprocess.PIPE, text=True, env=env).stdout


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("closure-fixture")
    make_fixture(out)
    return out


@pytest.fixture(scope="module")
def doc(fixture_dir: Path) -> dict[str, object]:
    return json.loads((fixture_dir / "spec.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def roots(doc: dict[str, object]) -> list[str]:
    system = doc["system"]
    assert isinstance(system, dict)
    return [system["toplevel"], *system["additionalPaths"]]


def parse_registration(text: str) -> dict[str, tuple[str, int, str, list[str]]]:
    """Parse closureInfo's registration into path -> (narHash, narSize, deriver, references)."""
    lines = text.split("\n")
    assert lines[-1] == "", "registration must end with exactly one newline"
    lines = lines[:-1]
    out: dict[str, tuple[str, int, str, list[str]]] = {}
    i = 0
    while i < len(lines):
        path, nar_hash, nar_size, deriver, count = lines[i:i + 5]
        refs = lines[i + 5:i + 5 + int(count)]
        assert len(refs) == int(count)
        out[path] = (nar_hash, int(nar_size), deriver, refs)
        i += 5 + int(count)
    return out


def test_store_paths_are_exactly_the_closure(fixture_dir: Path, roots: list[str]) -> None:
    listed = (fixture_dir / "closure-info" / "store-paths").read_text().splitlines()
    assert listed == sorted(listed)
    assert set(listed) == set(nix_store("-qR", *roots).split())
    assert len(listed) == 5


def test_every_path_verifies(fixture_dir: Path) -> None:
    for path in (fixture_dir / "closure-info" / "store-paths").read_text().split():
        subprocess.run(["nix-store", "--verify-path", path], check=True)


def test_registration_matches_nix(fixture_dir: Path, roots: list[str]) -> None:
    reg = parse_registration((fixture_dir / "closure-info" / "registration").read_text())
    assert set(reg) == set(nix_store("-qR", *roots).split())
    assert list(reg) == sorted(reg)
    for path, (nar_hash, nar_size, deriver, refs) in reg.items():
        assert nar_hash == nix_store("-q", "--hash", path).strip()
        assert nar_hash.startswith("sha256:") and len(nar_hash) == 7 + 52
        assert nar_size == int(nix_store("-q", "--size", path))
        assert deriver == ""
        assert refs == sorted(nix_store("-q", "--references", path).split())
    toplevel = roots[0]
    assert toplevel in reg[toplevel][3], "the toplevel refers to itself (self-reference kept)"
    total = int((fixture_dir / "closure-info" / "total-nar-size").read_text())
    assert total == sum(size for _, size, _, _ in reg.values())


def test_registration_loads_into_a_fresh_nix_db(fixture_dir: Path, roots: list[str], tmp_path: Path) -> None:
    # What nixpkgs' prepare does: a throwaway DB over the real store; --check-contents rehashes every path.
    env = {**os.environ, "NIX_STATE_DIR": str(tmp_path / "state")}
    registration = (fixture_dir / "closure-info" / "registration").read_bytes()
    subprocess.run(["nix-store", "--load-db"], input=registration, check=True, env=env)
    subprocess.run(["nix-store", "--verify", "--check-contents"], check=True, env=env)
    assert set(nix_store("-qR", *roots, env=env).split()) == set(nix_store("-qR", *roots).split())
    for path in roots:
        assert nix_store("-q", "--hash", path, env=env) == nix_store("-q", "--hash", path)


def _closure_path(fixture_dir: Path, suffix: str) -> Path:
    """The store path of the closure whose name ends with suffix."""
    paths = (fixture_dir / "closure-info" / "store-paths").read_text().split()
    (match,) = [p for p in paths if p.endswith(suffix)]
    return Path(match)


def test_store_content_kinds(fixture_dir: Path) -> None:
    files = _closure_path(fixture_dir, "-mdi-fixture-files")
    a, b = os.lstat(files / "share/pair/a"), os.lstat(files / "share/pair/b")
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2, "hard link pair kept by Nix"
    assert os.readlink(files / "bin/hi") == "hello"
    assert os.readlink(files / "share/lib-link").startswith("/nix/store/")
    assert os.lstat(files / "share/empty").st_size == 0
    assert stat.S_IMODE(os.lstat(files / "bin/hello").st_mode) == 0o555
    deep = [p for p in files.joinpath("deep").rglob("bottom")]
    assert len(deep) == 1 and len(deep[0].relative_to(files / "deep").parts) >= 11
    blob = _closure_path(fixture_dir, "-mdi-fixture-big") / "blob"
    assert blob.stat().st_size == 3 * 1024 * 1024
    x, expected = 1, ""
    for _ in range(4):
        x = (x * 69069 + 1) % 2**32
        expected += f"{x:08x}"
    assert blob.read_bytes()[:32].decode() == expected


def test_spec_is_valid_and_points_at_the_fixture(fixture_dir: Path, roots: list[str]) -> None:
    spec = load_spec(fixture_dir / "spec.json")
    assert spec.partition_table_type == "efi" and spec.format == "raw"
    assert not spec.install_boot_loader and not spec.copy_channel and spec.deterministic
    assert spec.toplevel == roots[0] and spec.toplevel.endswith("-mdi-fixture-toplevel")
    assert Path(spec.closure_info) == fixture_dir / "closure-info"
    modes = {c.target: c.mode for c in spec.contents}
    suid = modes["/usr/local/bin/suid-tool"]
    assert suid is not None and suid.text == "4755" and suid.apply(0o100644) == 0o104755
    for content in spec.contents:
        src = content.source
        if content.is_glob:
            assert len(list(Path(src).parent.glob(Path(src).name))) == 3
        else:
            assert Path(src).exists()
    assert not spec.needs_vm, "numeric owners only: the fixture image needs no VM"


def test_cli_writes_a_varied_spec(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tests.fixtures", "closure"]
    done = subprocess.run(
        [*cmd, str(tmp_path / "fx"), "--table", "legacy", "--format", "qcow2"],
        check=True, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    spec = load_spec(Path(done.stdout.strip()))
    assert (spec.partition_table_type, spec.format) == ("legacy", "qcow2")
    bad = subprocess.run(
        [*cmd, str(tmp_path / "bad"), "--format", "Bad!"],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    assert bad.returncode == 2 and "$.format" in bad.stderr and "Traceback" not in bad.stderr


def test_channel_variant(tmp_path: Path) -> None:
    spec = load_spec(make_fixture(tmp_path, channel=True))
    assert spec.copy_channel and spec.channel is not None and spec.channel.endswith("-mdi-fixture-channel")
    listed = set((tmp_path / "closure-info" / "store-paths").read_text().split())
    assert listed == set(nix_store("-qR", spec.toplevel, spec.channel, *spec.additional_paths).split())
    assert (Path(spec.channel) / "nixos" / "default.nix").is_file()
    assert os.readlink(Path(spec.channel) / "nixos" / "nixpkgs") == "."
