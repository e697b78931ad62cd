"""buildPythonApplication's install in the nixpkgs stand-in: lay the package out as setuptools would.

Only the packages listed in pyproject.toml's [tool.setuptools] (from where package-dir maps them) and their
package-data are installed into $out/lib/site-packages (files elsewhere in the source are not, as in a
real wheel); each
[project.scripts] entry becomes $out/bin/<name>, running the venv's python with $binPath on PATH.
"""

import os
import shutil
import tomllib
from pathlib import Path

src = Path(os.environ["src"])
out = Path(os.environ["out"])
site = out / "lib" / "site-packages"
pyproject = tomllib.loads((src / "pyproject.toml").read_text())
setuptools = pyproject["tool"]["setuptools"]
package_dir = setuptools.get("package-dir", {})
for package in setuptools["packages"]:
    dest = site / package.replace(".", "/")
    dest.mkdir(parents=True, exist_ok=True)
    source = src / package_dir.get(package, package.replace(".", "/"))
    for module in sorted(source.glob("*.py")):
        shutil.copy(module, dest)
    for pattern in setuptools.get("package-data", {}).get(package, []):
        for data in sorted(source.glob(pattern)):
            target = dest / data.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(data, target)
(out / "bin").mkdir(parents=True)
for name, entry in pyproject["project"].get("scripts", {}).items():
    module, _, function = entry.partition(":")
    script = out / "bin" / name
    script.write_text(
        "#!/bin/sh\n"
        f'export PATH="{os.environ["binPath"]}:$PATH"\n'
        f'export PYTHONPATH="{site}"\n'
        f"exec {os.environ['python']} -c 'import sys; from {module} import {function}; sys.exit({function}())' \"$@\"\n"
    )
    script.chmod(0o755)
