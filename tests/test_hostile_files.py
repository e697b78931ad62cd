"""The builder touches only what it owns: the work directory it makes, fresh temporary files, its output.

Each case runs `python -m builder` as its own process with TMPDIR set to a test-owned directory and
looks at the host afterwards with plain file-system calls: a planted symlink's target, files beside
the work directory, the output directory before and after. Sizes the build filesystem cannot hold are
refused up front, naming the argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from builder.disk.sparse import largest_file
from tests.support.leftovers import tree_listing
from tests.support.specs import SpecFactory

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], tmpdir: Path, preexec: Callable[[], None] | None = None,
        stdout: IO[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m builder ARGS` with TMPDIR set; stderr captured, stdout too unless a file is given."""
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=REPO, text=True, env=env,
                          stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE,
                          preexec_fn=preexec, timeout=300)


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec hook: RLIMIT_FSIZE of limit bytes (a build user's quota, say)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# ---- sizes the build filesystem cannot hold -----------------------------------------------------------------

def test_additional_space_beyond_the_build_filesystem_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    """1 EiB is a valid ext4, but the probe file failed with EFBIG on a scratch path (exit 1)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    if largest_file(tmpdir) >= 1 << 60:
        pytest.skip("this filesystem holds 1 EiB files")
    res = run(["prepare", str(make_spec(additionalSpace="1E")), "--image", str(tmp_path / "x.img")], tmpdir)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert 'error: additionalSpace = "1E": the image would be at least 1.0 EiB' in res.stderr, res.stderr
    assert "the build filesystem" in res.stderr and "holds files of at most" in res.stderr
    assert tree_listing(tmpdir) == [] and sorted(os.listdir(tmp_path)) == ["tmp"]


@pytest.mark.parametrize(("overrides", "field"), [({"diskSize": 200}, "diskSize = 200"),
                                                  ({"additionalSpace": "150M"}, 'additionalSpace = "150M"')])
def test_a_file_size_limit_is_named(overrides: dict[str, object], field: str, make_spec: SpecFactory,
                                    tmp_path: Path) -> None:
    """RLIMIT_FSIZE of 100 MiB: the image cannot be written; refused up front, not EFBIG halfway."""
    tmpdir = tmp_path / "tmp"
    res = run(["build", str(make_spec(**overrides)), "--out", str(tmp_path / "out")], tmpdir,
              file_size_limit(100 << 20))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"error: {field}" in res.stderr and "at most 100.0 MiB" in res.stderr, res.stderr
    assert "[makeDiskImage] stage root" not in res.stderr  # refused before any work
    assert tree_listing(tmpdir) == [] and not (tmp_path / "out").exists()


# ---- temporary files and the work directory ----------------------------------------------------------------

def test_a_symlink_planted_at_the_partial_image_is_not_written_through(make_spec: SpecFactory,
                                                                        tmp_path: Path) -> None:
    """`prepare --image X` wrote the whole image into the target of a link at X.partial, then renamed the link."""
    victim = tmp_path / "victim"
    victim.write_text("must stay as it is\n")
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.img.partial").symlink_to(victim)
    res = run(["prepare", str(make_spec()), "--image", str(images / "x.img")], tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "must stay as it is\n"
    assert (images / "x.img").is_file() and not (images / "x.img").is_symlink()
    assert (images / "x.img").stat().st_size > 64 << 20
    assert os.readlink(images / "x.img.partial") == str(victim)  # not ours: left as it was
    assert sorted(os.listdir(images)) == ["x.img", "x.img.partial"]


def test_the_image_keeps_the_mode_a_new_file_gets(make_spec: SpecFactory, tmp_path: Path) -> None:
    """Made under a fresh private name, the image still gets 0666 less the umask, as `open(..., "w")` gives."""
    res = run(["prepare", str(make_spec()), "--image", str(tmp_path / "x.img")], tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x.img").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    """This process's umask (set and restored)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def planted_work_dir(work: Path) -> dict[str, str]:
    """A --work directory that already holds files named like the builder's own scratch files."""
    (work / "root").mkdir(parents=True)
    (work / "root" / "keep").write_text("mine\n")
    planted = {"binds.json": "[]\n", "debugfs.cmds": "mine\n", "nixos.raw": "mine\n", "other": "mine\n"}
    for name, text in planted.items():
        (work / name).write_text(text)
    return {**planted, "root/keep": "mine\n"}


def work_files(work: Path) -> dict[str, str]:
    """Every file below work with its text."""
    return {str(p.relative_to(work)): p.read_text() for p in sorted(work.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["prepare", "build"])
@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_the_work_directory_is_left_as_it_was(command: str, outcome: str, make_spec: SpecFactory,
                                              tmp_path: Path) -> None:
    """`--work DIR` deleted DIR/root and left binds.json and debugfs.cmds behind; now the builder works in a
    directory it makes inside DIR and removes only that."""
    work = tmp_path / "work"
    before = planted_work_dir(work)
    contents = [] if outcome == "success" else [
        {"source": str(tmp_path / "missing"), "target": "/x", "mode": None, "user": None, "group": None}]
    spec = make_spec(contents=contents)
    target = ["--image", str(tmp_path / "x.img")] if command == "prepare" else ["--out", str(tmp_path / "out")]
    res = run([command, str(spec), *target, "--work", str(work)], tmp_path / "tmp")
    assert res.returncode == (0 if outcome == "success" else 2), res.stderr
    assert work_files(work) == before
    assert sorted(os.listdir(work)) == ["binds.json", "debugfs.cmds", "nixos.raw", "other", "root"]
    assert tree_listing(tmp_path / "tmp") == []


# ---- the output directory -----------------------------------------------------------------------------------

def out_state(out: Path) -> dict[str, tuple[str, str]]:
    """Every entry below out: (kind, content hash or link target), with nothing of it followed."""
    state: dict[str, tuple[str, str]] = {}
    if not out.exists():
        return state
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            state[rel] = ("dir", "")
        else:
            state[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def products(out: Path) -> str:
    """The Hydra product lines of out."""
    return (out / "nix-support" / "hydra-build-products").read_text()


def build_into(spec: Path, out: Path, tmpdir: Path, stdout: IO[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m builder build SPEC --out OUT`."""
    return run(["build", str(spec), "--out", str(out)], tmpdir, stdout=stdout)


def test_a_rebuild_replaces_the_image_and_writes_the_products_whole(make_spec: SpecFactory, tmp_path: Path) -> None:
    """Rebuilding into the same out appended a second Hydra product line."""
    out = tmp_path / "out"
    spec = make_spec()
    for _ in range(2):
        res = build_into(spec, out, tmp_path / "tmp")
        assert res.returncode == 0, res.stderr
    assert products(out) == f"file raw-image {out / 'fixture.img'}\n"
    assert sorted(out_state(out)) == ["fixture.img", "nix-support", "nix-support/hydra-build-products"]


@pytest.mark.parametrize("failure", ["before-convert", "postVM", "stdout-full"])
def test_a_failed_build_leaves_out_as_it_was(failure: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """A failure in postVM removed the previous image and the whole products file; with stdout full the build
    exited 1 but left its complete image."""
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    first = build_into(make_spec(), out, tmpdir)
    assert first.returncode == 0, first.stderr
    before = out_state(out)
    overrides: dict[str, object] = {"label": "second"}
    if failure == "before-convert":
        overrides["contents"] = [{"source": str(tmp_path / "missing"), "target": "/x", "mode": None, "user": None,
                                  "group": None}]
    if failure == "postVM":
        overrides["postVM"] = 'echo appended >> "$out/nix-support/hydra-build-products"; exit 3'
    with open("/dev/full", "w") as full:
        res = build_into(make_spec(**overrides), out, tmpdir, full if failure == "stdout-full" else None)
    assert res.returncode == {"before-convert": 2, "postVM": 1, "stdout-full": 1}[failure], res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert out_state(out) == before
    assert tree_listing(tmpdir) == []


def test_stdout_full_on_a_first_build_leaves_no_output_directory(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        res = build_into(make_spec(), out, tmp_path / "tmp", full)
    assert res.returncode == 1, res.stderr
    assert "cannot print the image's path" in res.stderr, res.stderr
    assert not out.exists()


def test_concurrent_builds_into_one_out_directory(make_spec: SpecFactory, tmp_path: Path) -> None:
    """Two builds into one out: the failing one removed the other's finished image, which exited 0 and printed
    its path. Now the second finds the directory locked and stops at once, changing nothing."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    hold = (f"touch {gate}/started; while [ ! -e {gate}/go ]; do sleep 0.05; done")
    first = subprocess.Popen([sys.executable, "-m", "builder", "build", str(make_spec(postVM=hold)), "--out", str(out)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(REPO)))
    try:
        deadline = time.monotonic() + 120
        while not (gate / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first build did not reach postVM"
            time.sleep(0.05)
        during = out_state(out)
        second = build_into(make_spec(label="second", postVM="exit 3"), out, tmp_path / "tmp")
        assert second.returncode == 1, second.stderr
        assert f"build failed: --out {str(out)!r} is in use by another build" in second.stderr, second.stderr
        assert "[makeDiskImage] read closure" not in second.stderr  # stopped before any work
        assert out_state(out) == during
    finally:
        (gate / "go").touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert Path(stdout.strip()) == out / "fixture.img" and (out / "fixture.img").is_file()
    assert products(out) == f"file raw-image {out / 'fixture.img'}\n"


@pytest.mark.parametrize("planted", ["fixture.img", "nix-support/hydra-build-products"])
def test_files_in_out_are_replaced_never_written_through(planted: str, make_spec: SpecFactory,
                                                         tmp_path: Path) -> None:
    """nix-support/hydra-build-products was opened through a symlink (appending to its target)."""
    victim = tmp_path / "victim"
    victim.write_text("must stay as it is\n")
    out = tmp_path / "out"
    (out / "nix-support").mkdir(parents=True)
    (out / planted).symlink_to(victim)
    res = build_into(make_spec(), out, tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "must stay as it is\n"
    assert products(out) == f"file raw-image {out / 'fixture.img'}\n"
    assert not (out / "fixture.img").is_symlink() and not (out / "nix-support/hydra-build-products").is_symlink()


def test_a_symlinked_nix_support_is_refused(make_spec: SpecFactory, tmp_path: Path) -> None:
    """The builder writes into nix-support only when it is a real directory inside out."""
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "nix-support").symlink_to(victim)
    res = build_into(make_spec(), out, tmp_path / "tmp")
    assert res.returncode == 2, res.stderr
    assert "nix-support" in res.stderr and "is not a directory" in res.stderr, res.stderr
    assert os.listdir(victim) == []
    assert sorted(os.listdir(out)) == ["nix-support"]


def test_out_that_is_a_file_is_refused(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file\n")
    res = build_into(make_spec(), out, tmp_path / "tmp")
    assert res.returncode == 2, res.stderr
    assert f"--out {str(out)!r} is not a directory" in res.stderr, res.stderr
    assert out.read_text() == "a file\n"


def test_post_vm_sees_the_image_in_out_and_may_move_it(make_spec: SpecFactory, tmp_path: Path) -> None:
    """As in nixpkgs: $diskImage is $out/<file>, its product line is written; postVM may replace both."""
    out = tmp_path / "out"
    post_vm = ('test "$diskImage" = "$out/fixture.img" && test -f "$diskImage"\n'
               'grep -qx "file raw-image $diskImage" "$out/nix-support/hydra-build-products"\n'
               'mv "$diskImage" "$out/moved.img"\n'
               'echo "file raw-image $out/moved.img" > "$out/nix-support/hydra-build-products"\n')
    res = build_into(make_spec(postVM=post_vm), out, tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["moved.img", "nix-support"]
    assert products(out) == f"file raw-image {out / 'moved.img'}\n"


def test_an_out_that_cannot_be_written_is_named(make_spec: SpecFactory, tmp_path: Path) -> None:
    """OUT on a read-only filesystem: refused before any work, naming OUT (not a random name inside it)."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root"
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "mdi-test-ro", str(out)], check=True)
    try:
        res = build_into(make_spec(), out, tmp_path / "tmp")
        assert res.returncode == 1, res.stderr
        assert f"build failed: --out {str(out)!r}: cannot write there (Read-only file system)" in res.stderr
        assert "[makeDiskImage] read closure" not in res.stderr
    finally:
        subprocess.run(["umount", str(out)], check=True)


# ---- inputs that fail late ------------------------------------------------------------------------------------

def test_a_post_vm_longer_than_one_argument_runs(make_spec: SpecFactory, tmp_path: Path) -> None:
    """A 200 kB postVM failed with E2BIG ("Argument list too long", exit 1) after the whole build."""
    out = tmp_path / "out"
    post_vm = "#" * 200_000 + '\ntest "$0" = bash && test $# = 0\necho "$diskImage" > "$out/post.txt"\n'
    res = build_into(make_spec(postVM=post_vm), out, tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert (out / "post.txt").read_text() == f"{out / 'fixture.img'}\n"


@pytest.mark.parametrize("field", ["efiFirmware", "efiVariables"])
def test_missing_efi_files_are_named_before_any_work(field: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """touchEFIVars with a firmware file that is not there failed with exit 1 after prepare, when the VM began."""
    files = {"efiFirmware": "/usr/share/OVMF/OVMF_CODE_4M.fd", "efiVariables": "/usr/share/OVMF/OVMF_VARS_4M.fd"}
    files[field] = str(tmp_path / "missing.fd")
    res = build_into(make_spec(touchEFIVars=True, **files), tmp_path / "out", tmp_path / "tmp")
    assert res.returncode == 2, res.stderr
    assert f"error: {field} {str(tmp_path / 'missing.fd')!r}: No such file or directory" in res.stderr, res.stderr
    assert "[makeDiskImage] read closure" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("case", "fragment"), [
    ("image-dir-missing", "--image '{tmp}/missing/x.img': its directory '{tmp}/missing' does not exist"),
    ("image-is-dir", "--image '{tmp}/adir': is a directory"),
    ("image-under-file", "--image '{tmp}/afile/x.img': '{tmp}/afile' is not a directory"),
    ("work-is-file", "--work '{tmp}/afile': is not a directory"),
    ("build-work-is-file", "--work '{tmp}/afile': is not a directory"),
])
def test_unusable_image_and_work_paths_are_named(case: str, fragment: str, make_spec: SpecFactory,
                                                 tmp_path: Path) -> None:
    """A --image or --work that cannot be used: exit 2 naming the option, not exit 1 with a probe file's name."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("a file\n")
    image = {"image-dir-missing": "missing/x.img", "image-is-dir": "adir", "image-under-file": "afile/x.img"}
    args = ["prepare", str(make_spec()), "--image", str(tmp_path / image.get(case, "x.img"))]
    if case == "work-is-file":
        args += ["--work", str(tmp_path / "afile")]
    if case == "build-work-is-file":
        args = ["build", str(make_spec()), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "afile")]
    (tmp_path / "tmp").mkdir()
    before = out_state(tmp_path)
    res = run(args, tmp_path / "tmp")
    assert res.returncode == 2, res.stderr
    assert "error: " + fragment.format(tmp=tmp_path) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert out_state(tmp_path) == before


@pytest.mark.parametrize("kind", ["char-device", "fifo", "directory"])
def test_a_config_file_that_is_no_regular_file_is_named(kind: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """configFile = "/dev/zero" was copied until the work directory's disk was full (exit 1)."""
    # A node of /dev/zero's own outside /dev (a path under /dev is refused as such: test_hostile_confinement.py).
    source = {"char-device": tmp_path / "zero", "fifo": tmp_path / "fifo", "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(source)
    elif kind == "char-device":
        os.mknod(source, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    res = build_into(make_spec(configFile=str(source)), tmp_path / "out", tmp_path / "tmp")
    assert res.returncode == 2, res.stderr
    assert f"error: configFile {str(source)!r}: not a regular file" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_systemd_boot_extra_file_that_is_no_regular_file_is_named(tmp_path: Path) -> None:
    """An extraFiles source of /dev/zero was copied into the ESP until it was full (exit 1 from mcopy)."""
    from tests.fixtures.system import sdboot_system_spec

    spec = sdboot_system_spec(tmp_path / "spec")
    doc = json.loads(spec.read_text())
    zero = tmp_path / "zero"  # /dev/zero's device outside /dev (under /dev it is refused as such)
    os.mknod(zero, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    doc["bootLoader"]["systemdBoot"]["extraFiles"] = {"efi/zero.efi": str(zero)}
    spec.write_text(json.dumps(doc))
    res = build_into(spec, tmp_path / "out", tmp_path / "tmp")
    assert res.returncode == 2, res.stderr
    assert (f"error: bootLoader.systemdBoot.extraFiles[\"efi/zero.efi\"] {str(zero)!r}: not a regular file"
            in res.stderr), res.stderr
    assert not (tmp_path / "out").exists()


# ---- TMPDIR that cannot hold the scratch files --------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "file", "read-only"])
def test_an_unusable_tmpdir_is_named_before_any_work(case: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """Python's tempfile fell back to /tmp, /var/tmp or the working directory without a word."""
    tmpdir = tmp_path / "tmpdir"
    if case == "file":
        tmpdir.write_text("")
    elif case == "read-only":
        tmpdir.mkdir()
    spec = make_spec(contents=[])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "builder", "build", str(spec), "--out", str(out)]
    if case == "read-only":  # a read-only filesystem there, in a mount namespace of the build's own
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o ro none "$0" && exec "$@"', str(tmpdir), *argv]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO)))
    assert res.returncode == 2, res.stderr
    why = {"missing": "does not exist", "file": "is not a directory", "read-only": "cannot be written"}[case]
    assert f"error: TMPDIR {str(tmpdir)!r} {why}" in res.stderr, res.stderr
    assert not out.exists()


# ---- the command line's standard streams ----------------------------------------------------------------------

def run_redirected(args: list[str], redirect: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """`python -m builder ARGS` with a shell redirection of its own (`>&-`, `2>/dev/full`...), output captured."""
    tmpdir.mkdir(exist_ok=True)
    return subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "bash", sys.executable, "-m", "builder", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO)))


def test_a_closed_stdout_undoes_the_build(make_spec: SpecFactory, tmp_path: Path) -> None:
    """`build ... >&-` exited 0 with the image installed and nothing printed; the README promises the build is
    undone when its path cannot be printed."""
    out = tmp_path / "out"
    res = run_redirected(["build", str(make_spec()), "--out", str(out)], ">&-", tmp_path / "tmp")
    assert res.returncode == 1, res.stderr
    assert "cannot print the image's path" in res.stderr and "the build is undone" in res.stderr, res.stderr
    assert not out.exists()
    assert tree_listing(tmp_path / "tmp") == []


@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full"])
def test_a_bad_spec_is_status_2_whatever_stderr_is(redirect: str, tmp_path: Path) -> None:
    """stderr closed: the error went to stdout; stderr /dev/full: exit 1 (the failed print) where a bad spec is 2."""
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    res = run_redirected(["build", str(spec), "--out", str(tmp_path / "out")], redirect, tmp_path / "tmp")
    assert res.returncode == 2
    assert res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_a_build_with_stderr_on_a_full_device_succeeds(make_spec: SpecFactory, tmp_path: Path) -> None:
    """The progress log is best effort: a stderr that cannot be written does not fail the build."""
    out = tmp_path / "out"
    res = run_redirected(["build", str(make_spec()), "--out", str(out)], "2>/dev/full", tmp_path / "tmp")
    assert res.returncode == 0
    assert res.stdout == f"{out / 'fixture.img'}\n"


@pytest.mark.parametrize("post_vm", ["plain", "compressing"])
def test_stdout_holds_the_image_path_alone(post_vm: str, make_spec: SpecFactory, tmp_path: Path) -> None:
    """postVM's output went to stdout before the path, so `img=$(python -m builder build ...)` got its lines; it
    goes to stderr now, as in a Nix build log. A postVM that compresses $diskImage away still succeeds."""
    script = {"plain": 'echo "postVM says hello"; ls "$diskImage"\n',
              "compressing": 'echo "postVM says hello"; gzip -1 "$diskImage"\n'}[post_vm]
    out = tmp_path / "out"
    res = build_into(make_spec(postVM=script), out, tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{out / 'fixture.img'}\n"
    assert "postVM says hello" in res.stderr
    assert sorted(os.listdir(out)) == ["fixture.img" if post_vm == "plain" else "fixture.img.gz", "nix-support"]


def test_a_closed_stdin_is_dev_null_for_the_tools_too(make_spec: SpecFactory, tmp_path: Path) -> None:
    """`build ... <&-`: the /dev/null the builder put on fd 0 was not inheritable, so every tool (postVM here)
    started with fd 0 closed, where a file it opened would land and be taken for its input."""
    seen = tmp_path / "stdin-seen"
    out = tmp_path / "out"
    script = f'readlink /proc/self/fd/0 > "{seen}" || echo closed > "{seen}"\n'
    res = run_redirected(["build", str(make_spec(postVM=script)), "--out", str(out)], "<&-", tmp_path / "tmp")
    assert res.returncode == 0, res.stderr
    assert seen.read_text() == "/dev/null\n"
