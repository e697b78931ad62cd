"""One set of rules for both halves: builder/rules.json read by nix/args and by the spec loader.

The JSON Schema repeats the rules' enums and patterns for JSON Schema users: it must agree with them.
And one table of argument cases runs through Nix evaluation (makeDiskImage with tests/fake-nixpkgs.nix)
and through the Python loader (the same case as a spec document): both must give the same verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder import rules
from builder.errors import SpecError
from builder.spec import SCHEMA_PATH, load_spec_document
from tests.support.nixeval import ENTRY, REPO, evaluate, image_expr, nix_eval

pytestmark = pytest.mark.nix

SCHEMA = json.loads(SCHEMA_PATH.read_text())
RULES = json.loads((REPO / "builder" / "rules.json").read_text())


def anchored(pattern: str) -> str:
    """A rules pattern as the schema writes it: anchored, with no trailing newline let through."""
    return rf"^(?:{pattern})(?![\s\S])"


def test_schema_enums_are_the_rules() -> None:
    props = SCHEMA["properties"]
    assert props["partitionTableType"]["enum"] == [t["name"] for t in RULES["tables"]]
    assert props["fsType"]["enum"] == [f["name"] for f in RULES["fsTypes"]]
    assert props["format"]["enum"] == [f["name"] for f in RULES["formats"]]
    assert list(rules.tables()) == props["partitionTableType"]["enum"]


def test_schema_patterns_and_limits_are_the_rules() -> None:
    defs, pats, limits = SCHEMA["$defs"], RULES["patterns"], RULES["limits"]
    for name in ("guid", "owner", "iecSize", "derivationName", "fileName"):
        assert defs[name]["pattern"] == anchored(pats[name]), name
    clause = pats["chmodClause"]
    assert defs["rsyncChmod"]["pattern"] == anchored(f"{clause}(,{clause})*")
    assert SCHEMA["properties"]["diskSize"]["oneOf"][2]["pattern"] == anchored(pats["digits"])
    assert defs["owner"]["maxLength"] == limits["ownerBytes"]
    assert defs["derivationName"]["maxLength"] == defs["fileName"]["maxLength"] == limits["nameBytes"]
    mem = SCHEMA["properties"]["memSize"]
    assert (mem["minimum"], mem["maximum"]) == (limits["memSizeMinMiB"], limits["memSizeMaxMiB"])


def test_nix_reads_the_same_rules() -> None:
    done = nix_eval(f"let A = import {REPO}/nix/args; in {{ inherit (A) tableTypes fsTypes formats; }}")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got == {"tableTypes": list(rules.tables()), "fsTypes": list(rules.fs_types()),
                   "formats": list(rules.formats())}


def entry(**fields: Any) -> dict[str, Any]:
    """A contents entry of the spec, every field given."""
    return {"source": ENTRY, "target": "/x", "mode": None, "user": None, "group": None, **fields}


def nix_entry(**fields: str) -> str:
    """The same entry as a Nix attribute set."""
    attrs = {"source": ENTRY, "target": "/x", **fields}
    return "{ " + " ".join(f"{k} = {json.dumps(v)};" for k, v in attrs.items()) + " }"


LONG = 1099511627776  # 1 EiB in MiB, the largest ext4
# (id, Nix arguments, the same case as spec changes, accepted?)
CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("defaults", "{ }", {}, True),
    ("owner-32", f"{{ contents = [ {nix_entry(user='a' * 32, group='b')} ]; }}",
     {"contents": [entry(user="a" * 32, group="b")]}, True),
    ("owner-33", f"{{ contents = [ {nix_entry(user='a' * 33, group='b')} ]; }}",
     {"contents": [entry(user="a" * 33, group="b")]}, False),
    ("owner-numeric", f"{{ contents = [ {nix_entry(user='1234', group='5678')} ]; }}",
     {"contents": [entry(user="1234", group="5678")]}, True),
    ("owner-user-only", f"{{ contents = [ {nix_entry(user='root')} ]; }}",
     {"contents": [entry(user="root")]}, False),
    ("name-leading-dot", '{ name = ".image"; }', {"name": ".image"}, False),
    ("basename-leading-dot", '{ baseName = ".image"; }', {"baseName": ".image"}, True),
    ("name-201", f'{{ name = "{"n" * 201}"; }}', {"name": "n" * 201}, False),
    ("disk-1-eib", f"{{ diskSize = {LONG}; }}", {"diskSize": LONG}, True),
    ("disk-over-1-eib", f"{{ diskSize = {LONG + 1}; }}", {"diskSize": LONG + 1}, False),
    ("disk-digits", '{ diskSize = "102400"; }', {"diskSize": "102400"}, True),
    ("disk-digits-zero", '{ diskSize = "0"; }', {"diskSize": "0"}, False),
    ("disk-digits-over", f'{{ diskSize = "{LONG + 1}"; }}', {"diskSize": str(LONG + 1)}, False),
    ("disk-exponent", '{ diskSize = "1e3"; }', {"diskSize": "1e3"}, False),
    ("space-1-eib", '{ additionalSpace = "1E"; }', {"additionalSpace": "1E"}, True),
    ("space-1.5-eib", '{ additionalSpace = "1.5E"; }', {"additionalSpace": "1.5E"}, False),
    ("space-1025-pib", '{ additionalSpace = "1025P"; }', {"additionalSpace": "1025P"}, False),
    ("space-words", '{ additionalSpace = "lots"; }', {"additionalSpace": "lots"}, False),
    ("fs-ext3", '{ fsType = "ext3"; }', {"fsType": "ext3"}, True),
    ("fs-vfat", '{ fsType = "vfat"; }', {"fsType": "vfat"}, False),
    ("fs-zfs", '{ fsType = "zfs"; }', {"fsType": "zfs"}, False),
    ("fs-erofs-system", '{ fsType = "erofs"; }', {"fsType": "erofs"}, False),
    ("fs-squashfs-store", '{ fsType = "squashfs"; onlyNixStore = true; installBootLoader = false; }',
     {"fsType": "squashfs", "onlyNixStore": True, "installBootLoader": False, "rootFSUID": None}, True),
    ("format-compressed", '{ format = "qcow2-compressed"; }', {"format": "qcow2-compressed"}, True),
    ("format-iso", '{ format = "iso"; }', {"format": "iso"}, False),
    ("label-ext4-17", '{ label = "seventeen-chars-x"; }', {"label": "seventeen-chars-x"}, True),
    ("label-xfs-12", '{ fsType = "xfs"; label = "twelve-chars"; }', {"fsType": "xfs", "label": "twelve-chars"},
     True),
    ("label-xfs-13", '{ fsType = "xfs"; label = "thirteen-char"; }',
     {"fsType": "xfs", "label": "thirteen-char"}, False),
    ("label-del", '{ label = "a\x7fb"; }', {"label": "a\x7fb"}, False),  # DEL is a control character too
    ("label-tab", '{ label = "a\tb"; }', {"label": "a\tb"}, False),
    ("mem-0", "{ memSize = 0; }", {"memSize": 0}, False),
    ("mem-1", "{ memSize = 1; }", {"memSize": 1}, True),
    ("mem-over", "{ memSize = 1048577; }", {"memSize": 1048577}, False),
    ("mode-rsync", f"{{ contents = [ {nix_entry(mode='u+x')} ]; }}", {"contents": [entry(mode="u+x")]}, True),
    ("mode-bad", f"{{ contents = [ {nix_entry(mode='u+q')} ]; }}", {"contents": [entry(mode="u+q")]}, False),
    ("target-relative", f"{{ contents = [ {nix_entry(target='etc/x')} ]; }}",
     {"contents": [entry(target="etc/x")]}, True),
    ("target-root", f"{{ contents = [ {nix_entry(target='/')} ]; }}", {"contents": [entry(target="/")]}, False),
    ("target-escape", f"{{ contents = [ {nix_entry(target='/a/../../x')} ]; }}",
     {"contents": [entry(target="/a/../../x")]}, False),
    ("target-store", f"{{ contents = [ {nix_entry(target='/nix/store/x')} ]; }}",
     {"contents": [entry(target="/nix/store/x")]}, False),
    ("efi-vars-legacy", "{ touchEFIVars = true; efiFirmware = \"/fw/c\"; efiVariables = \"/fw/v\"; }",
     {"touchEFIVars": True, "efiFirmware": "/fw/c", "efiVariables": "/fw/v"}, False),
    ("efi-vars-efi", '{ partitionTableType = "efi"; touchEFIVars = true; efiFirmware = "/fw/c"; '
     'efiVariables = "/fw/v"; }',
     {"partitionTableType": "efi", "touchEFIVars": True, "efiFirmware": "/fw/c", "efiVariables": "/fw/v"}, True),
    ("store-only-contents", f"{{ onlyNixStore = true; installBootLoader = false; contents = [ {nix_entry()} ]; }}",
     {"onlyNixStore": True, "installBootLoader": False, "contents": [entry()]}, False),
    ("boot-7m-efi", '{ partitionTableType = "efi"; bootSize = "7M"; }',
     {"partitionTableType": "efi", "bootSize": "7M"}, False),
    ("boot-8m-efi", '{ partitionTableType = "efi"; bootSize = "8M"; }',
     {"partitionTableType": "efi", "bootSize": "8M"}, True),
    ("guid-bad", '{ rootGPUID = "not-a-guid"; }', {"rootGPUID": "not-a-guid"}, False),
    ("uuid-null-deterministic", "{ rootFSUID = null; }", {"rootFSUID": None}, False),
    ("uuid-null-not-deterministic", "{ rootFSUID = null; deterministic = false; }",
     {"rootFSUID": None, "deterministic": False}, True),
    ("share-root", "{ shareRootFilesystem = true; }", {"shareRootFilesystem": True}, True),
    ("share-root-string", '{ shareRootFilesystem = "yes"; }', {"shareRootFilesystem": "yes"}, False),
    ("share-root-int", "{ shareRootFilesystem = 1; }", {"shareRootFilesystem": 1}, False),
    ("share-root-null", "{ shareRootFilesystem = null; }", {"shareRootFilesystem": None}, False),
]


@pytest.fixture(scope="module")
def base_spec() -> dict[str, Any]:
    """The spec Nix writes for the default arguments (fake store paths): each case changes it."""
    spec: dict[str, Any] = evaluate("{ }")["spec"]
    return spec


@pytest.mark.parametrize(("nix_args", "changes", "accepted"),
                         [pytest.param(a, c, ok, id=i) for i, a, c, ok in CASES])
def test_nix_and_python_give_one_verdict(nix_args: str, changes: dict[str, Any], accepted: bool,
                                         base_spec: dict[str, Any], tmp_path: Path) -> None:
    nix = nix_eval(image_expr(nix_args))
    assert (nix.returncode == 0) == accepted, f"Nix: {nix.stderr[-1500:]}"
    if accepted:
        assert "error:" not in nix.stderr
    else:
        assert "makeDiskImage: " in nix.stderr, "refused with a message naming the argument"
    doc = {**base_spec, **changes}
    try:
        load_spec_document(doc)
        python_accepts = True
    except SpecError:
        python_accepts = False
    assert python_accepts == accepted, "the spec loader's verdict differs from Nix's"


FACTS = ("installBootLoader", "touchEFIVars", "onlyNixStore", "systemdBoot", "grub", "namedOwners")
VM_RULES = ("needsVM", "systemdBootOnHost", "grubOnHost")


def test_the_vm_is_decided_by_one_rule_both_sides_read() -> None:
    # rules.json vmStage is the only place the VM decision lives: nix/args and builder.rules evaluate it alike
    # on every combination of the facts.
    combos = [dict(zip(FACTS, (bool(n >> i & 1) for i in range(len(FACTS))), strict=True))
              for n in range(1 << len(FACTS))]
    rule_list = " ".join(json.dumps(rule) for rule in VM_RULES)
    expr = "let A = import {}/nix/args; in map (f: map (rule: A.vmStage rule f) [ " + rule_list + " ]) {}"
    done = nix_eval(expr.format(REPO, "(builtins.fromJSON " + json.dumps(json.dumps(combos)) + ")"))
    assert done.returncode == 0, done.stderr
    python = [[rules.vm_stage(rule, f) for rule in VM_RULES] for f in combos]
    assert json.loads(done.stdout) == python
    # The cases DESIGN §4 names: a store-only image never runs the VM; systemd-boot alone needs none;
    # touchEFIVars or owners by name always do (and then the system's own installer runs there).
    plain = dict.fromkeys(FACTS, False)
    assert not rules.vm_stage("needsVM", {**plain, "onlyNixStore": True, "touchEFIVars": True})
    assert not rules.vm_stage("needsVM", {**plain, "installBootLoader": True, "systemdBoot": True})
    assert not rules.vm_stage("needsVM", {**plain, "installBootLoader": True, "grub": True})
    assert rules.vm_stage("needsVM", {**plain, "installBootLoader": True})
    for loader, on_host in (("systemdBoot", "systemdBootOnHost"), ("grub", "grubOnHost")):
        for fact in ("touchEFIVars", "namedOwners"):
            both = {**plain, "installBootLoader": True, loader: True, fact: True}
            assert rules.vm_stage("needsVM", both) and not rules.vm_stage(on_host, both)


@pytest.mark.parametrize(("user", "group", "named"), [("0", "0", False), ("1000", "100", False),
                                                     ("root", "0", True), ("0", "wheel", True)])
def test_named_owners_are_judged_alike(user: str, group: str, named: bool) -> None:
    expr = (f"(import {REPO}/nix/args).namedOwners {{ contents = [ {{ user = {json.dumps(user)};"
            f" group = {json.dumps(group)}; }} ]; }}")
    done = nix_eval(expr)
    assert done.returncode == 0, done.stderr
    from builder.spec import Content

    assert json.loads(done.stdout) is named is Content(ENTRY, "/x", None, user, group).named_owner
