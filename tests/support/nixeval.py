"""Real Nix evaluation for tests: nix-instantiate over makeDiskImage with tests/fake-nixpkgs.nix (nothing built)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema

from builder.spec import SCHEMA_PATH

REPO = Path(__file__).resolve().parent.parent.parent
FAKE = REPO / "tests" / "fake-nixpkgs.nix"
STORE = "/nix/store"
DEFAULT_GUID = "F222513B-DED1-49FA-B591-20CE86A2FE7F"


def nix_eval(expr: str) -> subprocess.CompletedProcess[str]:
    """Evaluate a Nix expression strictly to JSON with the real nix-instantiate."""
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--option", "substituters", "", "--expr", expr],
        capture_output=True,
        text=True,
        check=False,
    )


def image_expr(args: str, fake: str = "{ }") -> str:
    """An expression calling makeDiskImage with fake pkgs/config and returning what tests look at."""
    return f"""
let
  fake = import {FAKE} {fake};
  image = import {REPO}/nix/make-disk-image.nix ({{ inherit (fake) pkgs lib config; }} // ({args}));
in {{
  spec = image.spec;
  specFileText = image.specFile.text;
  inVM = image.inVM or false;
  filePath = image.filePath;
  env = removeAttrs image.env [ "passthru" ];
  buildCommand = image.buildCommand;
  closureRoots = image.closureInfo.rootPaths;
  toplevel = fake.toplevel;
  channel = fake.channel;
}}"""


def evaluate(args: str, fake: str = "{ }") -> dict[str, Any]:
    """Evaluate makeDiskImage with these arguments; fail the test with Nix's message if it errors."""
    done = nix_eval(image_expr(args, fake))
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def schema_errors(doc: Any) -> list[str]:
    """Every JSON Schema violation of the spec document."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


ENTRY = f"{STORE}/0123456789abcdfghijklmnpqrsvwxyz-pkg"
EXTRA = f"{STORE}/abcdfghijklmnpqrsvwxyz0123456789-extra"
