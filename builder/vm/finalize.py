"""The root-only step run inside the build VM: render templates/ into one shell script and run it."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jinja2

from ..disk.layout import mounts
from ..errors import BuildError
from ..log import step
from ..resources import template_dir
from ..spec import Spec

MAIN_TEMPLATE = "finalize.sh.j2"


class Quoted(str):
    """A value that went through the shell_quote filter; the only kind a template may print."""


def shell_quote(value: object) -> Quoted:
    """Quote one value for the shell (shlex.quote), so it is always data, never code."""
    return Quoted(shlex.quote(str(value)))


def _only_quoted(value: object) -> object:
    """Jinja2 finalize hook: refuse to print any value that was not shell-quoted."""
    if not isinstance(value, Quoted):
        raise jinja2.TemplateError(f"template printed an unquoted value {value!r}: pipe it through shell_quote")
    return value


def environment(search_path: Path | None = None) -> jinja2.Environment:
    """The jinja2 environment: StrictUndefined, shell_quote filter, and a check that every value is quoted."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search_path or template_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_only_quoted,
    )
    env.filters["shell_quote"] = shell_quote
    return env


def partition_device(device: str, number: int | None) -> str:
    """The block device of partition number (the device itself for a bare filesystem)."""
    return device if number is None else f"{device}{number}"


def context(spec: Spec, device: str) -> dict[str, Any]:
    """Every value the templates use, computed from the spec and the layout."""
    root, *fat = mounts(spec)
    return {
        "device": device,
        "device_name": device.rsplit("/", 1)[-1],
        "root_device": partition_device(device, root.number),
        "fat_mounts": [{"device": partition_device(device, m.number), "mountpoint": m.mountpoint} for m in fat],
        "touch_efi_vars": spec.touch_efi_vars,
        "enter_command": spec.enter_command,
        "install_boot_loader": spec.install_boot_loader,
        "link_devices": [d for d in spec.boot_devices if d not in (device, "nodev")],
        "named_owners": [
            {"owner": f"{c.user}:{c.group}", "target": c.target} for c in spec.contents if c.named_owner
        ],
        "fs_type": spec.fs_type,
        "ext_root": spec.ext_root,
        "deterministic": spec.deterministic,
        "root_fsuid": spec.root_fsuid,
        "epoch": spec.source_date_epoch,
        "epoch_ymdhms": time.strftime("%Y%m%d%H%M%S", time.gmtime(spec.source_date_epoch)),
    }


def render(spec: Spec, device: str) -> str:
    """The in-VM shell script for this spec, with the image at device."""
    templates = template_dir()
    if not (templates / MAIN_TEMPLATE).is_file():
        raise BuildError(f"the finalize template is missing: no {MAIN_TEMPLATE} in {templates} "
                         "(templates/ is package data, builder.templates; reinstall the builder)")
    return environment().get_template(MAIN_TEMPLATE).render(context(spec, device))


def finalize(spec: Spec, device: str, print_only: bool) -> int:
    """Print the in-VM script, or run it with bash and return its exit status."""
    script = render(spec, device)
    if print_only:
        sys.stdout.write(script)
        return 0
    with tempfile.NamedTemporaryFile("w", prefix="finalize-", suffix=".sh") as handle:
        handle.write(script)
        handle.flush()
        with step("finalize script"):
            return subprocess.run(["bash", handle.name], check=False).returncode
