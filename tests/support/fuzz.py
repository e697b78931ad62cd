"""Property-based inputs for the spec loader and prepare: random JSON, mutations of a valid spec, message shapes."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

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
    "\udcff", "a\nb", "L" * 300, "/" + "d/" * 2100, "x\n", "x\0", "\x1b[31m", 200.0, 1e308,
]) | st.integers(min_value=-3, max_value=2**63) | st.booleans() | st.none() | st.just([]) | st.just({})


def key_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += key_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += key_paths(v, (*prefix, i))
    return out


def mutate(data: st.DataObject, doc: Any) -> None:
    """One to three random changes to doc in place: replace a value (random or plausible), delete or add a key."""
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = key_paths(doc)
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


def message_problems(status: int, stderr: str) -> list[str]:
    """What is wrong with how a run ended: a status other than 0/1/2, a traceback, or a message not of one line.

    A message is one line `error: ...` or `build failed: ...`, or `error: invalid spec:` followed by one
    line per problem (`  - $.path: ...`); the step log and warnings (`[makeDiskImage] ...`) do not count.
    """
    wrong = []
    if status not in (0, 1, 2):
        wrong.append(f"exit status {status}")
    if "Traceback" in stderr or "Exception ignored" in stderr:
        wrong.append("a traceback")
    lines = [line for line in stderr.splitlines() if not line.startswith("[makeDiskImage] ")]
    if status == 0 and lines:
        wrong.append(f"output besides the step log: {lines[:3]}")
    if status in (1, 2):
        if not lines or not lines[0].startswith(("error: ", "build failed: ")):
            wrong.append(f"no error line: {lines[:3]}")
        elif lines[0] == "error: invalid spec:":
            wrong += [f"not one line per problem: {line!r}" for line in lines[1:] if not line.startswith("  - $")]
        elif len(lines) != 1:
            wrong.append(f"a message of {len(lines)} lines: {lines[:4]}")
    return wrong
