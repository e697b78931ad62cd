"""The built wheel (what pip and Nix's buildPythonApplication install) holds every module and data file the
builder reads: a subpackage missing from pyproject's list only shows once the builder runs from the store."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_module_template_and_data_file(tmp_path: Path) -> None:
    # Built from a clean copy, as Nix builds from its source: a build/ directory left in the checkout by an
    # earlier build would otherwise hide a missing package.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", ".venv", ".demo", "__pycache__",
                                                             "*.so", "*.egg-info"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(REPO)) for p in (REPO / "builder").rglob("*")
              if p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts}
    wanted |= {"builder/templates/" + p.name for p in (REPO / "templates").iterdir()
               if p.suffix in (".py", ".j2", ".sh")}
    assert sorted(wanted - names) == []
    for library in ("_statshim", "_e2fscrc"):
        assert any(n.startswith(f"builder/sandbox/{library}") and n.endswith(".so") for n in names), library
