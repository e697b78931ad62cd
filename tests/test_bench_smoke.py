"""The benchmark's closure generator makes the tree it claims, deterministically, with a valid registration."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from bench.closure import Closure, generate

SIZE = 3 << 20


def tree_digest(store: Path) -> str:
    """Hash every object's path, type, mode, mtime, size, contents or target, and the hard-link grouping."""
    h = hashlib.sha256()
    inode_names: dict[int, str] = {}
    for dirpath, dirnames, filenames in sorted(os.walk(store)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, store)
            st = os.lstat(p)
            h.update(f"{rel}\0{stat.filemode(st.st_mode)}\0{st.st_mtime_ns}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                first = inode_names.setdefault(st.st_ino, rel)
                h.update(f"{st.st_size}\0link-of:{first}\0".encode())
                h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def closures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Closure, Closure]:
    base = tmp_path_factory.mktemp("bench")
    return generate(base / "a", SIZE, 7), generate(base / "b", SIZE, 7)


def test_generation_is_deterministic(closures: tuple[Closure, Closure]) -> None:
    a, b = closures
    assert tree_digest(a.store_dir) == tree_digest(b.store_dir)
    assert (a.closure_info_nix / "registration").read_text() == (b.closure_info_nix / "registration").read_text()


def test_other_seed_differs(tmp_path: Path, closures: tuple[Closure, Closure]) -> None:
    other = generate(tmp_path / "c", SIZE, 8)
    assert tree_digest(other.store_dir) != tree_digest(closures[0].store_dir)


def test_tree_holds_what_the_manifest_claims(closures: tuple[Closure, Closure]) -> None:
    c = closures[0]
    kinds: Counter[str] = Counter()
    modes: Counter[int] = Counter()
    links_per_inode: dict[int, set[str]] = {}
    data = 0
    for dirpath, dirnames, filenames in os.walk(c.store_dir):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            assert st.st_mtime == 1, p
            if stat.S_ISLNK(st.st_mode):
                kinds["symlinks"] += 1
                continue
            modes[stat.S_IMODE(st.st_mode)] += 1
            if stat.S_ISDIR(st.st_mode):
                kinds["dirs"] += 1
            else:
                kinds["files"] += 1
                store_path = os.path.relpath(p, c.store_dir).split("/")[0]
                if st.st_ino not in links_per_inode:
                    data += st.st_size
                links_per_inode.setdefault(st.st_ino, set()).add(store_path)
    counts = c.manifest["counts"]
    assert kinds["files"] == counts["files"] > 100
    assert kinds["dirs"] == counts["dirs"] > 10
    assert kinds["symlinks"] == counts["symlinks"] > 5
    assert data == counts["file_bytes"] >= SIZE
    assert set(modes) == {0o444, 0o555}
    # hard links as auto-optimise-store makes them: one inode in several store paths
    assert any(len(paths) > 1 for paths in links_per_inode.values())
    assert sum(len(paths) > 1 for paths in links_per_inode.values()) <= counts["hardlinked_inodes"]


def test_closure_info_lists_the_store_and_nix_verifies_it(closures: tuple[Closure, Closure]) -> None:
    c = closures[0]
    on_disk = sorted(str(c.store_dir / n) for n in os.listdir(c.store_dir))
    assert (c.closure_info / "store-paths").read_text().split() == on_disk
    assert c.toplevel.name.endswith("-nixos-system-bench-25.11") and str(c.toplevel) in on_disk
    subprocess.run(["nix-store", "--store", str(c.root), "--load-db"], check=True,
                   stdin=(c.closure_info_nix / "registration").open())
    verify = subprocess.run(["nix-store", "--store", str(c.root), "--verify", "--check-contents"],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "modified" not in verify.stderr
    check = subprocess.run(["nix-store", "--store", str(c.root), "-qR", f"/nix/store/{c.toplevel.name}"],
                           check=True, capture_output=True, text=True)
    assert len(check.stdout.split()) == len(on_disk)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_bench_times_the_builder_and_the_floor_end_to_end(tmp_path: Path, fmt: str) -> None:
    """`python -m bench` on a tiny closure: both methods run, their images are measured, the report is written."""
    import json
    import sys

    out = tmp_path / "results.md"
    repo = Path(__file__).resolve().parent.parent
    # The builder timed is a copy without bytecode, run where nothing writes bytecode by itself: only the
    # bench's own compile step can leave it there.
    src = tmp_path / "src"
    shutil.copytree(repo / "builder", src / "builder", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "templates", src / "templates")
    res = subprocess.run([sys.executable, "-m", "bench", "--sizes", "4M", "--runs", "1", "--methods", "builder,floor",
                          "--format", fmt, "--work", str(tmp_path / "work"), "--out", str(out),
                          "--builder-src", str(src)],
                         capture_output=True, text=True, cwd=repo, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    records = data["sizes"][0]["records"]
    assert sorted(r["method"] for r in records) == ["builder", "floor"]
    assert [r.get("error") for r in records] == [None, None]
    assert all(r["facts"]["fsck_ok"] for r in records)
    assert "built with the package" in data["machine"]["stat shim"]
    # The builder is timed with its bytecode, as the Nix package installs it, not compiled on every run.
    assert "compiled before timing" in data["machine"]["builder bytecode"]
    compiled = {p.name.split(".")[0] for p in (src / "builder").rglob("__pycache__/*.pyc")}
    assert {"pipeline", "cli", "ext", "convert"} <= compiled
    if fmt == "qcow2":
        assert all(r["output"]["apparent"] > 0 for r in records)
        assert "Output files (qcow2)" in out.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="the store view is a mount namespace made as root")
def test_store_view_lets_the_builder_bind_the_store(tmp_path: Path) -> None:
    """Under bench/storeview.sh the builder finds user namespaces, so it binds the store into mkfs's view rather
    than copying the whole closure first: chroot(2) made the kernel refuse them (EPERM), and the bench timed
    that copy (2-4x the build)."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "store").mkdir()
    (tmp_path / "view").mkdir()
    probe = ("import sys; from builder.sandbox.namespace import userns_available; "
             "sys.exit(0 if userns_available() else 3)")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(repo / "bench/storeview.sh"),
                           str(tmp_path / "store"), str(tmp_path / "view"), "--", sys.executable, "-c", probe],
                          cwd=repo, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
