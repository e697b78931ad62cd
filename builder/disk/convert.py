"""Write the finished raw image as `$out/<baseName>.<ext>` in the requested format, plus the Hydra product line.

raw is moved (renamed, or copied sparse-aware across filesystems); qcow2-compressed is written by
builder.disk.qcow2 (clusters deflated on every CPU, written in order: reproducible, unlike
`qemu-img convert -c -W`, and faster than `qemu-img convert -c`; `MDI_QCOW2_WRITER=qemu-img` in the
environment goes back to `qemu-img convert -c`); every other format goes through
`qemu-img convert -f raw -O <format>` (`-o force_size=on` for vpc so the virtual size is the raw size
exactly, not a CHS rounding). The image is written into the output transaction (builder/output.py: a
private directory inside `out`, with its final file name, which vmdk embeds) and renamed into place with
the product line, so a failure leaves no partial image.

With `deterministic`, the identifiers qemu-img draws at random (vdi, vpc, vmdk, vhdx) are replaced by
spec-derived ones (builder.image_ids), so rebuilding the same spec gives the same bytes.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ..errors import BuildError, UserError
from ..log import step
from ..output import PRODUCTS, Output, output_dir
from ..process import run
from ..spec import Spec
from .image_ids import fix_identifiers
from .qcow2 import write_compressed_qcow2


def qemu_img_args(spec: Spec) -> list[str]:
    """The `qemu-img convert` arguments that select the output format for this spec (not raw; qcow2-compressed
    only with MDI_QCOW2_WRITER=qemu-img)."""
    if spec.format == "qcow2-compressed":
        return ["-O", "qcow2", "-c"]
    if spec.format == "vpc":
        return ["-O", "vpc", "-o", "force_size=on"]
    return ["-O", spec.format]


def _run_qemu_img(args: list[str]) -> str:
    """Run qemu-img (builder/process.py); its stdout."""
    return run(["qemu-img", *args], missing="needed to write formats other than raw").stdout


def virtual_size(path: Path, fmt: str) -> int:
    """The virtual size in bytes that qemu-img reads from an image."""
    return int(json.loads(_run_qemu_img(["info", "--output=json", "-f", fmt, str(path)]))["virtual-size"])


def _move_raw(raw: Path, dest: Path) -> None:
    """Move raw to dest: rename when on one filesystem, else copy keeping holes and remove the source."""
    try:
        os.replace(raw, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise BuildError(f"cannot move {raw} to {dest}: {exc}") from None
    run(["cp", "--sparse=always", "--", str(raw), str(dest)], f"cannot copy {raw} to {dest}")
    raw.unlink()


def qcow2_writer() -> str:
    """MDI_QCOW2_WRITER, checked: who writes qcow2-compressed, the builder (default) or qemu-img convert -c."""
    writer = os.environ.get("MDI_QCOW2_WRITER", "builder")
    if writer not in ("builder", "qemu-img"):
        raise UserError(f"MDI_QCOW2_WRITER={writer!r}: expected 'builder' (the default) or 'qemu-img'")
    return writer


def _write_image(spec: Spec, raw: Path, dest: Path) -> None:
    """Write dest (a temporary name) from raw in spec.format, checked and with identifiers pinned."""
    if spec.format == "raw":
        _move_raw(raw, dest)
        return
    if spec.format == "qcow2-compressed":
        if qcow2_writer() == "builder":
            write_compressed_qcow2(raw, dest)
            return
    _run_qemu_img(["convert", "-f", "raw", *qemu_img_args(spec), str(raw), str(dest)])
    if spec.format == "vpc":
        want, got = raw.stat().st_size, virtual_size(dest, "vpc")
        if want != got:
            raise BuildError(f"vpc image has virtual size {got} bytes, the raw image has {want}")
    if spec.deterministic:
        fix_identifiers(spec, dest)


def convert_into(spec: Spec, raw: Path, output: Output) -> Path:
    """Write <baseName>.<ext> and the Hydra product line into the output transaction and install them there.

    Returns the image's final path. The image is staged under its final file name (vmdk embeds it).
    """
    if not raw.is_file():
        raise UserError(f"--image {str(raw)!r}: no such raw image file")
    final = output.out / spec.image_file_name
    with step(f"convert to {spec.format} as {final.name}"):
        if not (spec.format == "raw" and raw.absolute() == final):  # else already in place
            _write_image(spec, raw, output.stage(spec.image_file_name))
        output.stage(PRODUCTS).write_text(f"file {spec.hydra_format}-image {final}\n")
        output.install()
    return final


def convert(spec: Spec, raw: Path, out: Path) -> Path:
    """Write out/<spec.image_file_name> from the raw image and the Hydra product line (whole); return its path."""
    with output_dir(out) as output:
        return convert_into(spec, raw, output)
