"""Load the spec JSON, validate all of it (schema, then cross-field rules), and expose it typed."""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import chmod, rules
from .boot.grub_config import GrubConfig, grub_problems, parse_grub
from .boot.systemd_boot_config import SystemdBootConfig, parse_systemd_boot, systemd_boot_problems
from .errors import SpecError
from .inputfile import open_regular, read_at_most
from .log import warn
from .resources import data_file
from .schema_fast import surely_valid
from .units import MiB, parse_iec, round_to_nearest

if TYPE_CHECKING:
    import jsonschema

SCHEMA_PATH = data_file("spec.schema.json")
# Bounds of the JSON document itself, far beyond any real spec: a spec file of at most 16 MiB (`validate
# /dev/zero` must not read forever), objects and arrays nested at most 32 deep (a real spec: 5), numbers of
# at most 20 digits (the largest allowed value, 1 EiB in MiB, has 13).
MAX_SPEC_BYTES = 16 * MiB
# The largest uid or gid: ids are 32-bit and (uid_t) -1 means "no change" to chown(2) (and so to debugfs' sif).
MAX_ID = 4294967294
MAX_DEPTH = 32
MAX_DIGITS = 20
# Largest disk, boot end or additional space: 1 EiB, the largest ext4 (4 KiB blocks); beyond it sizes overflow.
MAX_IMAGE_BYTES = rules.limit("maxImageMiB") * MiB
WRITABLE_CHOICES = ", ".join(n for n, f in rules.fs_types().items() if not f.read_only)
FAT_ROOT = ("$.fsType: \"vfat\" is not allowed for the root filesystem: FAT has no owners, permission bits, "
            f"symlinks or hard links, which a Nix store and a NixOS root need (use {WRITABLE_CHOICES}; "
            "erofs or squashfs with onlyNixStore = true)")


@dataclass(frozen=True)
class Content:
    """One `contents` entry: a source placed at target in the image."""

    source: str
    target: str
    mode: chmod.ChmodRules | None  # rsync --chmod rules, applied as nixpkgs' rsync -a --chmod applies them
    user: str | None
    group: str | None

    @property
    def is_glob(self) -> bool:
        """Whether source holds a `*`, which copies every match into the target directory."""
        return "*" in self.source

    @property
    def numeric_owner(self) -> tuple[int, int] | None:
        """(uid, gid) when both are numbers, applied in prepare; names wait for the VM."""
        if (self.user is not None and self.group is not None and rules.matches("numericOwner", self.user)
                and rules.matches("numericOwner", self.group)):
            return int(self.user), int(self.group)
        return None

    @property
    def named_owner(self) -> bool:
        """Whether the owner must be resolved by name inside the image (finalize)."""
        return self.user is not None and self.numeric_owner is None


@dataclass(frozen=True)
class Spec:
    """The validated build spec; field names follow make-disk-image.nix in snake_case."""

    raw: dict[str, Any]
    name: str
    base_name: str
    format: str
    partition_table_type: str
    fs_type: str
    label: str
    disk_size: int | None  # bytes; None means "auto"
    additional_space: int  # bytes
    boot_partition_end: int  # bytes: where the boot partition ends, boot_end(bootSize), as nixpkgs rounds it
    contents: tuple[Content, ...]
    install_boot_loader: bool
    touch_efi_vars: bool
    efi_firmware: str | None
    efi_variables: str | None
    config_file: str | None
    post_vm: str
    mem_size: int
    only_nix_store: bool
    deterministic: bool
    root_gpuid: str
    root_fsuid: str | None
    copy_channel: bool
    toplevel: str
    closure_info: str
    channel: str | None
    additional_paths: tuple[str, ...]
    store_dir: str
    grub_devices: tuple[str, ...]
    source_date_epoch: int
    enter_command: str
    limine_bios_device: str | None = None
    warnings: tuple[str, ...] = ()
    # bootLoader.systemdBoot: systemd-boot's options when the system boots with it (boot/systemd_boot_config.py).
    systemd_boot: SystemdBootConfig | None = None
    # bootLoader.grub: GRUB's options when prepare installs it without the VM (boot/grub_config.py).
    grub: GrubConfig | None = None
    # The root filesystem is sized from its contents alone, so one build serves every layout (fs/shared.py).
    share_root_filesystem: bool = False

    @property
    def boot_devices(self) -> tuple[str, ...]:
        """The machine's boot disks the bootloader installs to (GRUB's devices, Limine's BIOS device)."""
        limine = () if self.limine_bios_device is None else (self.limine_bios_device,)
        return (*self.grub_devices, *limine)

    @property
    def ext_root(self) -> bool:
        """Whether the root is ext2/3/4, made in place by mke2fs -d (the others are built apart and placed)."""
        return rules.fs_types()[self.fs_type].family == "ext"

    @property
    def vm_facts(self) -> dict[str, bool]:
        """The facts builder/rules.json's vmStage rules decide the VM on (nix/args reads the same rules)."""
        return {"installBootLoader": self.install_boot_loader, "touchEFIVars": self.touch_efi_vars,
                "onlyNixStore": self.only_nix_store, "systemdBoot": self.systemd_boot is not None,
                "grub": self.grub is not None, "namedOwners": any(c.named_owner for c in self.contents)}

    @property
    def installs_systemd_boot(self) -> bool:
        """Whether prepare installs systemd-boot from the bootspec (builder/boot/) instead of the VM.

        Only when nothing else needs the VM: with owners by name or EFI variables the VM runs anyway, and
        there the system's own installer does it, as in nixpkgs (rules.json vmStage.systemdBootOnHost).
        """
        return rules.vm_stage("systemdBootOnHost", self.vm_facts)

    @property
    def installs_grub(self) -> bool:
        """Whether prepare installs GRUB (builder/boot/grub.py) instead of the VM (as installs_systemd_boot)."""
        return rules.vm_stage("grubOnHost", self.vm_facts)

    @property
    def bootloader_dirs(self) -> tuple[str, ...]:
        """Image directories prepare makes for the bootloader it installs on the host: /boot for GRUB, the ESP's
        and XBOOTLDR's mount points for systemd-boot. Contents may go below them, never be or hold them."""
        dirs: list[str] = []
        if self.installs_grub:
            dirs.append("/boot")
        if self.installs_systemd_boot and self.systemd_boot is not None:
            sd = self.systemd_boot
            dirs += [image_target(p) for p in (sd.efi_sys_mount_point, sd.xbootldr_mount_point) if p is not None]
        return tuple(dirs)

    @property
    def needs_vm(self) -> bool:
        """Whether finalize must run as root in a VM: bootloader install, owners by name, EFI vars (vmStage.needsVM)."""
        return rules.vm_stage("needsVM", self.vm_facts)

    @property
    def image_file_name(self) -> str:
        """`<baseName>.<ext>` as nixpkgs names the output file."""
        return f"{self.base_name}.{rules.formats()[self.format].extension}"

    @property
    def hydra_format(self) -> str:
        """The format word of the hydra-build-products line (qcow2 for qcow2-compressed)."""
        return rules.formats()[self.format].hydra


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _path_str(path: Any) -> str:
    """Render a JSON path as $.a.b[0]; a key that is not a plain name as ["..."] (a newline cannot split the line)."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(str(part)):
            out += f".{part}"
        else:
            out += f"[{json.dumps(_shown(str(part), 40))}]"
    return out


class _Refused:
    """A JSON value refused wherever it stands (a huge number, NaN): kept in place so its path can be named."""

    def __init__(self, why: str) -> None:
        self.why = why


class _DuplicateKeys(dict[str, Any]):
    """A JSON object in which some key was given more than once: {key: times} in `repeated`."""

    repeated: dict[str, int]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object hook: a dict, remembering keys given twice (json.loads would keep the last silently)."""
    out: dict[str, Any] = dict(pairs)
    if len(out) == len(pairs):
        return out
    dup = _DuplicateKeys(out)
    dup.repeated = {}
    for key, _ in pairs:
        dup.repeated[key] = dup.repeated.get(key, 0) + 1
    dup.repeated = {k: n for k, n in dup.repeated.items() if n > 1}
    return dup


def _integer(text: str) -> int | _Refused:
    """json.loads' integer hook: no number of more than MAX_DIGITS digits (int() refuses 4300, and none fits)."""
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        return _Refused(f"a number of {digits} digits is not allowed (at most {MAX_DIGITS})")
    return int(text)


def _float(text: str) -> float | _Refused:
    """json.loads' float hook: finite values only (1e400 would be infinity)."""
    value = float(text)
    if not math.isfinite(value):
        return _Refused(f"{_shown(text)} is not allowed (out of range)")
    return value


def _constant(name: str) -> _Refused:
    """json.loads' hook for NaN and Infinity, which Python accepts and JSON does not have."""
    return _Refused(f"{name} is not allowed (not a JSON number)")


def _shown(text: str, width: int = 60) -> str:
    """A value as a message shows it: at most width characters, with ... when cut."""
    return text if len(text) <= width else text[:width] + "..."


def _string_problem(text: str) -> str | None:
    """Why a string (value or key) cannot appear in a spec at all, or None."""
    if "\0" in text:
        return "contains a NUL byte, which no path, name, label or command can hold"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (an unpaired surrogate escape)"
    return None


def _shape_problems(doc: Any) -> list[str]:
    """What no field allows, wherever it stands: refused numbers, duplicate keys, NUL, nesting beyond MAX_DEPTH.

    Walks the document without recursion (a document nested thousands deep must not exhaust the stack).
    """
    problems: list[str] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:
        path, node = stack.pop()
        where = _path_str(path)
        if len(path) > MAX_DEPTH:
            problems.append(f"{_shown(where, 120)}: nested more than {MAX_DEPTH} levels deep (not a spec)")
            continue
        if isinstance(node, _Refused):
            problems.append(f"{where}: {node.why}")
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int) and abs(node) >= 10 ** MAX_DIGITS:
            problems.append(f"{where}: a number of more than {MAX_DIGITS} digits is not allowed")
        elif isinstance(node, float) and not math.isfinite(node):
            problems.append(f"{where}: {node} is not allowed (not a JSON number)")
        elif isinstance(node, str):
            why = _string_problem(node)
            if why:
                problems.append(f"{where}: {json.dumps(_shown(node))} {why}")
        elif isinstance(node, dict):
            for key, times in getattr(node, "repeated", {}).items():
                problems.append(f"{_path_str((*path, key))}: the key {json.dumps(key)} is given {times} times "
                                "(a JSON object names each key once)")
            for key, value in node.items():
                why = _string_problem(key) if isinstance(key, str) else "is not a string"
                if why:
                    problems.append(f"{where}: the key {json.dumps(_shown(str(key)))} {why}")
                stack.append(((*path, key), value))
        elif isinstance(node, list):
            stack.extend(((*path, i), value) for i, value in enumerate(node))
    return sorted(problems)


def _is_integer(checker: Any, instance: Any) -> bool:
    """JSON Schema's "integer" without floats: 200.0 is not an integer in a spec (Nix never writes one)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _validator_class() -> Any:
    """jsonschema's 2020-12 validator with that integer rule; imported only when a spec has errors to word."""
    import jsonschema

    return jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft202012Validator,
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
    )


def _branch_errors(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors to report for err: for a value that is not null in a "null or X" choice, X's own errors.

    "oneOf: null, or a section" would otherwise report the whole section and "is not of type 'null'"
    instead of the one field inside it that is wrong.
    """
    branches = err.validator_value
    if (err.validator in ("oneOf", "anyOf") and err.instance is not None and err.context
            and isinstance(branches, list) and len(branches) == 2):
        nulls = [i for i, b in enumerate(branches) if b == {"type": "null"}]
        if nulls:
            inner = [c for c in err.context if c.relative_schema_path and c.relative_schema_path[0] != nulls[0]]
            if inner:
                return [leaf for c in inner for leaf in _branch_errors(c)]
    return [err]


def _schema_problems(doc: Any) -> list[str]:
    """Every schema violation, each as 'JSON path: value: what is allowed'."""
    schema = json.loads(SCHEMA_PATH.read_text())
    if surely_valid(doc, schema):  # the usual case, without importing jsonschema (builder/schema_fast.py)
        return []
    validator = _validator_class()(schema)
    problems = []
    errors = [leaf for err in validator.iter_errors(doc) for leaf in _branch_errors(err)]
    for err in sorted(errors, key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        where = _path_str(err.absolute_path)
        if "propertyNames" in err.schema_path:  # a key of a free-form object (extraFiles, extraEntries)
            problems.append(f"{where}: the key {json.dumps(_shown(str(err.instance)))} is not allowed "
                            f"({err.message[:300]})")
            continue
        if where == "$.fsType" and err.instance == "vfat":
            problems.append(FAT_ROOT)
            continue
        custom = [e.schema["errorMessage"] for e in [err, *(err.context or [])]
                  if isinstance(e.schema, dict) and "errorMessage" in e.schema and e.validator in ("pattern", "type")]
        if custom:  # the schema says in words what is allowed (e.g. rsyncChmod): better than its regex
            problems.append(f"{where}: {json.dumps(err.instance)[:200]} is not {custom[0]}")
        elif err.validator in ("oneOf", "anyOf") and err.context:
            allowed = "; ".join(sorted({c.message for c in err.context}))
            problems.append(f"{where}: {json.dumps(err.instance)[:200]} is not allowed ({allowed})")
        elif err.validator == "additionalProperties":
            problems.append(f"{where}: {err.message}")
        elif err.validator == "required":
            problems.append(f"{where}: {err.message}")
        elif err.validator in ("maxLength", "minLength") and isinstance(err.instance, str):
            # The value itself may be kilobytes long: show its start and the limit, not a truncated message.
            bound = "at most" if err.validator == "maxLength" else "at least"
            problems.append(f"{where}: {json.dumps(err.instance[:60])}{'...' if len(err.instance) > 60 else ''} "
                            f"is {len(err.instance)} characters long (allowed: {bound} {err.validator_value})")
        else:
            problems.append(f"{where}: {json.dumps(err.instance)[:200]} is not allowed ({err.message[:300]})")
    return problems


def _target_problem(target: str) -> str | None:
    """Why a contents target cannot be used, or None: it must stay inside the image root."""
    parts = target.split("/")
    if ".." in parts:
        return "contains '..', which would leave the image root"
    if image_target(target) == "/":
        return "is the image root itself"
    if "\0" in target:
        return "contains a NUL byte"
    if any(len(p.encode()) > 255 for p in parts):
        return "has a path component longer than 255 bytes"
    return None


def _cross_field_problems(doc: dict[str, Any]) -> list[str]:
    """The rules of make-disk-image.nix's asserts and what the builder needs beyond the schema."""
    problems: list[str] = []
    table = doc["partitionTableType"]
    only_store = doc["onlyNixStore"]
    store_dir = doc["system"]["storeDir"]
    store_ok = store_dir_problem(store_dir) is None
    if not store_ok:
        problems.append(f"$.system.storeDir: {json.dumps(_shown(store_dir))} is not allowed: "
                        f"{store_dir_problem(store_dir)}")

    fs = rules.fs_types()[doc["fsType"]]
    label_bytes = len(doc["label"].encode("utf-8", "surrogatepass"))
    if fs.label_bytes is not None and label_bytes > fs.label_bytes and not fs.label_truncated:
        problems.append(f"$.label: {json.dumps(doc['label'], ensure_ascii=False)} is not allowed with "
                        f"fsType = {fs.name!r}: it is {label_bytes} bytes in UTF-8, at most {fs.label_bytes} fit")
    if fs.read_only and not only_store:
        problems.append(
            f"$.fsType: {fs.name!r} is read-only and allowed only with onlyNixStore = true (a system root must be "
            f"writable for activation and the bootloader; use {WRITABLE_CHOICES})"
        )
    if fs.uuid and doc["deterministic"] and doc["rootFSUID"] is None:
        problems.append(
            f"$.rootFSUID: null is not allowed with deterministic = true and fsType = \"{fs.name}\" (give a UUID)"
        )
    problems += systemd_boot_problems(doc)
    problems += grub_problems(doc)
    efi_tables = [name for name, t in rules.tables().items() if t.efi_variables]
    if doc["touchEFIVars"] and table not in efi_tables:
        problems.append(
            f"$.touchEFIVars: true is not allowed with partitionTableType = {table!r} "
            f"(allowed with: {', '.join(efi_tables)})"
        )
    if doc["touchEFIVars"] and (doc["efiVariables"] is None or doc["efiFirmware"] is None):
        problems.append("$.efiVariables: touchEFIVars = true needs efiFirmware and efiVariables (OVMF files)")
    if only_store:
        if doc["contents"]:
            problems.append("$.contents: must be [] with onlyNixStore = true (the image holds only the store)")
        if doc["configFile"] is not None:
            problems.append("$.configFile: must be null with onlyNixStore = true")
        if doc["installBootLoader"]:
            problems.append(
                "$.installBootLoader: must be false with onlyNixStore = true (pass installBootLoader = false)"
            )
    if doc["copyChannel"] and doc["system"]["channel"] is None and not only_store:
        problems.append("$.system.channel: null is not allowed with copyChannel = true (the channel store path)")
    if not doc["copyChannel"] and doc["system"]["channel"] is not None:
        problems.append("$.system.channel: must be null with copyChannel = false")

    for key in ("additionalSpace", "bootSize"):
        try:
            if parse_iec(doc[key]) > MAX_IMAGE_BYTES:
                problems.append(f"$.{key}: {doc[key]!r} is not allowed: more than 1 EiB, the largest ext4")
        except ValueError as exc:
            problems.append(f"$.{key}: {exc}")
    fixed_mib = disk_mib(doc["diskSize"])
    if fixed_mib is not None and fixed_mib * MiB > MAX_IMAGE_BYTES:
        problems.append(f"$.diskSize: {doc['diskSize']} is not allowed: more than 1 EiB (1099511627776 MiB), "
                        "the largest ext4")
    minimum = rules.tables()[table].boot_start
    if minimum is not None:
        try:
            end: int | None = boot_end(doc["bootSize"])
        except ValueError:
            end = None
        if end is not None and end <= minimum:
            problems.append(
                f"$.bootSize: {doc['bootSize']!r} is not allowed with partitionTableType = {table!r}: it is the "
                f"END offset of the boot partition (rounded as nixpkgs does, to {end // MiB} MiB), which starts "
                f"at {minimum // MiB} MiB (give more than that, e.g. \"256M\")"
            )
        disk = disk_mib(doc["diskSize"])
        if end is not None and disk is not None and disk * MiB <= end:
            problems.append(
                f"$.bootSize: {doc['bootSize']!r} does not fit in diskSize = {disk} MiB "
                "(the root partition starts after it)"
            )

    seen: dict[str, int] = {}
    for i, entry in enumerate(doc["contents"]):
        if (entry["user"] is None) != (entry["group"] is None):
            problems.append(f"$.contents[{i}]: user and group must both be set or both be null "
                            f"(user = {json.dumps(entry['user'])}, group = {json.dumps(entry['group'])})")
        for key in ("user", "group"):
            value = entry[key]
            if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) > MAX_ID:
                problems.append(f"$.contents[{i}].{key}: {json.dumps(value)} is not allowed: a numeric id is 0 to "
                                f"{MAX_ID} ({MAX_ID + 1} is (uid_t) -1, which chown(2) reads as \"leave unchanged\")")
        why = _target_problem(entry["target"])
        norm = image_target(entry["target"])
        store = store_dir
        if store_ok and not why and (norm == store or norm.startswith(store + "/") or store.startswith(norm + "/")):
            why = f"it is or holds {store}, which the builder fills with the closure (use additionalPaths)"
        if why:
            problems.append(f"$.contents[{i}].target: {json.dumps(entry['target'])} is not allowed: {why}")
        if norm in seen:
            problems.append(f"$.contents[{i}].target: {json.dumps(entry['target'])} is a duplicate of "
                            f"$.contents[{seen[norm]}].target")
        else:
            seen[norm] = i
    return problems


def store_dir_problem(store_dir: str) -> str | None:
    """Why storeDir cannot be the store's directory, or None: absolute, normalized, not /, no control characters.

    Every registered path must be a direct child of it; "/" would make any host directory a "store path".
    """
    if any(ord(c) < 0x20 or c == "\x7f" for c in store_dir):
        return "it contains a control character"
    if store_dir == "/":
        return "the root directory cannot be the store (give builtins.storeDir, normally \"/nix/store\")"
    if posixpath.normpath(store_dir) != store_dir or store_dir.startswith("//"):
        return (f"it must be an absolute, normalized path (no trailing, doubled or leading double '/', '.' or '..'; "
                f"e.g. {json.dumps(posixpath.normpath('/' + store_dir.lstrip('/')))})")
    return None


def disk_mib(value: Any) -> int | None:
    """diskSize in MiB: an int, or a string of digits as nixpkgs' `truncate -s ${diskSize}M` takes it; None for auto."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def image_target(target: str) -> str:
    """A contents target as an absolute, normalized image path; nixpkgs copies to $root/$target, so
    a relative target is placed under / ("boot/memtest.bin" -> "/boot/memtest.bin")."""
    return posixpath.normpath("/" + target.lstrip("/")) if target.strip("/") else "/"


def _warnings(doc: dict[str, Any]) -> list[str]:
    """What nixpkgs accepts but does surprisingly: the builder does the same and says so."""
    out: list[str] = []
    fs, label = rules.fs_types()[doc["fsType"]], doc["label"]
    if truncated_label(fs.name, label) != label:
        out.append(f"label = {json.dumps(label, ensure_ascii=False)} is longer than the {fs.label_bytes} bytes "
                   f"{fs.name} stores; it is truncated to "
                   f"{json.dumps(truncated_label(fs.name, label), ensure_ascii=False)}, as mke2fs does")
    warn_below = rules.limit("memSizeWarningMiB")
    if doc["memSize"] < warn_below:
        out.append(f"memSize = {doc['memSize']} MiB is below {warn_below}: the build VM may not boot")
    keys = rules.content_keys()
    for i, entry in enumerate(doc["contents"]):
        for key in sorted(set(entry) - set(keys)):
            out.append(f"contents[{i}] has an unknown attribute {json.dumps(key)}, which is ignored "
                       f"(known: {', '.join(keys)})")
    return out


def truncated_label(fs_type: str, label: str) -> str:
    """The label as the filesystem stores it: the ext family keeps the first 16 bytes (whole characters)."""
    fs = rules.fs_types()[fs_type]
    if not fs.label_truncated or fs.label_bytes is None:
        return label
    data = label.encode("utf-8", "surrogatepass")[:fs.label_bytes]
    return data.decode("utf-8", "ignore")


def boot_end(boot_size: str) -> int:
    """Byte offset where the boot partition ends for bootSize, as nixos/lib/make-disk-image.nix (nixpkgs) has it.

    nixpkgs runs `round_to_nearest $(numfmt --from=iec bootSize) $mebibyte`, which always adds a MiB: the
    default "256M" ends the boot partition at 257 MiB, "255.5M" at 256 MiB. Its reservedSpace for
    `diskSize = "auto"` uses the same value.
    """
    return round_to_nearest(parse_iec(boot_size), MiB)


def load_spec_document(doc: Any) -> Spec:
    """Validate a parsed spec document completely and return it typed; raise SpecError with every problem."""
    problems = _shape_problems(doc)
    if problems:  # the schema cannot judge what is not a JSON value
        raise SpecError(problems)
    problems = _schema_problems(doc)
    if not problems:
        problems = _cross_field_problems(doc)
    if problems:
        raise SpecError(problems)
    spec = _typed(doc)
    problems = _bootloader_dir_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def _bootloader_dir_problems(spec: Spec) -> list[str]:
    """Contents that would be or hold a directory prepare writes the bootloader into (see Spec.bootloader_dirs)."""
    problems = []
    for i, c in enumerate(spec.contents):
        for d in spec.bootloader_dirs:
            if c.target == d or d.startswith(c.target + "/"):
                problems.append(f"$.contents[{i}].target: {json.dumps(c.target)} is not allowed: it is or holds {d}, "
                                "which the builder makes for the bootloader it installs (place files below it)")
    return problems


def _typed(doc: dict[str, Any]) -> Spec:
    """The checked document as a Spec."""
    return Spec(
        raw=doc,
        name=doc["name"],
        base_name=doc["baseName"],
        format=doc["format"],
        partition_table_type=doc["partitionTableType"],
        fs_type=doc["fsType"],
        label=truncated_label(doc["fsType"], doc["label"]),
        disk_size=None if doc["diskSize"] == "auto" else int(doc["diskSize"]) * MiB,
        additional_space=parse_iec(doc["additionalSpace"]),
        boot_partition_end=boot_end(doc["bootSize"]),
        contents=tuple(
            Content(
                source=c["source"],
                target=image_target(c["target"]),
                mode=None if c["mode"] is None else chmod.parse(c["mode"]),
                user=c["user"],
                group=c["group"],
            )
            for c in doc["contents"]
        ),
        install_boot_loader=doc["installBootLoader"],
        touch_efi_vars=doc["touchEFIVars"],
        efi_firmware=doc["efiFirmware"],
        efi_variables=doc["efiVariables"],
        config_file=doc["configFile"],
        post_vm=doc["postVM"],
        mem_size=doc["memSize"],
        only_nix_store=doc["onlyNixStore"],
        deterministic=doc["deterministic"],
        root_gpuid=doc["rootGPUID"].upper(),
        # nixpkgs fixes the filesystem UUID only when deterministic; otherwise mkfs draws one.
        root_fsuid=None if doc["rootFSUID"] is None or not doc["deterministic"] else doc["rootFSUID"].lower(),
        copy_channel=doc["copyChannel"],
        toplevel=doc["system"]["toplevel"],
        closure_info=doc["system"]["closureInfo"],
        channel=doc["system"]["channel"],
        additional_paths=tuple(doc["system"]["additionalPaths"]),
        store_dir=doc["system"]["storeDir"],
        grub_devices=tuple(doc["bootLoader"]["grubDevices"]),
        source_date_epoch=doc["sourceDateEpoch"],
        enter_command=doc["enterCommand"],
        limine_bios_device=doc["bootLoader"].get("limineBiosDevice"),
        warnings=tuple(_warnings(doc)),
        systemd_boot=parse_systemd_boot(doc["bootLoader"].get("systemdBoot")),
        grub=parse_grub(doc["bootLoader"].get("grub")),
        share_root_filesystem=doc.get("shareRootFilesystem", False),
    )


def parse_spec_text(text: str, where: str) -> Any:
    """The JSON document in text, refused values marked in place (see _shape_problems); SpecError if not JSON."""
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_integer, parse_float=_float,
                          parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise SpecError([f"$: {where} is not JSON: {exc}"]) from None
    except RecursionError:
        raise SpecError([f"$: {where} is nested too deeply to be a spec (at most {MAX_DEPTH} levels)"]) from None


def load_spec(path: Path) -> Spec:
    """Read and validate a spec file; unreadable, oversized or non-JSON files are user errors too."""
    try:
        with open_regular(path, allow_pipe=True) as f:
            data = read_at_most(f, MAX_SPEC_BYTES)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError([f"$: spec file {str(path)!r} is larger than {MAX_SPEC_BYTES} bytes (not a spec)"])
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"$: cannot read spec file {str(path)!r}: {exc}"]) from None
    spec = load_spec_document(parse_spec_text(text, repr(str(path))))
    for message in spec.warnings:
        warn(message)
    return spec
