"""A quick yes to "does this spec satisfy spec.schema.json?", so a valid spec never imports jsonschema.

Importing jsonschema costs about 0.1 s of CPU, which is most of the builder's own fixed cost on a small
closure (issue 15). This checks the keywords the schema uses, each exactly as the builder's JSON Schema
2020-12 validator does (its "integer" refuses floats), and says "valid" only when it is sure; anything
else (an unknown keyword, a number compared with a number of the other type, a failed check) answers
False and the caller asks jsonschema itself, which also words the errors. Exact, not merely stricter,
because oneOf counts the branches that say yes. So the answer may be a false "no", never a false "yes"
(tests/test_schema_fast.py compares both on every spec the tests have).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
    "object": (dict,), "array": (list,),
}
_ANNOTATIONS = {"$schema", "$id", "title", "description", "errorMessage", "$defs", "default"}


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    """A schema pattern, compiled once (jsonschema also matches with re.search)."""
    return re.compile(pattern)


def _is_type(value: Any, name: str) -> bool:
    """JSON type membership; bool is not a number here, and 1.0 is not an integer (stricter than the spec)."""
    kinds = _TYPES.get(name)
    if kinds is None:
        raise _Unsure
    if isinstance(value, bool) and name != "boolean":
        return False
    return type(value) in kinds


def _same(a: Any, b: Any) -> bool:
    """enum/const equality, exactly as jsonschema's: True is not 1, and 1.0 == 1 is left to jsonschema.

    Exact, not merely stricter, because a false "no" inside oneOf could turn two matches into one.
    """
    numbers = (int, float)
    if type(a) in numbers and type(b) in numbers and type(a) is not type(b):
        raise _Unsure
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


class _Unsure(Exception):
    """A keyword or value this checker does not judge: the caller asks jsonschema."""


def _valid(value: Any, schema: Any, root: dict[str, Any]) -> bool:
    """Whether value satisfies schema (a dict or a boolean schema)."""
    if schema is True:
        return True
    if schema is False or not isinstance(schema, dict):
        return False
    for key, want in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            if not isinstance(want, str) or not want.startswith("#/"):
                raise _Unsure
            target: Any = root
            for part in want[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            ok = _valid(value, target, root)
        elif key == "type":
            ok = any(_is_type(value, t) for t in ([want] if isinstance(want, str) else want))
        elif key == "enum":
            ok = any(_same(value, w) for w in want)
        elif key == "const":
            ok = _same(value, want)
        elif key == "pattern":
            ok = not isinstance(value, str) or _regex(want).search(value) is not None
        elif key == "minLength":
            ok = not isinstance(value, str) or len(value) >= want
        elif key == "maxLength":
            ok = not isinstance(value, str) or len(value) <= want
        elif key == "minimum":
            ok = not _is_type(value, "number") or value >= want
        elif key == "maximum":
            ok = not _is_type(value, "number") or value <= want
        elif key == "required":
            ok = not isinstance(value, dict) or all(k in value for k in want)
        elif key == "properties":
            ok = not isinstance(value, dict) or all(_valid(value[k], s, root) for k, s in want.items() if k in value)
        elif key == "additionalProperties":
            known = schema.get("properties", {})
            ok = not isinstance(value, dict) or all(_valid(v, want, root) for k, v in value.items() if k not in known)
        elif key == "propertyNames":
            ok = not isinstance(value, dict) or all(_valid(k, want, root) for k in value)
        elif key == "items":
            ok = not isinstance(value, list) or all(_valid(v, want, root) for v in value)
        elif key == "oneOf":  # sound only because every other keyword's "no" is exact, as jsonschema's
            ok = sum(1 for s in want if _valid(value, s, root)) == 1
        else:
            raise _Unsure
        if not ok:
            return False
    return True


def surely_valid(doc: Any, schema: dict[str, Any]) -> bool:
    """True only when doc certainly satisfies schema; False means "ask jsonschema"."""
    try:
        return _valid(doc, schema, schema)
    except (_Unsure, KeyError, TypeError, re.error, RecursionError):
        return False
