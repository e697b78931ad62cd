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
