"""Malformed specs, round two: every one is refused with status 2 and the field named, never a traceback.

Covers what survived the first round of hostile specs (tests/test_hostile_args.py): numbers that are not
integers, JSON nested or sized to exhaust the loader, duplicate keys, a trailing newline or other control
character in any string field (Python's `$` lets one newline through), storeDir and closureInfo
registrations that are not store paths. Specs go through `python -m builder validate` in-process, or,
where the file system is involved, `prepare` as its own process.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.cli import main
from builder.errors import SpecError
from builder.spec import SCHEMA_PATH, load_spec_document
from tests.support.specs import spec_doc

REPO = Path(__file__).resolve().parent.parent
GUID = "F222513B-DED1-49FA-B591-20CE86A2FE7F"


def validate(doc: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None = None) -> tuple[int, str]:
    """Exit status and stderr of `validate` on doc (or on the raw text given)."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(doc) if text is None else text)
    status = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def problem_lines(err: str) -> list[str]:
    """The lines of an `error: invalid spec:` message, one per problem."""
    return [line for line in err.splitlines() if line.startswith("  - ")]


# ---- numbers and JSON shape -------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [("diskSize", 200.0), ("memSize", 1024.0), ("sourceDateEpoch", 1.7e9),
                                              ("specVersion", 1.0)])
def test_a_float_is_not_an_integer(field: str, value: float, fixture_spec: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """JSON Schema calls 200.0 an integer; Nix never writes one for an int, and the builder would pass a float on."""
    doc = {**spec_doc(fixture_spec), field: value}
    status, err = validate(doc, tmp_path, capsys)
    assert status == 2, err
    assert f"$.{field}: {json.dumps(value)} is not allowed" in err, err


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(constant: str, fixture_spec: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps(spec_doc(fixture_spec)).replace('"memSize": 1024', f'"memSize": {constant}')
    status, err = validate(None, tmp_path, capsys, text)
    assert status == 2, err
    assert "$.memSize" in err, err


@pytest.mark.parametrize("digits", [401, 5000])
def test_a_huge_integer_is_named_not_echoed(digits: int, fixture_spec: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """More than 4300 digits made int() raise; 401 digits were printed whole in the message."""
    text = json.dumps(spec_doc(fixture_spec)).replace('"memSize": 1024', f'"memSize": {"9" * digits}')
    status, err = validate(None, tmp_path, capsys, text)
    assert status == 2, err
    (line,) = problem_lines(err)
    assert line.startswith("  - $.memSize: "), err
    assert "9" * 40 not in line and len(line) < 300, line
    assert f"{digits} digits" in line, line


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_refused(depth: int, fixture_spec: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """100 000 levels made the JSON decoder raise RecursionError; 100 inside a field must be named."""
    nested = "[" * depth + "]" * depth
    text = json.dumps(spec_doc(fixture_spec)).replace('"postVM": ""', f'"postVM": {nested}')
    status, err = validate(None, tmp_path, capsys, text)
    assert status == 2, err
    assert "nested" in err, err
    if depth == 100:
        assert "$.postVM" in err, err


def test_duplicate_keys_are_refused(fixture_spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """json.loads keeps the last of two equal keys: a spec would say two things and mean one."""
    text = json.dumps(spec_doc(fixture_spec)).replace('"memSize": 1024', '"memSize": 1024, "memSize": 2048')
    text = text.replace('"storeDir": "/nix/store"', '"storeDir": "/nix/store", "storeDir": "/"')
    status, err = validate(None, tmp_path, capsys, text)
    assert status == 2, err
    assert '$.memSize: the key "memSize" is given 2 times' in err, err
    assert '$.system.storeDir: the key "storeDir" is given 2 times' in err, err


@pytest.mark.parametrize("source", ["/dev/zero", "sparse-file"])
def test_an_endless_spec_file_is_refused_without_reading_it_all(source: str, tmp_path: Path) -> None:
    """`validate /dev/zero` read until memory ran out: a device is refused before reading, and the size of a
    regular file is bounded."""
    path = Path(source)
    if source == "sparse-file":
        path = tmp_path / "huge.json"
        with open(path, "wb") as f:
            f.truncate(64 << 20)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (800 << 20, 800 << 20))

    done = subprocess.run([sys.executable, "-m", "builder", "validate", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_memory, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    expected = "a device, not a regular file" if source == "/dev/zero" else "larger than"
    assert str(path) in done.stderr and expected in done.stderr, done.stderr


def test_a_spec_from_a_pipe_is_read(fixture_spec: Path) -> None:
    """A spec through `<(...)` (a pipe) is still read: only devices, directories and sockets are refused."""
    done = subprocess.run(["bash", "-c", f'"$0" -m builder validate <(cat {fixture_spec})', sys.executable],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["baseName"] == spec_doc(fixture_spec)["baseName"]


# ---- every string field -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_doc(fixture_spec: Path) -> dict[str, Any]:
    """The fixture spec with every optional string field set: a systemdBoot section, devices, paths."""
    doc = copy.deepcopy(spec_doc(fixture_spec))
    store = doc["system"]["toplevel"]
    doc.update(configFile=str(fixture_spec), postVM="true", copyChannel=True)
    doc["system"]["channel"] = store
    doc["bootLoader"] = {
        "grubDevices": ["/dev/sda", "nodev"],
        "limineBiosDevice": "/dev/sdb",
        "systemdBoot": {
            "efiBinary": f"{store}/lib/systemd/boot/efi/systemd-bootx64.efi", "efiSysMountPoint": "/boot",
            "xbootldrMountPoint": None, "distroName": "Fixture", "timeout": "menu-force", "editor": False,
            "consoleMode": "keep", "rebootForBitlocker": False, "extraFiles": {"efi/x.efi": store},
            "extraEntries": {"x.conf": "title x\n"},
        },
    }
    load_spec_document(doc)  # valid as it is
    return doc


def string_fields(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], bool]]:
    """(path, is a key) of every string value and every key of a free-form object (extraFiles, extraEntries)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if path and path[-1] in ("extraFiles", "extraEntries"):
                yield (*path, key), True
            yield from string_fields(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from string_fields(value, (*path, i))
    elif isinstance(doc, str):
        yield path, False


def with_string(doc: dict[str, Any], where: tuple[Any, ...], is_key: bool, new: str) -> dict[str, Any]:
    """A copy of doc with the string (or key) at where replaced by new."""
    out = copy.deepcopy(doc)
    node: Any = out
    for key in where[:-1]:
        node = node[key]
    if is_key:
        node[new] = node.pop(where[-1])
    else:
        node[where[-1]] = new
    return out


def verdict(doc: dict[str, Any]) -> list[str] | None:
    """None if the loader accepts doc, else its problems; anything but SpecError fails the test."""
    try:
        load_spec_document(doc)
    except SpecError as exc:
        return exc.problems
    return None


def json_path(where: tuple[Any, ...], is_key: bool) -> str:
    """The JSON path a message names for a field (for a key: the object holding it)."""
    parts = where[:-1] if is_key else where
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", p)
                         else f"[{json.dumps(p)}]" for p in parts)


CONTROL = ["\n", "\r", "\t", "\x01", "\x1b", "\x7f"]


def test_the_string_fields_are_all_covered(full_doc: dict[str, Any]) -> None:
    fields = {json_path(w, k) for w, k in string_fields(full_doc)}
    assert len(fields) >= 30, sorted(fields)


def test_no_string_field_takes_a_nul(full_doc: dict[str, Any]) -> None:
    """Nothing in a spec can hold a NUL: paths, names, labels, postVM (a bash argument), boot entries."""
    for where, is_key in string_fields(full_doc):
        value = where[-1] if is_key else _get(full_doc, where)
        problems = verdict(with_string(full_doc, where, is_key, value + "\0"))
        assert problems is not None, f"{json_path(where, is_key)}: a NUL was accepted"
        assert any(p.startswith(json_path(where, is_key)) for p in problems), problems


def test_a_trailing_control_character_is_refused_where_an_inner_one_is(full_doc: dict[str, Any]) -> None:
    """`^...$` patterns let "fixture\\n" through while "fixtur\\ne" fails: every field must match whole.

    For each string field and control character c: value + c is accepted only if value with c before its
    last character is; a refusal names the field.
    """
    wrong = []
    for where, is_key in string_fields(full_doc):
        value = where[-1] if is_key else _get(full_doc, where)
        for c in CONTROL:
            inner = verdict(with_string(full_doc, where, is_key, value[:-1] + c + value[-1:]))
            trailing = verdict(with_string(full_doc, where, is_key, value + c))
            if trailing is None and inner is not None:
                wrong.append(f"{json_path(where, is_key)} + {c!r}")
            if trailing is not None:
                assert any(p.startswith(json_path(where, is_key)) for p in trailing), trailing
    assert wrong == []


@pytest.mark.parametrize(("field", "value", "where"), [
    ("label", "fixture\n", "$.label"), ("label", "a\x7fb", "$.label"),
    ("bootLoader.grubDevices", ["nodev\n"], "$.bootLoader.grubDevices[0]"),
    ("bootLoader.grubDevices", ["/dev/sda", "/dev/sdb\n"], "$.bootLoader.grubDevices[1]"),
    ("bootLoader.limineBiosDevice", "/dev/sda\n", "$.bootLoader.limineBiosDevice"),
    ("postVM", "true\0", "$.postVM"), ("contents.0.user", "0\n", "$.contents[0].user"),
])
def test_control_characters_named(field: str, value: Any, where: str, fixture_spec: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    doc = copy.deepcopy(spec_doc(fixture_spec))
    *parents, last = field.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    status, err = validate(doc, tmp_path, capsys)
    assert status == 2, err
    assert any(line.startswith(f"  - {where}: ") for line in problem_lines(err)), err


def test_no_schema_pattern_ends_in_a_dollar() -> None:
    """`$` in Python's re matches before a final newline; the schema ends its patterns with (?![\\s\\S])."""
    patterns: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                patterns.append(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(SCHEMA_PATH.read_text()))
    assert len(patterns) >= 12
    assert [p for p in patterns if p.endswith("$")] == []


def _get(doc: Any, where: tuple[Any, ...]) -> str:
    """The string at a path."""
    for key in where:
        doc = doc[key]
    assert isinstance(doc, str)
    return doc


# ---- the store ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("store_dir", ["/", "/nix/store/", "//nix/store", "/nix/./store", "/nix//store",
                                       "/nix/../nix/store", "/nix/st\nore"])
def test_store_dir_is_absolute_normalized_and_not_the_root(store_dir: str, fixture_spec: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """storeDir = "/" was accepted: host directories registered "under" it were bound into the image."""
    doc = spec_doc(fixture_spec)
    doc.update(contents=[])
    doc["system"]["storeDir"] = store_dir
    status, err = validate(doc, tmp_path, capsys)
    assert status == 2, err
    assert any(line.startswith(f"  - $.system.storeDir: {json.dumps(store_dir)}") for line in problem_lines(err)), err


def registration_entry(path: str, nar_size: str = "5") -> str:
    """One closureInfo registration entry (path, hash, size, deriver, no references)."""
    return f"{path}\nsha256:{'0' * 52}\n{nar_size}\n\n0\n"


REGISTRATION_CASES: list[tuple[str, str, str]] = [
    ("dotdot", registration_entry("/nix/store/.."), "'/nix/store/..' is not a store path"),
    ("dot", registration_entry("/nix/store/."), "'/nix/store/.' is not a store path"),
    ("store-dir", registration_entry("/nix/store/"), "'/nix/store/' is not a store path"),
    ("double-slash", registration_entry("//nix/store/" + "a" * 32 + "-x"), "is not a store path"),
    ("short-hash", registration_entry("/nix/store/tooshort-x"), "'/nix/store/tooshort-x' is not a store path"),
    ("not-base32", registration_entry("/nix/store/" + "e" * 32 + "-x"), "is not a store path"),
    ("dot-name", registration_entry("/nix/store/" + "a" * 32 + "-.x"), "is not a store path"),
    ("host-dir", registration_entry("/etc"), "'/etc' is not a store path"),
    ("nar-negative", registration_entry("/nix/store/" + "a" * 32 + "-x", "-5"), "narSize '-5' is not allowed"),
    ("nar-huge", registration_entry("/nix/store/" + "a" * 32 + "-x", "99999999999999999999"),
     "narSize '99999999999999999999' is not allowed"),
    ("nar-space", registration_entry("/nix/store/" + "a" * 32 + "-x", " 5"), "narSize ' 5' is not allowed"),
]


@pytest.mark.parametrize(("entry", "fragment"), [pytest.param(e, f, id=i) for i, e, f in REGISTRATION_CASES])
def test_registration_entries_must_be_store_paths(entry: str, fragment: str, fixture_spec: Path,
                                                  tmp_path: Path) -> None:
    """`/nix/store/..` and friends passed and failed later (exit 1) on a scratch path; now refused by index."""
    doc = spec_doc(fixture_spec)
    info = tmp_path / "closure-info"
    info.mkdir()
    original = Path(doc["system"]["closureInfo"]) / "registration"
    (info / "registration").write_text(original.read_text() + entry)
    doc["system"]["closureInfo"] = str(info)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(doc))
    done = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(tmp_path / "x.img")],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    entries = len(list(_entries(original.read_text())))
    assert f"system.closureInfo: registration[{entries}] (line " in done.stderr, done.stderr
    assert fragment in done.stderr, done.stderr
    assert not (tmp_path / "x.img").exists()


def _entries(text: str) -> Iterator[str]:
    """The store paths a registration file registers, in order."""
    lines = text.split("\n")
    i = 0
    while i + 4 < len(lines):
        yield lines[i]
        i += 5 + int(lines[i + 4])


def test_a_key_with_a_newline_is_named_on_one_line(fixture_spec: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Found by fuzzing: a key "x\\n" holding a NUL gave a problem line split in two."""
    doc = {**spec_doc(fixture_spec), "x\n": "\0"}
    doc["system"] = {**doc["system"], "a.b": 1}
    status, err = validate(doc, tmp_path, capsys)
    assert status == 2, err
    lines = err.splitlines()
    assert lines[0] == "error: invalid spec:" and all(line.startswith("  - $") for line in lines[1:]), err
    assert '$["x\\n"]: "\\u0000" contains a NUL byte' in err, err


def test_reading_the_registration_does_not_reserve_its_bound(fixture_spec: Path, tmp_path: Path) -> None:
    """The registration is read in pieces: `f.read(bound + 1)` reserved the whole 512 MiB bound up front, which
    an address-space limit or a build machine without overcommit refuses (MemoryError). (The spec is read the
    same way; its 16 MiB bound is too small to show it here.)"""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(spec_doc(fixture_spec)))
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from builder.spec import load_spec\n"
        "from builder.staging import store\n"
        "size = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmSize:'))\n"
        "limit = size * 1024 + (256 << 20)\n"  # room for reading, not for reserving 512 MiB
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "print(len(store.read_closure(load_spec(Path(sys.argv[1])))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(spec)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 0


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "sparse-file"])
def test_an_endless_registration_is_refused_without_reading_it_all(kind: str, fixture_spec: Path,
                                                                   tmp_path: Path) -> None:
    """closureInfo's registration read until memory ran out when it was /dev/zero, and a FIFO nobody writes hung
    the build: both are refused before reading; a regular file is bounded like the spec."""
    doc = spec_doc(fixture_spec)
    info = tmp_path / "closure-info"
    info.mkdir()
    registration = info / "registration"
    if kind == "/dev/zero":
        registration.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(registration)
    else:
        with open(registration, "wb") as f:
            f.truncate((512 << 20) + 1)
    doc["system"]["closureInfo"] = str(info)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(doc))

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (800 << 20, 800 << 20))

    done = subprocess.run([sys.executable, "-m", "builder", "prepare", str(spec), "--image", str(tmp_path / "x.img")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    expected = {"/dev/zero": "a device, not a regular file", "fifo": "a FIFO, not a regular file",
                "sparse-file": "larger than"}[kind]
    assert "system.closureInfo:" in done.stderr and expected in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(("key", "value"), [("user", "4294967295"), ("group", "4294967295"),
                                            ("user", "99999999999999999999"), ("group", "04294967296")])
def test_a_numeric_owner_beyond_the_id_range_is_refused(key: str, value: str, fixture_spec: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """4294967295 ((uid_t) -1) went into the image as 0xFFFFFFFF; 99999999999999999999 failed after all the work
    with debugfs' "Couldn't parse" (exit 1)."""
    doc = spec_doc(fixture_spec)
    doc["contents"][0] = {**doc["contents"][0], "user": "0", "group": "0", key: value}
    status, err = validate(doc, tmp_path, capsys)
    assert status == 2, err
    assert f'$.contents[0].{key}: "{value}" is not allowed: a numeric id is 0 to 4294967294' in err, err


def test_the_largest_id_is_accepted(fixture_spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = spec_doc(fixture_spec)
    doc["contents"][0] = {**doc["contents"][0], "user": "4294967294", "group": "0004294967294"}
    status, err = validate(doc, tmp_path, capsys)
    assert status == 0, err
