"""builder/schema_fast.py never says "valid" where jsonschema (the oracle) finds an error, and says "valid" for
the specs real builds use, so they load without importing jsonschema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from builder.schema_fast import surely_valid
from builder.spec import SCHEMA_PATH
from tests.test_rules import CASES

SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
ORACLE = jsonschema.Draft202012Validator(SCHEMA)
# Values put in every place of a valid spec: each JSON type, edge numbers, strings that match loose patterns.
PROBES: list[Any] = [None, True, False, 0, 1, -1, 1.0, 0.5, 2**70, -(2**70), "", "x", "auto", "1", "1.0", "0",
                     "/", "/x", "a" * 5000, "\n", "/x\n", "1M", "ext4", "raw", "efi", "menu-force",
                     "F222513B-DED1-49FA-B591-20CE86A2FE7F", [], [1], ["x"], {}, {"a": 1}]
SYSTEMD_BOOT = {
    "efiBinary": "/nix/store/x-systemd/lib/systemd/boot/efi/systemd-bootx64.efi", "efiSysMountPoint": "/boot",
    "xbootldrMountPoint": None, "distroName": "NixOS", "timeout": 5, "editor": False, "consoleMode": "keep",
    "rebootForBitlocker": False, "extraFiles": {"efi/x.efi": "/nix/store/x-y/x.efi"},
    "extraEntries": {"x.conf": "title x\n"},
}


def places(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside doc (dict keys and list indexes)."""
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from places(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from places(v, (*path, i))


def put(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of doc with the value at path replaced."""
    new = copy.deepcopy(doc)
    if not path:
        return value
    parent = new
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return new


def valid_docs(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Valid spec documents: the fixture's, each accepted rules case, systemd-boot, contents with every field."""
    docs = [base]
    docs += [{**base, **changes} for _, _, changes, accepted in CASES if accepted]
    sd = copy.deepcopy(base)
    sd["bootLoader"]["systemdBoot"] = copy.deepcopy(SYSTEMD_BOOT)
    docs.append(sd)
    docs.append({**base, "contents": [{"source": "/etc/hostname", "target": "/x", "mode": "u+x,go-w",
                                       "user": "root", "group": "0"}]})
    return [d for d in docs if not list(ORACLE.iter_errors(d))]


@pytest.fixture(scope="module")
def base(fixture_spec: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fixture_spec.read_text())
    return doc


def test_valid_specs_take_the_fast_path(base: dict[str, Any]) -> None:
    docs = valid_docs(base)
    assert len(docs) > 15
    assert [d for d in docs if not surely_valid(d, SCHEMA)] == []


@pytest.mark.slow  # about 30 s: jsonschema takes 5 ms a document
def test_never_valid_where_jsonschema_finds_an_error(base: dict[str, Any]) -> None:
    """Every value replaced by every probe, every key removed, a key added: in the fixture's document, with
    systemd-boot, and with a contents entry."""
    checked = sampled = wrong = 0
    for doc in [d for d in valid_docs(base) if d["bootLoader"].get("systemdBoot") or d["contents"]] + [base]:
        for path in places(doc):
            variants = [put(doc, path, p) for p in PROBES]
            if path and isinstance(path[-1], str):
                trimmed = put(doc, path[:-1], {k: v for k, v in _at(doc, path[:-1]).items() if k != path[-1]})
                variants.append(trimmed)
            if isinstance(_at(doc, path), dict):
                variants.append(put(doc, path, {**_at(doc, path), "unknownKey": 1}))
            for variant in variants:
                checked += 1
                if surely_valid(variant, SCHEMA):
                    errors = [e.message for e in ORACLE.iter_errors(variant)]
                    assert errors == [], f"fast check said valid at {path}: {errors[:3]}"
                elif checked % 10 == 0:  # the oracle is slow: how often a "no" is overruled, on a sample
                    sampled += 1
                    wrong += ORACLE.is_valid(variant)
    assert checked > 3000
    # A "no" jsonschema overrules costs only time; it should be rare (floats like 1.0 as integers).
    assert wrong < sampled // 20


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    """The value at path."""
    for part in path:
        doc = doc[part]
    return doc


def test_loading_a_valid_spec_does_not_import_jsonschema(fixture_spec: Path) -> None:
    code = ("import sys; from builder.spec import load_spec; load_spec(__import__('pathlib').Path(sys.argv[1])); "
            "print('jsonschema' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(fixture_spec)], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("value", [1, 1.0, True, "1"])
def test_one_of_is_never_valid_where_jsonschema_says_otherwise(value: Any) -> None:
    """oneOf counts the branches that say yes, so every "no" must be exact: 1.0 == 1 for jsonschema's const."""
    schema = {"oneOf": [{"const": 1}, {"type": "number"}]}
    oracle_valid = not list(jsonschema.Draft202012Validator(schema).iter_errors(value))
    assert not surely_valid(value, schema) or oracle_valid, (value, "fast says valid, jsonschema does not")
