"""The bench's Debian closure (real files, compressible) and the qcow2-compressed timing harness."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from bench.closure import Closure, generate
from bench.debian_closure import generate_debian
from bench.qcow2 import render, summarise
from tests.test_bench_smoke import tree_digest

REPO = Path(__file__).resolve().parent.parent
SIZE = 6 << 20


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> tuple[Closure, Closure]:
    base = tmp_path_factory.mktemp("bench-debian")
    return generate_debian(base / "a", SIZE), generate_debian(base / "b", SIZE)


def file_data(c: Closure) -> bytes:
    """Every regular file's bytes, in path order."""
    return b"".join(p.read_bytes() for p in sorted(c.store_dir.rglob("*")) if p.is_file() and not p.is_symlink())


def test_debian_closure_is_deterministic(debian: tuple[Closure, Closure]) -> None:
    a, b = debian
    assert tree_digest(a.store_dir) == tree_digest(b.store_dir)
    assert a.manifest["file_list_sha256"] == b.manifest["file_list_sha256"]
    assert (a.closure_info_nix / "registration").read_text() == (b.closure_info_nix / "registration").read_text()


def test_debian_closure_mixes_sources_near_the_target(debian: tuple[Closure, Closure]) -> None:
    c = debian[0]
    assert SIZE <= c.manifest["counts"]["file_bytes"] <= SIZE + SIZE // 10 + (4 << 20)
    tags = {name.rsplit("-", 1)[-1] for name in (p.name for p in c.store_dir.iterdir())}
    assert len(tags & {"lib", "bin", "doc", "man", "locale", "python", "modules", "gcc", "llvm"}) >= 4, tags


def test_debian_closure_compresses_and_the_synthetic_one_does_not(debian: tuple[Closure, Closure],
                                                                  tmp_path: Path) -> None:
    data = file_data(debian[0])
    assert len(zlib.compress(data, 1)) < 0.6 * len(data)
    synthetic = file_data(generate(tmp_path / "synthetic", 1 << 20, 1))
    assert len(zlib.compress(synthetic, 1)) > 0.95 * len(synthetic)


def test_debian_closure_registration_verifies(debian: tuple[Closure, Closure]) -> None:
    c = debian[0]
    on_disk = sorted(p.name for p in c.store_dir.iterdir())
    subprocess.run(["nix-store", "--store", str(c.root), "--load-db"], check=True,
                   stdin=(c.closure_info_nix / "registration").open())
    verify = subprocess.run(["nix-store", "--store", str(c.root), "--verify", "--check-contents"],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "modified" not in verify.stderr, verify.stderr
    closure = subprocess.run(["nix-store", "--store", str(c.root), "-qR", f"/nix/store/{c.toplevel.name}"],
                             check=True, capture_output=True, text=True).stdout.split()
    assert sorted(p.rsplit("/", 1)[1] for p in closure) == on_disk and len(on_disk) == c.manifest["store_paths"]


@pytest.mark.slow
def test_qcow2_harness_times_checks_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run([sys.executable, "-m", "bench.qcow2", "--size", "4M", "--runs", "1", "--work",
                           str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    for method in ("qemu-img", "ours-1", "ours"):
        assert "| clean | identical | 1 of 1 |" in rows[method], rows[method]
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    sizes = {r["method"]: r["bytes"] for r in summary}
    assert sizes["ours"] == sizes["ours-1"] and 0.9 < sizes["ours"] / sizes["qemu-img"] < 1.1
    assert not (tmp_path / "work" / "scratch" / "qcow2").exists(), "scratch removed"


def test_qcow2_summary_survives_a_failed_first_run() -> None:
    facts = {"bytes": 3 << 20, "sha256": "a"}
    checked = {**facts, "check_status": 0, "compare_status": 0, "compressed_clusters": 40, "allocated_clusters": 41}
    run = {"user": 1.0, "sys": 0.1, "maxrss_kib": 20480, "load_before": 0.5}
    records = [
        {"method": "qemu-img", "run": 0, "error": "step 'convert' exited 1: No space left on device"},
        {"method": "qemu-img", "run": 1, "wall": 2.0, **run, "facts": checked},
        {"method": "qemu-img", "run": 2, "wall": 3.0, **run, "facts": {**facts, "sha256": "b"}},
        {"method": "ours", "run": 0, "wall": 1.0, **run, "facts": checked},
    ]
    rows = summarise(records, ["qemu-img", "ours"])
    assert (rows[0]["runs"], rows[0]["distinct"], rows[0]["check_status"], rows[0]["wall"]) == (2, 2, 0, 2.5)
    assert len(rows[0]["errors"]) == 1
    text = render(rows, {"nproc": "2"}, {"closure": "debian", "size": "4M", "runs": 3}, {"bytes": 1 << 30,
                                                                                        "allocated": 1 << 20})
    assert "| qemu-img | 2.50 (2.00-3.00) |" in text and "| 2 of 2 | 1.00x, 1.00x |" in text
    assert "| ours | 1.00 (1.00-1.00) |" in text and "| 2.50x, 1.00x |" in text
