"""Bad arguments on both sides, beyond tests/test_nix_args.py and tests/test_spec.py, plus fuzzing of the loader.

Nix side: makeDiskImage is evaluated by real Nix exactly as tests/test_nix_args.py does (same helpers);
each bad argument set must fail evaluation with one `makeDiskImage:` message naming the argument, the
value and what is allowed (including a 256-byte path component and targets at, in or above the store).
Spec side: more invalid documents through `python -m builder validate` (status 2, JSON path, value,
allowed).
Hypothesis throws random and mutated documents at the loader: it must answer 0 or 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.cli import main
from builder.errors import SpecError
from builder.spec import load_spec_document
from tests.support.nixeval import ENTRY, EXTRA, image_expr, nix_eval
from tests.support.specs import spec_doc

L256 = "L" * 256

# (id, Nix arguments, fragments the message must contain: argument = value, and what is allowed)
NIX_INVALID: list[tuple[str, str, list[str]]] = [
    ("label-utf8-bytes", '{ fsType = "xfs"; label = "ééééééé"; }', ['label = "ééééééé"', "12"]),
    ("label-empty", '{ label = ""; }', ['label = ""', "16"]),
    ("label-int", "{ label = 5; }", ["label = 5", "16"]),
    ("label-newline", '{ label = "a\\nb"; }', ['label = "a\\nb"', "control characters"]),
    ("deterministic-string", '{ deterministic = "yes"; }', ['deterministic = "yes"', "true or false"]),
    ("only-store-int", "{ onlyNixStore = 1; }", ["onlyNixStore = 1", "true or false"]),
    ("touch-efi-string", '{ touchEFIVars = "true"; }', ['touchEFIVars = "true"', "true or false"]),
    ("install-null", "{ installBootLoader = null; }", ["installBootLoader = null", "true or false"]),
    ("copy-channel-string", '{ copyChannel = "no"; }', ['copyChannel = "no"', "true or false"]),
    ("disk-float", "{ diskSize = 1.5; }", ["diskSize = 1.5", '"auto"']),
    ("disk-null", "{ diskSize = null; }", ["diskSize = null", '"auto"']),
    ("disk-auto-case", '{ diskSize = "Auto"; }', ['diskSize = "Auto"', '"auto"']),
    ("mem-negative", "{ memSize = -1; }", ["memSize = -1", "128"]),
    ("mem-zero", "{ memSize = 0; }", ["memSize = 0", "128"]),
    ("mem-float", "{ memSize = 1.5; }", ["memSize = 1.5", "integer"]),
    ("additional-negative", '{ additionalSpace = "-1M"; }', ['additionalSpace = "-1M"', "size string"]),
    ("additional-unit", '{ additionalSpace = "1X"; }', ['additionalSpace = "1X"', "size string"]),
    ("boot-int", "{ bootSize = 256; }", ["bootSize = 256", "size string"]),
    ("boot-past-disk-legacy-boot", '{ partitionTableType = "legacy+boot"; diskSize = 100; bootSize = "200M"; }',
     ["diskSize = 100", 'bootSize = "200M"', "larger than bootSize"]),
    ("boot-past-disk-hybrid", '{ partitionTableType = "hybrid"; diskSize = 300; bootSize = "300M"; }',
     ["diskSize = 300", 'bootSize = "300M"', "larger than bootSize"]),
    ("boot-below-hybrid-esp", '{ partitionTableType = "hybrid"; bootSize = "4M"; }',
     ['bootSize = "4M"', "END offset", "8 MiB"]),
    ("name-empty", '{ name = ""; }', ['name = ""', "derivation name"]),
    ("name-slash", '{ name = "a/b"; }', ['name = "a/b"', "derivation name"]),
    ("basename-empty", '{ baseName = ""; }', ['baseName = ""', "file name"]),
    ("basename-space", '{ baseName = "my image"; }', ['baseName = "my image"', "file name"]),
    ("format-null", "{ format = null; }", ["format = null", '"qcow2"']),
    ("table-null", "{ partitionTableType = null; }", ["partitionTableType = null", '"efi"']),
    ("fstype-int", "{ fsType = 4; }", ["fsType = 4", '"ext4"']),
    ("contents-element-string", '{ contents = [ "x" ]; }', ['contents[0] = "x"', "attribute set"]),
    ("contents-source-int", '{ contents = [ { source = 3; target = "/x"; } ]; }',
     ["contents[0].source = 3", "absolute path"]),
    ("contents-group-only", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; group = "root"; }} ]; }}',
     ["contents[0]", 'group = "root"', "both"]),
    ("contents-mode-int", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; mode = 644; }} ]; }}',
     ["contents[0].mode = 644", "rsync --chmod string"]),
    ("contents-duplicate-slashes",
     f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x"; }} {{ source = "{EXTRA}"; target = "//x"; }} ]; }}',
     ['contents[1].target = "//x"', "duplicates"]),
    ("contents-dotdot-hidden", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/x/./../.."; }} ]; }}',
     ['contents[0].target = "/x/./../.."', '".."']),
    ("contents-target-component-256-bytes", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/{L256}"; }} ]; }}',
     ["contents[0].target = \"/LLL", "at most 255 bytes"]),
    ("contents-target-in-store", f'{{ contents = [ {{ source = "{ENTRY}"; target = "/nix/store/x"; }} ]; }}',
     ['contents[0].target = "/nix/store/x"', "apart from /nix/store", "additionalPaths"]),
    ("contents-target-above-store", f'{{ contents = [ {{ source = "{ENTRY}"; target = "//nix/./"; }} ]; }}',
     ['contents[0].target = "//nix/./"', "not above it"]),
    ("additional-paths-int", "{ additionalPaths = [ 3 ]; }", ["additionalPaths = 3", "store path"]),
    ("gpuid-int", "{ rootGPUID = 5; }", ["rootGPUID = 5", "GUID"]),
    ("config-int", "{ configFile = 5; }", ["configFile = 5", "path"]),
    ("postvm-null", "{ postVM = null; }", ["postVM = null", "shell commands"]),
    ("efi-variables-int", "{ efiVariables = 3; }", ["efiVariables = 3", "path"]),
    ("unknown-plural", "{ diskSizes = 100; }", ["unknown argument diskSizes", 'did you mean "diskSize"']),
    ("unknown-ovfm", "{ OVFM = { }; }", ["unknown argument OVFM", 'did you mean "OVMF"']),
    ("unknown-empty-name", '{ "" = 1; }', ["unknown argument", "known arguments:"]),
]


@pytest.mark.nix
@pytest.mark.parametrize(("args", "fragments"), [pytest.param(a, f, id=i) for i, a, f in NIX_INVALID])
def test_nix_refuses_with_argument_value_and_allowed(args: str, fragments: list[str]) -> None:
    done = nix_eval(image_expr(args))
    assert done.returncode != 0, f"evaluation succeeded: {done.stdout[:300]}"
    assert "makeDiskImage: " in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, f"{fragment!r} not in:\n{done.stderr}"
    assert "assertion" not in done.stderr.lower()


# ---- spec side ---------------------------------------------------------------------------------------------

DELETE = object()

# (id, dotted field, new value or DELETE, extra top-level changes, fragments of the message)
SPEC_INVALID: list[tuple[str, str, Any, dict[str, Any], list[str]]] = [
    ("label-utf8-bytes", "label", "ééééééé", {"fsType": "xfs"}, ["$.label", "14 bytes", "at most 12"]),
    ("label-slash", "label", "a/b", {}, ["$.label", '"a/b"']),
    ("boot-past-disk", "bootSize", "200M", {"diskSize": 100}, ["$.bootSize", "does not fit in diskSize = 100"]),
    ("boot-at-esp-start", "bootSize", "7M", {}, ["$.bootSize", "rounded as nixpkgs does, to 8 MiB", "starts at 8 MiB"]),
    ("disk-bool", "diskSize", True, {}, ["$.diskSize", "true"]),
    ("mem-bool", "memSize", True, {}, ["$.memSize"]),
    ("epoch-string", "sourceDateEpoch", "1", {}, ["$.sourceDateEpoch", '"1"']),
    ("spec-version-missing", "specVersion", DELETE, {}, ["'specVersion' is a required property"]),
    ("only-store-config", "configFile", "/etc/x.nix", {"onlyNixStore": True, "contents": []},
     ["$.configFile: must be null with onlyNixStore"]),
    ("only-store-bootloader", "installBootLoader", True, {"onlyNixStore": True, "contents": []},
     ["$.installBootLoader: must be false with onlyNixStore"]),
    ("system-unknown-key", "system.extra", 1, {}, ["$.system", "'extra' was unexpected"]),
    ("contents-target-in-store", "contents.0.target", "/nix/store/x", {},
     ["$.contents[0].target", "which the builder fills with the closure"]),
    ("contents-target-is-nix", "contents.0.target", "/nix", {}, ["$.contents[0].target", "holds /nix/store"]),
    ("contents-component-256", "contents.0.target", "/" + L256, {}, ["$.contents[0].target", "255 bytes"]),
    ("contents-source-relative", "contents.0.source", "x", {}, ["$.contents[0].source", '"x"']),
    ("contents-mode-python-octal", "contents.0.mode", "0o644", {}, ["$.contents[0].mode", '"0o644"']),
    ("contents-user-space", "contents.0.user", "a b", {}, ["$.contents[0].user", '"a b"']),
    ("fsuid-garbage", "rootFSUID", "zzz", {}, ["$.rootFSUID", '"zzz"']),
    ("format-trailing-space", "format", "raw ", {}, ["$.format", "'raw '"]),
    ("table-empty", "partitionTableType", "", {}, ["$.partitionTableType", '""']),
    ("grub-device-bad", "bootLoader.grubDevices", ["nodev2"], {}, ["$.bootLoader.grubDevices[0]", '"nodev2"']),
    ("additional-path-relative", "system.additionalPaths", ["relative"], {}, ["$.system.additionalPaths[0]"]),
    ("store-dir-relative", "system.storeDir", "nix/store", {}, ["$.system.storeDir", '"nix/store"']),
    ("enter-empty", "enterCommand", "", {}, ["$.enterCommand", '""']),
    ("post-vm-int", "postVM", 5, {}, ["$.postVM", "5"]),
    ("base-name-slash", "baseName", "a/b", {}, ["$.baseName", '"a/b"']),
    ("additional-space-double-dot", "additionalSpace", "1.5.5M", {}, ["$.additionalSpace", '"1.5.5M"']),
    ("disk-over-1-eib", "diskSize", 2**43, {}, ["$.diskSize: 8796093022208 is not allowed", "1 EiB"]),
    ("additional-space-over-1-eib", "additionalSpace", "2E", {}, ["$.additionalSpace: '2E' is not allowed", "1 EiB"]),
    ("efi-vars-relative", "efiVariables", "vars.fd", {"touchEFIVars": True, "efiFirmware": "/f.fd"},
     ["$.efiVariables", '"vars.fd"']),
]


def _mutate(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or delete, with DELETE) doc[a][b]... from a dotted path; list items by index."""
    *parents, last = dotted.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value


@pytest.mark.parametrize(("field", "value", "extra", "fragments"),
                         [pytest.param(f, v, e, fr, id=i) for i, f, v, e, fr in SPEC_INVALID])
def test_spec_refuses_with_path_value_and_allowed(field: str, value: Any, extra: dict[str, Any],
                                                  fragments: list[str], fixture_spec: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    doc = copy.deepcopy(spec_doc(fixture_spec))
    doc.update(copy.deepcopy(extra))
    _mutate(doc, field, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err


# ---- property-based --------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# Values that are nearly right for many fields, so mutations get past the schema and reach later checks.
PLAUSIBLE: st.SearchStrategy[Any] = st.sampled_from([
    "auto", "0", "1M", "512M", "1E", "99999999999999999999E", "1.5K", "0.0001K", "ext4", "efi", "none",
    "/", "/..", "/a/../b", "//", "/nix/store", "/nix/store/x", "/etc/NIXOS", "0644", "7777", "root", "0",
    "F222513B-DED1-49FA-B591-20CE86A2FE7F", "nodev", "/dev/vda", "chroot", "nixos-enter", "raw", "vpc",
    "\udcff", "a\nb", "L" * 300, "/" + "d/" * 2100,
]) | st.integers(min_value=-3, max_value=2**63) | st.booleans() | st.none() | st.just([]) | st.just({})


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _status(doc: Any, tmp: Path) -> tuple[int, str]:
    """Exit status and stderr of `validate` on doc, in-process (stderr captured)."""
    path = tmp / "fuzz.json"
    path.write_text(json.dumps(doc))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["validate", str(path)])
    return status, err.getvalue()


@pytest.fixture(scope="module")
def base_doc(fixture_spec: Path) -> dict[str, Any]:
    """The valid fixture document that mutations start from."""
    return spec_doc(fixture_spec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=JSON)
def test_random_documents_are_refused_cleanly(doc: Any, tmp_path: Path) -> None:
    status, err = _status(doc, tmp_path)
    assert status == 2, err
    assert "Traceback" not in err


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_specs_give_status_0_or_2(data: st.DataObject, base_doc: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(base_doc)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(doc)
        if not paths:
            break
        where = data.draw(st.sampled_from(paths))
        node: Any = doc
        for key in where[:-1]:
            node = node[key]
        action = data.draw(st.sampled_from(["replace", "plausible", "delete", "add"]))
        if action == "delete":
            del node[where[-1]]
        elif action == "add" and isinstance(node, dict):
            node[data.draw(st.text(max_size=10))] = data.draw(JSON)
        else:
            node[where[-1]] = data.draw(PLAUSIBLE if action == "plausible" else JSON)
    status, err = _status(doc, tmp_path)
    assert status in (0, 2), err
    assert "Traceback" not in err
    if status == 0:  # accepted documents load into a Spec without error
        try:
            load_spec_document(doc)
        except SpecError as exc:  # pragma: no cover - would contradict status 0
            raise AssertionError(exc) from None
