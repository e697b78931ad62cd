"""The system's bootspec (`$toplevel/boot.json`, RFC 0125 `org.nixos.bootspec.v1`): read and check it.

NixOS writes the document in nixos/modules/system/activation/bootspec.nix (nixpkgs): under
`org.nixos.bootspec.v1` the `system`, `kernel`, `kernelParams`, `label`, optional `initrd` and
`initrdSecrets`, and, injected when the toplevel is built, `toplevel` and `init`; under
`org.nixos.specialisation.v1` one whole document per specialisation; extensions beside them, of which
systemd-boot's module adds `org.nixos.systemd-boot` (`sortKey`, optional `devicetree`). nixpkgs'
systemd-boot-builder.py (`bootspec_from_json`) reads exactly these fields; so does this module, so
that an image's boot entries come from the same document a later `nixos-rebuild` reads.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

BOOTSPEC_V1 = "org.nixos.bootspec.v1"
SPECIALISATION_V1 = "org.nixos.specialisation.v1"
SYSTEMD_BOOT_EXTENSION = "org.nixos.systemd-boot"
# systemd-boot-builder.py's default when the extension has no sortKey (older bootspecs).
DEFAULT_SORT_KEY = "nixos"


@dataclass(frozen=True)
class BootSpec:
    """One generation's boot facts (or a specialisation's), as systemd-boot-builder.py's BootSpec holds them."""

    system: str
    init: str
    kernel: str
    kernel_params: tuple[str, ...]
    label: str
    toplevel: str
    initrd: str | None
    initrd_secrets: str | None
    sort_key: str
    devicetree: str | None
    specialisations: tuple[tuple[str, BootSpec], ...]  # sorted by name, as jq --sort-keys writes them


def _field(doc: dict[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    """A string field of the document; UserError naming the field when it is missing or not a string."""
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        got = "missing" if key not in doc else f"{json.dumps(value)[:80]}, not a non-empty string"
        raise UserError(f"{where}.{key} is {got}")
    return value


def _store_path(value: str, where: str, store_dir: str) -> str:
    """A path the bootspec names, which must lie in the Nix store (the image holds nothing else to boot)."""
    prefix = store_dir.rstrip("/") + "/"
    if not value.startswith(prefix) or ".." in value.split("/"):
        raise UserError(f"{where} = {value!r} is not a path in {store_dir}")
    return value


def parse_bootspec(doc: Any, where: str, store_dir: str) -> BootSpec:
    """Check a parsed boot.json document (or a specialisation's) and return it typed."""
    if not isinstance(doc, dict) or not isinstance(doc.get(BOOTSPEC_V1), dict):
        raise UserError(f"{where} has no {BOOTSPEC_V1!r} object (not an RFC 0125 bootspec v1 document)")
    main: dict[str, Any] = doc[BOOTSPEC_V1]
    here = f"{where}.{BOOTSPEC_V1}"
    params = main.get("kernelParams")
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise UserError(f"{here}.kernelParams is {json.dumps(params)[:80]}, not a list of strings")
    paths = {}
    for key in ("init", "kernel", "toplevel"):
        value = _field(main, key, here)
        assert value is not None
        paths[key] = _store_path(value, f"{here}.{key}", store_dir)
    initrd = _field(main, "initrd", here, optional=True)
    secrets = _field(main, "initrdSecrets", here, optional=True)
    extension = doc.get(SYSTEMD_BOOT_EXTENSION) or {}
    if not isinstance(extension, dict):
        raise UserError(f"{where}.{SYSTEMD_BOOT_EXTENSION} is not an object")
    sort_key = extension.get("sortKey", DEFAULT_SORT_KEY)
    # boot.loader.systemd-boot.sortKey is a types.str: "" is allowed, and systemd-boot-builder.py writes
    # "sort-key " then, as entry_text does.
    if not isinstance(sort_key, str):
        raise UserError(f"{where}.{SYSTEMD_BOOT_EXTENSION}.sortKey is {json.dumps(sort_key)[:80]}, not a string")
    devicetree = _field(extension, "devicetree", f"{where}.{SYSTEMD_BOOT_EXTENSION}", optional=True)
    children = doc.get(SPECIALISATION_V1) or {}
    if not isinstance(children, dict):
        raise UserError(f"{where}.{SPECIALISATION_V1} is not an object")
    specialisations = tuple(
        (name, parse_bootspec(child, f"{where}.{SPECIALISATION_V1}.{name}", store_dir))
        for name, child in sorted(children.items())
    )
    for name, _ in specialisations:
        if not name or "/" in name or any(c.isspace() for c in name):
            raise UserError(f"{where}.{SPECIALISATION_V1}: {name!r} cannot name a boot entry file")
    label = _field(main, "label", here)
    system = _field(main, "system", here)
    assert label is not None and system is not None
    return BootSpec(
        system=system,
        init=paths["init"],
        kernel=paths["kernel"],
        kernel_params=tuple(params),
        label=label,
        toplevel=paths["toplevel"],
        initrd=None if initrd is None else _store_path(initrd, f"{here}.initrd", store_dir),
        initrd_secrets=secrets,
        sort_key=sort_key,
        devicetree=None if devicetree is None else _store_path(devicetree, f"{where}.devicetree", store_dir),
        specialisations=specialisations,
    )


def read_bootspec(toplevel: str, store_dir: str) -> BootSpec:
    """Read `<toplevel>/boot.json`, which NixOS writes into every system since 23.05 (boot.bootspec.enable)."""
    path = Path(toplevel) / "boot.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: the system has no bootspec (RFC 0125), so systemd-boot cannot "
                        "be installed without the build VM (NixOS writes one unless boot.bootspec.enable = false)"
                        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the system's bootspec {str(path)!r}: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the system's bootspec {str(path)!r} is not JSON: {exc}") from None
    spec = parse_bootspec(doc, str(path), store_dir)
    if posixpath.normpath(spec.toplevel) != posixpath.normpath(toplevel):
        raise UserError(f"{path}: {BOOTSPEC_V1}.toplevel = {spec.toplevel!r} is not the system being installed "
                        f"({toplevel!r})")
    return spec
