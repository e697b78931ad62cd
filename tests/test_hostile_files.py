"""The builder touches only what it owns: the work directory it makes, fresh temporary files, its output.

Each case runs `python -m builder` as its own process with TMPDIR set to a test-owned directory and
looks at the host afterwards with plain file-system calls: a planted symlink's target, files beside
the work directory, the output directory before and after. Sizes the build filesystem cannot hold are
refused up front, naming the argument.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.disk.sparse import largest_file
from tests.support.leftovers import tree_listing
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], tmpdir: Path, preexec: Callable[[], None] | None = None,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`python -m builder ARGS` with TMPDIR set; stdout and stderr captured."""
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, preexec_fn=preexec, timeout=300)


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec hook: RLIMIT_FSIZE of limit bytes (a build user's quota, say)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# ---- sizes the build filesystem cannot hold -----------------------------------------------------------------

def test_additional_space_beyond_the_build_filesystem_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    """1 EiB is a valid ext4, but the probe file failed with EFBIG on a scratch path (exit 1)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    if largest_file(tmpdir) >= 1 << 60:
        pytest.skip("this filesystem holds 1 EiB files")
    res = run(["prepare", str(make_spec(additionalSpace="1E")), "--image", str(tmp_path / "x.img")], tmpdir)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert 'error: additionalSpace = "1E": the image would be at least 1.0 EiB' in res.stderr, res.stderr
    assert "the build filesystem" in res.stderr and "holds files of at most" in res.stderr
    assert tree_listing(tmpdir) == [] and sorted(os.listdir(tmp_path)) == ["tmp"]


@pytest.mark.parametrize(("overrides", "field"), [({"diskSize": 200}, "diskSize = 200"),
                                                  ({"additionalSpace": "150M"}, 'additionalSpace = "150M"')])
def test_a_file_size_limit_is_named(overrides: dict[str, object], field: str, make_spec: SpecFactory,
                                    tmp_path: Path) -> None:
    """RLIMIT_FSIZE of 100 MiB: the image cannot be written; refused up front, not EFBIG halfway."""
    tmpdir = tmp_path / "tmp"
    res = run(["build", str(make_spec(**overrides)), "--out", str(tmp_path / "out")], tmpdir,
              file_size_limit(100 << 20))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"error: {field}" in res.stderr and "at most 100.0 MiB" in res.stderr, res.stderr
    assert "[makeDiskImage] stage root" not in res.stderr  # refused before any work
    assert tree_listing(tmpdir) == [] and tree_listing(tmp_path / "out") == []


# ---- temporary files and the work directory ----------------------------------------------------------------

def test_a_symlink_planted_at_the_partial_image_is_not_written_through(make_spec: SpecFactory,
                                                                        tmp_path: Path) -> None:
    """`prepare --image X` wrote the whole image into the target of a link at X.partial, then renamed the link."""
    victim = tmp_path / "victim"
    victim.write_text("must stay as it is\n")
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.img.partial").symlink_to(victim)
    res = run(["prepare", str(make_spec()), "--image", str(images / "x.img")], tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "must stay as it is\n"
    assert (images / "x.img").is_file() and not (images / "x.img").is_symlink()
    assert (images / "x.img").stat().st_size > 64 << 20
    assert os.readlink(images / "x.img.partial") == str(victim)  # not ours: left as it was
    assert sorted(os.listdir(images)) == ["x.img", "x.img.partial"]


def test_the_image_keeps_the_mode_a_new_file_gets(make_spec: SpecFactory, tmp_path: Path) -> None:
    """Made under a fresh private name, the image still gets 0666 less the umask, as `open(..., "w")` gives."""
    res = run(["prepare", str(make_spec()), "--image", str(tmp_path / "x.img")], tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x.img").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    """This process's umask (set and restored)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def planted_work_dir(work: Path) -> dict[str, str]:
    """A --work directory that already holds files named like the builder's own scratch files."""
    (work / "root").mkdir(parents=True)
    (work / "root" / "keep").write_text("mine\n")
    planted = {"binds.json": "[]\n", "debugfs.cmds": "mine\n", "nixos.raw": "mine\n", "other": "mine\n"}
    for name, text in planted.items():
        (work / name).write_text(text)
    return {**planted, "root/keep": "mine\n"}


def work_files(work: Path) -> dict[str, str]:
    """Every file below work with its text."""
    return {str(p.relative_to(work)): p.read_text() for p in sorted(work.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["prepare", "build"])
@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_the_work_directory_is_left_as_it_was(command: str, outcome: str, make_spec: SpecFactory,
                                              tmp_path: Path) -> None:
    """`--work DIR` deleted DIR/root and left binds.json and debugfs.cmds behind; now the builder works in a
    directory it makes inside DIR and removes only that."""
    work = tmp_path / "work"
    before = planted_work_dir(work)
    contents = [] if outcome == "success" else [
        {"source": str(tmp_path / "missing"), "target": "/x", "mode": None, "user": None, "group": None}]
    spec = make_spec(contents=contents)
    target = ["--image", str(tmp_path / "x.img")] if command == "prepare" else ["--out", str(tmp_path / "out")]
    res = run([command, str(spec), *target, "--work", str(work)], tmp_path / "tmp")
    assert res.returncode == (0 if outcome == "success" else 2), res.stderr
    assert work_files(work) == before
    assert sorted(os.listdir(work)) == ["binds.json", "debugfs.cmds", "nixos.raw", "other", "root"]
    assert tree_listing(tmp_path / "tmp") == []
