"""Bad arguments on both sides, beyond tests/test_nix_args.py and tests/test_spec.py, plus fuzzing of the loader.

Nix side: makeDiskImage is evaluated by real Nix exactly as tests/test_nix_args.py does (same helpers);
each bad argument set must fail evaluation with one `makeDiskImage:` message naming the argument, the
value and what is allowed (including a 256-byte path component and targets at, in or above the store).
Spec side: more invalid documents through `python -m builder validate` (status 2, JSON path, value,
allowed).
Hypothesis throws random and mutated documents at the loader: it must answer 0 or 2, never a traceback,
always one line per problem; and at `prepare` (slow): 0, 1 or 2 with a one-line message, nothing written
outside its work and image directories, nothing left in TMPDIR.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from builder.cli import main
from builder.errors import SpecError
from builder.spec import load_spec_document
from tests.support.fuzz import JSON, message_problems, mutate
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
    assert message_problems(status, err) == [], err


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_specs_give_status_0_or_2(data: st.DataObject, base_doc: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(base_doc)
    mutate(data, doc)
    status, err = _status(doc, tmp_path)
    assert status in (0, 2), err
    assert message_problems(status, err) == [], err
    if status == 0:  # accepted documents load into a Spec without error
        try:
            load_spec_document(doc)
        except SpecError as exc:  # pragma: no cover - would contradict status 0
            raise AssertionError(exc) from None


# ---- prepare, fuzzed ------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime) of everything below roots, not following symlinks."""
    facts: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                st_ = os.lstat(os.path.join(dirpath, name))
                facts[os.path.join(dirpath, name)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return facts


def _reaches_outside(doc: Any, allowed: tuple[Path, ...]) -> bool:
    """Whether doc would have prepare read an existing host path outside the allowed trees (contents, configFile).

    A mutation may turn a source into "/" or "/nix/store": a legitimate request to copy the host, which
    a test must not make.
    """
    paths: list[Any] = []
    if isinstance(doc, dict):
        paths.append(doc.get("configFile"))
        contents = doc.get("contents")
        if isinstance(contents, list):
            paths += [c.get("source") for c in contents if isinstance(c, dict)]
    for path in paths:
        if not isinstance(path, str) or "\0" in path:
            continue
        try:
            parent = Path(path.split("*")[0]) if "*" in path else Path(path)
            real = parent.resolve()
            if not os.path.lexists(parent):
                continue
        except (OSError, ValueError, RuntimeError):
            continue
        if not any(real == a or a in real.parents for a in allowed):
            return True
    return False


@pytest.fixture(scope="module")
def fuzz_area(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private area for the prepare fuzzing: spec files, TMPDIR, work and image directories."""
    return tmp_path_factory.mktemp("prepare-fuzz")


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prepare_of_fuzzed_specs_ends_cleanly(data: st.DataObject, base_doc: dict[str, Any], fixture_spec: Path,
                                              fuzz_area: Path) -> None:
    """`prepare` on random documents and mutations of the valid spec: status 0, 1 or 2 with a one-line message,
    no traceback, nothing written outside its work and image directories, nothing left in TMPDIR."""
    doc: Any = copy.deepcopy(base_doc)
    if data.draw(st.booleans()):
        mutate(data, doc)
    else:
        doc = data.draw(JSON)
    assume(not _reaches_outside(doc, (fixture_spec.parent.resolve(), fuzz_area.resolve())))
    tmpdir, work, images = fuzz_area / "tmp", fuzz_area / "work", fuzz_area / "images"
    for d in (tmpdir, work, images):
        d.mkdir(exist_ok=True)
    spec = fuzz_area / "spec.json"
    spec.write_text(json.dumps(doc))
    before = _snapshot(fixture_spec.parent, fuzz_area / "tmp")
    done = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(images / "x.img"),
                           "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO)))
    assert message_problems(done.returncode, done.stderr) == [], done.stderr[-3000:]
    assert _snapshot(fixture_spec.parent, fuzz_area / "tmp") == before, "prepare wrote outside its directories"
    assert os.listdir(work) == [] and os.listdir(tmpdir) == [], done.stderr[-3000:]
    assert os.listdir(images) == (["x.img"] if done.returncode == 0 else []), done.stderr[-3000:]
    for leftover in images.iterdir():
        leftover.unlink()
