"""The spec contract: invalid specs are refused whole, with status 2 and the JSON path, value and what is allowed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from builder.cli import main
from builder.units import parse_iec
from tests.support.specs import spec_doc


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """Set doc[a][b]... from a dotted path; lists by integer index."""
    *parents, last = dotted.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


DELETE = object()

# (field to change, new value, text the error must contain)
BAD: list[tuple[str, Any, str]] = [
    ("specVersion", 2, "$.specVersion"),
    ("partitionTableType", "gpt", "$.partitionTableType"),
    ("partitionTableType", 7, "$.partitionTableType"),
    ("fsType", "ntfs", "$.fsType"),
    ("format", "qcow3", "$.format"),
    ("format", "../x", "$.format"),
    ("diskSize", 0, "$.diskSize"),
    ("diskSize", -5, "$.diskSize"),
    ("diskSize", "big", "$.diskSize"),
    ("diskSize", 1.5, "$.diskSize"),
    ("additionalSpace", "512X", "$.additionalSpace"),
    ("additionalSpace", 512, "$.additionalSpace"),
    ("bootSize", "-1M", "$.bootSize"),
    ("bootSize", "4M", "$.bootSize"),
    ("label", "", "$.label"),
    ("memSize", "1024", "$.memSize"),
    ("rootGPUID", "not-a-guid", "$.rootGPUID"),
    ("rootFSUID", None, "$.rootFSUID"),
    ("name", "has space", "$.name"),
    ("baseName", "", "$.baseName"),
    ("installBootLoader", "yes", "$.installBootLoader"),
    ("contents.0.mode", "999", "$.contents[0].mode"),
    ("contents.0.mode", 755, "$.contents[0].mode"),
    ("contents.0.user", None, "$.contents[0]: user and group must both be set"),
    ("contents.0.target", "/etc/../../escape", "$.contents[0].target"),
    ("contents.0.target", "/", "$.contents[0].target"),
    ("contents.1.target", "/etc/motd", "$.contents[1].target"),
    ("contents.0.source", DELETE, "$.contents[0]: 'source' is a required property"),
    ("touchEFIVars", True, "$.efiVariables: touchEFIVars = true needs efiFirmware and efiVariables"),
    ("onlyNixStore", True, "$.contents: must be [] with onlyNixStore"),
    ("copyChannel", True, "$.system.channel"),
    ("system.toplevel", "nix/store/x", "$.system.toplevel"),
    ("system.closureInfo", None, "$.system.closureInfo"),
    ("system.additionalPaths", "/nix/store/x", "$.system.additionalPaths"),
    ("bootLoader.grubDevices", ["/dev/sda", "sdb"], "$.bootLoader.grubDevices[1]"),
    ("sourceDateEpoch", -1, "$.sourceDateEpoch"),
    ("enterCommand", "sudo", "$.enterCommand"),
    ("extraThing", 1, "Additional properties are not allowed ('extraThing' was unexpected)"),
]


@pytest.mark.parametrize("field,value,expected", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_spec_refused(field: str, value: Any, expected: str, fixture_spec: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    doc = copy.deepcopy(spec_doc(fixture_spec))
    if value is DELETE:
        *parents, last = field.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    else:
        _set(doc, field, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_all_problems_reported_at_once(fixture_spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = spec_doc(fixture_spec)
    doc.update(format="qcow2", partitionTableType="gpt", label="", memSize=0)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for where in ("$.partitionTableType", "$.label", "$.memSize"):
        assert where in err


@pytest.mark.parametrize("text", ["{", "[]", "null", "\udcff"])
def test_not_a_spec(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["validate", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.json")]) == 2
    assert "cannot read spec file" in capsys.readouterr().err


def test_valid_fixture_spec(fixture_spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(fixture_spec)]) == 0
    assert json.loads(capsys.readouterr().out) == spec_doc(fixture_spec)


@pytest.mark.parametrize("text,expected", [("512M", 512 << 20), ("1G", 1 << 30), ("1.5K", 1536), ("4096", 4096),
                                           ("2GiB", 2 << 30), ("0.1K", 103)])
def test_parse_iec(text: str, expected: int) -> None:
    assert parse_iec(text) == expected


def test_efi_vars_need_a_gpt_layout(fixture_spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = spec_doc(fixture_spec)
    doc.update(touchEFIVars=True, partitionTableType="legacy", efiFirmware="/x/OVMF_CODE.fd",
               efiVariables="/x/OVMF_VARS.fd")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["validate", str(path)]) == 2
    assert "$.touchEFIVars: true is not allowed with partitionTableType = 'legacy'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["512M\n", "1G\n", "4096\n"])
def test_parse_iec_takes_no_trailing_newline(text: str) -> None:
    """Its own regex ended in $, which lets one newline through (the schema stops it first; this must too)."""
    with pytest.raises(ValueError, match="is not a size"):
        parse_iec(text)
