"""Faults during real builds: signals at each step, vanished/unreadable sources, a full disk, a failing or killed VM.

Every case runs `python -m builder build` as its own process (own session) with TMPDIR set to a
test-owned directory, and then checks what is left on the host with independent means: /proc/mounts,
`losetup -a`, the process table (command lines naming the test's directory), the TMPDIR tree and the
output directory. Steps that run a tool are held open by a gate: a shim placed first on PATH that,
for the one invocation the test names, waits for a go-file before exec'ing the real tool. The shim
changes no behaviour; it only makes "the signal arrives while mkfs runs" deterministic.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder.staging.store import nix32
from tests.fixtures.nixstore import write_closure_info
from tests.support.forged_store import forged, spec_with
from tests.support.imagecheck import part_offset
from tests.support.leftovers import assert_nothing_left, processes_mentioning, tree_listing
from tests.support.specs import SpecFactory, spec_doc

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 240.0

SHIM = """#!{python}
import os, shutil, sys, time
from pathlib import Path
tool = os.path.basename(sys.argv[0])
gate = Path(os.environ["MDI_TEST_GATE"])
rule = gate / "rule"
if rule.exists():
    name, needle = (rule.read_text().split("\\n") + [""])[:2]
    if name == tool and needle in " " + " ".join(sys.argv[1:]) + " " and not (gate / "started").exists():
        (gate / "started").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not (gate / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
real = shutil.which(tool, path=os.environ["MDI_TEST_REAL_PATH"])
os.execv(real, [tool, *sys.argv[1:]])
"""
GATED_TOOLS = ("mkfs.ext4", "debugfs", "mkfs.vfat", "e2fsck", "qemu-img")


@dataclass
class Sandbox:
    """A test-owned world for one build: TMPDIR, output directory, gate directory and environment."""

    private: Path
    tmpdir: Path
    out: Path
    gate: Path
    env: dict[str, str] = field(default_factory=dict)

    def hold(self, tool: str, needle: str = "") -> None:
        """Make the next invocation of tool whose arguments contain needle wait for release()."""
        (self.gate / "rule").write_text(f"{tool}\n{needle}")

    def held(self) -> bool:
        """Whether the held tool has started and is waiting."""
        return (self.gate / "started").exists()

    def release(self) -> None:
        """Let the held tool run."""
        (self.gate / "go").write_text("")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose PATH starts with the gate shims; checks nothing of it is running afterwards."""
    private = tmp_path / "faults"
    shims, tmpdir, gate, memory = private / "shims", private / "tmp", private / "gate", private / "memory"
    for d in (shims, tmpdir, gate, memory):
        d.mkdir(parents=True)
    for tool in GATED_TOOLS:
        shim = shims / tool
        shim.write_text(SHIM.format(python=sys.executable))
        shim.chmod(0o755)
    real_path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    # The raw intermediate of a converted format goes to memory (builder/disk/intermediate.py): here, to a
    # directory of the test's own, which must be empty again after every build, done or failed.
    env = dict(os.environ, TMPDIR=str(tmpdir), PATH=f"{shims}:{real_path}", MDI_TEST_GATE=str(gate),
               MDI_TEST_REAL_PATH=real_path, PYTHONPATH=str(REPO), MDI_MEMORY_DIR=str(memory))
    box = Sandbox(private, tmpdir, private / "out", gate, env)
    yield box
    box.release()  # never leave a shim waiting
    # After a SIGKILL of the builder its janitor removes the raw intermediate (builder/disk/intermediate.py).
    wait_for(lambda: tree_listing(memory) == [], "the raw intermediate in memory to be removed", timeout=10)


@dataclass
class Outcome:
    """A finished build process: status and its whole stderr."""

    status: int
    stderr: str
    stdout: str


def run_build(box: Sandbox, spec: Path, on_line: Callable[[str, subprocess.Popen[str]], None] | None = None,
              *, argv: list[str] | None = None) -> Outcome:
    """Run `python -m builder build` in its own session; on_line sees each stderr line as it appears."""
    cmd = [sys.executable, "-m", "builder", *(argv or ["build", str(spec), "--out", str(box.out)])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(RUN_TIMEOUT, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            lines.append(line)
            if on_line is not None:
                on_line(line, proc)
        stdout = proc.stdout.read()
        status = proc.wait()
    finally:
        watchdog.cancel()
        box.release()
    return Outcome(status, "".join(lines), stdout)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll until predicate holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def send(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    """SIGINT goes to the whole process group, as a terminal's Ctrl-C does; SIGTERM to the builder alone."""
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)


def long_closure_info(source: Path, dest: Path, entries: int = 200_000) -> Path:
    """A copy of a closureInfo directory whose registration has entries more (unreferenced) store paths: reading
    and checking it takes seconds. (A FIFO registration held the step before; it is refused now.)"""
    shutil.copytree(source, dest)
    digest = "sha256:" + nix32(hashlib.sha256(b"filler").digest())
    with open(dest / "registration", "a") as f:
        for i in range(entries):
            name = nix32(hashlib.sha256(str(i).encode()).digest())[:32]
            f.write(f"/nix/store/{name}-filler-{i}\n{digest}\n0\n\n0\n")
    return dest


def many_files(root: Path, count: int) -> Path:
    """A contents source tree of count small files (staging it takes a noticeable moment)."""
    for i in range(count):
        sub = root / f"d{i // 100}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_text("x")
    return root


# (step as logged, the tool held during it or None, extra spec changes). Held tools make the step last until
# the signal arrives; for in-process steps the next tool is held so the build cannot finish first.
STEPS: list[tuple[str, tuple[str, str] | None]] = [
    ("read closure", None),
    ("stage root", ("mkfs.ext4", "")),
    ("size", ("mkfs.ext4", "")),
    ("partition table", ("mkfs.ext4", " -d ")),
    ("root filesystem (mkfs.ext4 -d)", ("mkfs.ext4", " -d ")),
    ("contents owners (debugfs)", ("debugfs", " -w ")),
    ("index directories (e2fsck -fyD)", ("e2fsck", " -fyD ")),
    ("boot filesystems", ("mkfs.vfat", "")),
    ("check root filesystem (e2fsck)", ("e2fsck", " -fn ")),
    ("convert", ("qemu-img", " convert ")),
    ("postVM", None),
]
IN_STEP = {"size", "root filesystem (mkfs.ext4 -d)", "index directories (e2fsck -fyD)", "contents owners (debugfs)",
           "boot filesystems", "check root filesystem (e2fsck)", "convert"}
ORDER = [s for s, _ in STEPS]
# Steps that run at the same time as the held one (builder/concurrent.py): the FAT partitions are made
# while mkfs.ext4 fills the root; the checks run side by side. A signal may end them together.
ALONGSIDE = {
    "boot filesystems": {"root filesystem (mkfs.ext4 -d)"},
    # mkfs.vfat's gate shim is a Python start-up: on a loaded machine the FAT step still runs when mkfs.ext4 is held.
    "root filesystem (mkfs.ext4 -d)": {"boot filesystems"},
    "check root filesystem (e2fsck)": {"root filesystem free space", "check ESP (fsck.vfat)"},
}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("step_name,held", STEPS, ids=[s for s, _ in STEPS])
def test_signal_at_each_step_cleans_up(step_name: str, held: tuple[str, str] | None, sig: signal.Signals,
                                       sandbox: Sandbox, make_spec: SpecFactory, fixture_spec: Path) -> None:
    overrides: dict[str, Any] = {"format": "qcow2"}
    doc = spec_doc(fixture_spec)
    if step_name == "read closure":
        info = long_closure_info(Path(doc["system"]["closureInfo"]), sandbox.private / "closure-info")
        overrides["system"] = {**doc["system"], "closureInfo": str(info)}
    if step_name == "stage root":
        tree = many_files(sandbox.private / "many", 600)
        overrides["contents"] = [*doc["contents"], {"source": str(tree), "target": "/srv/many", "mode": None,
                                                     "user": None, "group": None}]
    post_started = sandbox.private / "post-started"
    if step_name == "postVM":
        fifo = sandbox.private / "never-written.fifo"
        os.mkfifo(fifo)  # the user's command blocks reading it; its command line names the sandbox
        overrides["postVM"] = f"touch {shlex.quote(str(post_started))}; cat {shlex.quote(str(fifo))}"
    if held:
        sandbox.hold(*held)
    spec = make_spec(**overrides)
    sent: list[bool] = []

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if sent or line.strip() != f"[makeDiskImage] {step_name} ...":
            return
        if step_name in IN_STEP:
            wait_for(sandbox.held, f"{held} to start")
        elif step_name == "read closure":
            time.sleep(0.3)  # the builder is reading and checking the long registration
        elif step_name == "postVM":
            wait_for(post_started.exists, "postVM to start")
        send(proc, sig)
        sent.append(True)

    res = run_build(sandbox, spec, on_line)
    assert sent, res.stderr
    assert res.status == 128 + sig, res.stderr
    name = signal.Signals(sig).name
    assert f"interrupted by {name}: stopped, temporary files removed" in res.stderr
    assert "Traceback" not in res.stderr
    names = [*ORDER, *ALONGSIDE.get(step_name, ())]
    failed = [s for s in names if f"[makeDiskImage] {s} failed after" in res.stderr]
    # The signal lands in the step itself (held or blocked there), or for the quick in-process partition
    # table and staging steps possibly in the next, held one: never after the build could have finished.
    # Steps running alongside the held one may end with it.
    allowed = {step_name} if step_name not in ("partition table", "stage root") else {
        step_name, ORDER[ORDER.index(step_name) + 1]}
    held_failed = [s for s in failed if s in allowed]
    assert len(held_failed) == 1 and set(failed) <= allowed | ALONGSIDE.get(step_name, set()), (failed, res.stderr)
    assert f"[makeDiskImage] {held_failed[0]} done" not in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_store_path_vanishing_mid_build(sandbox: Sandbox, make_spec: SpecFactory, fixture_spec: Path) -> None:
    """A store path garbage-collected after it was measured, before mkfs reads it: build error, nothing left."""
    victim_src = sandbox.private / "victim"
    victim_src.mkdir()
    (victim_src / "data").write_text(f"unique {time.time_ns()}\n")
    victim = subprocess.run(["nix-store", "--add", str(victim_src)], capture_output=True, text=True,
                            check=True).stdout.strip()
    doc = spec_doc(fixture_spec)
    info = write_closure_info([doc["system"]["toplevel"], *doc["system"]["additionalPaths"], victim],
                              sandbox.private / "closure-info")
    spec = make_spec(system={**doc["system"], "closureInfo": str(info),
                             "additionalPaths": [*doc["system"]["additionalPaths"], victim]})
    sandbox.hold("mkfs.ext4", "")  # the sizing probe: the tree was measured, mkfs -d has yet to read it

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if line.startswith("[makeDiskImage] size ..."):
            wait_for(sandbox.held, "the mkfs probe to start")
            subprocess.run(["nix-store", "--delete", victim], capture_output=True, check=True)
            sandbox.release()

    res = run_build(sandbox, spec, on_line)
    assert not os.path.exists(victim)
    assert res.status == 1, res.stderr
    assert "build failed:" in res.stderr and victim in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_missing_source_is_named(sandbox: Sandbox, make_spec: SpecFactory, fixture_spec: Path) -> None:
    """A source removed after the spec was written: a user error naming the entry and path."""
    gone = sandbox.private / "gone.txt"
    doc = spec_doc(fixture_spec)
    spec = make_spec(contents=[*doc["contents"], {"source": str(gone), "target": "/gone", "mode": None,
                                                  "user": None, "group": None}])
    res = run_build(sandbox, spec)
    assert res.status == 2, res.stderr
    assert f"contents[5].source {str(gone)!r} does not exist" in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


@contextmanager
def readable_by_others(*paths: Path) -> Iterator[None]:
    """Temporarily let other users traverse/read these paths and their parents (pytest's tmp dirs are 0700)."""
    opened: list[tuple[Path, int]] = []
    for path in paths:
        for p in [path, *path.parents]:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o005 != 0o005 and p not in [o for o, _ in opened]:
                opened.append((p, mode))
                os.chmod(p, mode | 0o005)
    try:
        yield
    finally:
        for p, mode in reversed(opened):
            os.chmod(p, mode)


def test_unreadable_source_as_build_user(sandbox: Sandbox, make_spec: SpecFactory, fixture_spec: Path) -> None:
    """Run as an unprivileged user (as Nix build users do) with a file in a source tree it may not read."""
    tree = sandbox.private / "secret-tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "ok.txt").write_text("fine\n")
    (tree / "sub" / "secret.txt").write_text("no\n")
    os.chmod(tree / "sub" / "secret.txt", 0)
    spec = sandbox.private / "spec.json"
    shutil.copy(make_spec(contents=[{"source": str(tree), "target": "/srv/tree", "mode": None, "user": None,
                                     "group": None}]), spec)
    sandbox.out.mkdir()
    for d in (sandbox.tmpdir, sandbox.out):
        os.chmod(d, 0o777)
    cmd = ["runuser", "-u", "nobody", "--", "env", *(f"{k}={v}" for k, v in sandbox.env.items()),
           sys.executable, "-m", "builder", "build", str(spec), "--out", str(sandbox.out)]
    with readable_by_others(spec, tree / "sub" / "ok.txt", fixture_spec.parent / "closure-info" / "registration"):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 2, res.stderr
    assert f"contents[0] ({str(tree)!r} -> '/srv/tree'):" in res.stderr, res.stderr
    assert "secret.txt" in res.stderr and "Permission denied" in res.stderr
    assert "Traceback" not in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


@pytest.mark.parametrize("full", ["tmpdir", "out"])
def test_image_dir_out_of_space(sandbox: Sandbox, make_spec: SpecFactory, full: str) -> None:
    """The directory the image is written in on a 2 MiB tmpfs: TMPDIR (a qcow2's raw intermediate kept on
    disk) or the output directory (a raw image is written there): a clear out-of-space error, nothing left."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root"
    where = sandbox.tmpdir if full == "tmpdir" else sandbox.out
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "mdi-test-enospc", str(where)], check=True)
    if full == "tmpdir":
        sandbox.env["MDI_INTERMEDIATE"] = "disk"
    try:
        res = run_build(sandbox, make_spec(format="qcow2" if full == "tmpdir" else "raw"))
        assert res.status == 1, res.stderr
        assert "No space left on device" in res.stderr, res.stderr
        assert "ran out of space" in res.stderr and str(where) in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert sorted(os.listdir(where)) == []
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_disk_size_too_small_is_refused_before_writing(sandbox: Sandbox, make_spec: SpecFactory) -> None:
    """A fixed diskSize that cannot hold the tree: refused with the size needed, and that size then works."""
    res = run_build(sandbox, make_spec(diskSize=66))
    assert res.status == 2, res.stderr
    assert "diskSize = 66 MiB is too small" in res.stderr
    assert "[makeDiskImage] partition table" not in res.stderr  # refused before anything was written
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)
    needed = int(res.stderr.split("use diskSize >= ")[1].split()[0])
    ok = run_build(sandbox, make_spec(diskSize=needed))
    assert ok.status == 0, ok.stderr
    image = sandbox.out / "fixture.img"
    assert image.stat().st_size == needed << 20
    below = run_build(sandbox, make_spec(diskSize=needed - 1), argv=None)
    assert below.status == 2 and f"use diskSize >= {needed}" in below.stderr


# ---- the build VM ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vm_spec_doc(fixture_spec: Path) -> dict[str, Any]:
    """The fixture spec with an owner given by name, so finalize must run in the VM (and fails there: the
    fixture closure has no chown, which is the 'command fails in the VM' case)."""
    doc = spec_doc(fixture_spec)
    doc["contents"][4] = {**doc["contents"][4], "user": "root", "group": "root"}
    return doc


def qemu_running(box: Sandbox) -> bool:
    """Whether a qemu of this sandbox is running."""
    return any("qemu-system" in p for p in processes_mentioning(str(box.private)))


@pytest.mark.slow
def test_vm_command_failing(sandbox: Sandbox, make_spec: SpecFactory, vm_spec_doc: dict[str, Any]) -> None:
    res = run_build(sandbox, make_spec(**vm_spec_doc))
    assert res.status == 1, res.stderr
    assert "build failed: finalize failed in the build VM (exit status 127); last console lines:" in res.stderr
    assert "finalize: failed (status 127), unmounting" in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["qemu-killed", "SIGINT", "SIGTERM", "builder-SIGKILL"])
def test_vm_interrupted(how: str, sandbox: Sandbox, make_spec: SpecFactory, vm_spec_doc: dict[str, Any]) -> None:
    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if not line.startswith("[makeDiskImage] finalize in the build VM ..."):
            return
        wait_for(lambda: qemu_running(sandbox), "qemu to start")
        time.sleep(1.0)
        if how == "qemu-killed":
            for entry in processes_mentioning(str(sandbox.private)):
                if "qemu-system" in entry:
                    os.kill(int(entry.split(":")[0]), signal.SIGKILL)
        elif how == "builder-SIGKILL":
            os.kill(proc.pid, signal.SIGKILL)
            # No cleanup can run after SIGKILL, but qemu must not outlive the builder (parent-death signal).
            wait_for(lambda: not qemu_running(sandbox), "qemu to die with the builder", timeout=10)
        else:
            send(proc, signal.Signals[how])

    res = run_build(sandbox, make_spec(**vm_spec_doc), on_line)
    if how == "qemu-killed":
        assert res.status == 1, res.stderr
        assert "the build VM produced no exit status (qemu exit status -9)" in res.stderr
    elif how == "SIGINT":
        assert res.status == 130 and "interrupted by SIGINT" in res.stderr, res.stderr
    elif how == "SIGTERM":
        assert res.status == 143 and "interrupted by SIGTERM" in res.stderr, res.stderr
    else:
        assert res.status == -signal.SIGKILL
        shutil.rmtree(sandbox.tmpdir)
        sandbox.tmpdir.mkdir()
        wait_for(lambda: not processes_mentioning(str(sandbox.private)), "the raw image's janitor to end")
    assert "Traceback" not in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_builder_sigkill_frees_the_raw_intermediate_in_memory(sandbox: Sandbox, make_spec: SpecFactory) -> None:
    """A qcow2 build's raw image is in memory; SIGKILL mid-mkfs: nothing can clean up in the builder, its janitor
    removes the image (a file left in /dev/shm would hold that memory until reboot)."""
    sandbox.hold("mkfs.ext4", " -d ")
    memory = Path(sandbox.env["MDI_MEMORY_DIR"])
    seen: list[list[str]] = []

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if line.startswith("[makeDiskImage] root filesystem (mkfs.ext4 -d) ..."):
            wait_for(sandbox.held, "mkfs to start")
            seen.append(tree_listing(memory))
            os.kill(proc.pid, signal.SIGKILL)

    res = run_build(sandbox, make_spec(format="qcow2"), on_line)
    assert res.status == -signal.SIGKILL, res.stderr
    assert seen and any(name.endswith("nixos.raw.partial") or ".partial" in name for name in seen[0]), seen
    wait_for(lambda: tree_listing(memory) == [], "the janitor to remove the raw intermediate", timeout=10)
    wait_for(lambda: not processes_mentioning(str(sandbox.private)), "the builder's processes to end")
    shutil.rmtree(sandbox.tmpdir)  # the scratch directory: left by a SIGKILL (docs/failure-behaviour.md)
    sandbox.tmpdir.mkdir()
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_builder_sigkill_during_mkfs_takes_the_namespace_helper_down(sandbox: Sandbox,
                                                                     make_spec: SpecFactory) -> None:
    sandbox.hold("mkfs.ext4", " -d ")

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if line.startswith("[makeDiskImage] root filesystem (mkfs.ext4 -d) ..."):
            wait_for(sandbox.held, "mkfs to start")
            helper = int((sandbox.gate / "started").read_text())
            os.kill(proc.pid, signal.SIGKILL)
            # Checked while the gate still holds the helper: only the parent-death signal can end it now.
            wait_for(lambda: _gone(helper), "the mkfs helper to die with the builder", 10)
            died.append(helper)

    died: list[int] = []
    res = run_build(sandbox, make_spec(), on_line)
    assert res.status == -signal.SIGKILL
    assert died
    assert processes_mentioning(str(sandbox.private)) == []


def _gone(pid: int) -> bool:
    """Whether pid has exited (gone, or a zombie not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True



def test_sighup_during_mkfs_cleans_up(sandbox: Sandbox, make_spec: SpecFactory) -> None:
    """A closed terminal (SIGHUP) is handled like SIGTERM: cleanup, then status 129."""
    sandbox.hold("mkfs.ext4", " -d ")

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if line.startswith("[makeDiskImage] root filesystem (mkfs.ext4 -d) ..."):
            wait_for(sandbox.held, "mkfs to start")
            os.kill(proc.pid, signal.SIGHUP)

    res = run_build(sandbox, make_spec(), on_line)
    assert res.status == 129, res.stderr
    assert "interrupted by SIGHUP: stopped, temporary files removed" in res.stderr
    assert "[makeDiskImage] root filesystem (mkfs.ext4 -d) failed after" in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


# Every signal whose default action ends a process (signal(7): "Term" or "Core"), but SIGKILL and SIGSTOP,
# which no process can catch, the hardware faults SIGSEGV, SIGBUS, SIGILL and SIGFPE, from which a handler
# cannot return, and SIGPIPE and SIGXFSZ, which Python ignores from the start (a write fails with EPIPE or
# EFBIG instead, and the build unwinds on that error).
TERMINATING_BY_DEFAULT = {
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTRAP, signal.SIGABRT, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGALRM, signal.SIGTERM, signal.SIGSTKFLT, signal.SIGXCPU, signal.SIGVTALRM, signal.SIGPROF,
    signal.SIGIO, signal.SIGPWR, signal.SIGSYS, *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
}


def test_every_signal_that_would_end_the_builder_is_handled() -> None:
    from builder.signals import TERMINATING

    assert set(TERMINATING) == TERMINATING_BY_DEFAULT


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGUSR1, signal.SIGALRM, signal.SIGRTMIN + 2],
                         ids=["SIGQUIT", "SIGUSR1", "SIGALRM", "SIGRTMIN+2"])
def test_other_terminating_signals_during_mkfs_clean_up(sig: int, sandbox: Sandbox, make_spec: SpecFactory) -> None:
    """SIGQUIT, SIGUSR1, SIGALRM... killed the builder on the spot and left its scratch directory in TMPDIR."""
    sandbox.hold("mkfs.ext4", " -d ")

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if line.startswith("[makeDiskImage] root filesystem (mkfs.ext4 -d) ..."):
            wait_for(sandbox.held, "mkfs to start")
            os.kill(proc.pid, sig)

    res = run_build(sandbox, make_spec(), on_line)
    name = "SIGRTMIN+2" if sig == signal.SIGRTMIN + 2 else signal.Signals(sig).name
    assert res.status == 128 + sig, res.stderr
    assert f"interrupted by {name}: stopped, temporary files removed" in res.stderr
    assert "Traceback" not in res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


# ---- postVM's own processes -------------------------------------------------------------------------------

def escaping_post_vm(box: Sandbox, status: int) -> str:
    """A postVM that leaves processes behind in every way a shell can: its own session (setsid), a double
    fork, SIGTERM/SIGHUP ignored; each runs a copy of sleep whose path names the sandbox. Then it exits."""
    sleeper = box.private / "sleeper"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
    sleeper.chmod(0o755)
    q = shlex.quote(str(sleeper))
    return (f"setsid {q} 600 </dev/null >/dev/null 2>&1 &\n"
            f"( setsid {q} 601 </dev/null >/dev/null 2>&1 & ) &\n"
            f"setsid sh -c \"trap '' TERM HUP INT; {q} 602; {q} 603\" </dev/null >/dev/null 2>&1 &\n"
            f"nohup {q} 604 </dev/null >/dev/null 2>&1 &\n"
            f"sleep 0.5\nexit {status}\n")


@pytest.mark.parametrize("status", [0, 3], ids=["postVM-succeeds", "postVM-fails"])
def test_post_vm_processes_in_their_own_session_die_with_the_build(status: int, sandbox: Sandbox,
                                                                    make_spec: SpecFactory) -> None:
    """A postVM that starts a process in its own session (setsid) left it running after the build."""
    res = run_build(sandbox, make_spec(postVM=escaping_post_vm(sandbox, status)))
    assert res.status == (0 if status == 0 else 1), res.stderr
    assert processes_mentioning(str(sandbox.private)) == []
    if status:
        assert f"build failed: postVM exited with status {status}" in res.stderr
        assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_post_vm_processes_die_with_an_interrupted_build(sandbox: Sandbox, make_spec: SpecFactory) -> None:
    started = sandbox.private / "post-started"
    post_vm = escaping_post_vm(sandbox, 0).replace("sleep 0.5\n", f"touch {shlex.quote(str(started))}\nsleep 600\n")

    def on_line(line: str, proc: subprocess.Popen[str]) -> None:
        if line.startswith("[makeDiskImage] postVM ..."):
            wait_for(started.exists, "postVM to start its processes")
            os.kill(proc.pid, signal.SIGTERM)

    res = run_build(sandbox, make_spec(postVM=post_vm), on_line)
    assert res.status == 143, res.stderr
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_post_vm_processes_die_with_the_build_as_nobody(sandbox: Sandbox, make_spec: SpecFactory,
                                                        fixture_spec: Path) -> None:
    """The same as an unprivileged build user: no privilege is needed to outlive the build's processes."""
    spec = sandbox.private / "spec.json"
    shutil.copy(make_spec(contents=[], postVM=escaping_post_vm(sandbox, 0)), spec)
    for d in (sandbox.tmpdir, sandbox.private):
        os.chmod(d, 0o777)
    cmd = ["runuser", "-u", "nobody", "--", "env", *(f"{k}={v}" for k, v in sandbox.env.items()),
           sys.executable, "-m", "builder", "build", str(spec), "--out", str(sandbox.out)]
    with readable_by_others(spec, sandbox.private / "sleeper", fixture_spec.parent / "closure-info" / "registration"):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert processes_mentioning(str(sandbox.private)) == []


# ---- the build under resource limits (ulimit in the builder's own process) -----------------------------------

# A build user's uid that no other process has: `ulimit -u` counts every process of the uid, and other tests'
# builds as nobody (or a CI run beside) made runuser itself fail with EAGAIN now and then.
LIMITED_UID = 30099


def run_limited(box: Sandbox, spec: Path, limits: str, as_build_user: bool = False) -> Outcome:
    """`python -m builder build` under the shell's `ulimit limits`, as LIMITED_UID when asked; no gate shims on PATH."""
    env = dict(box.env, PATH=box.env["MDI_TEST_REAL_PATH"])
    cmd = [sys.executable, "-m", "builder", "build", str(spec), "--out", str(box.out)]
    if as_build_user:
        for d in (box.tmpdir, box.private, box.private / "memory"):
            os.chmod(d, 0o777)
        cmd = ["setpriv", f"--reuid={LIMITED_UID}", f"--regid={LIMITED_UID}", "--clear-groups", "--",
               "env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    res = subprocess.run(["bash", "-c", f'ulimit {limits} && exec "$@"', "bash", *cmd], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return Outcome(res.returncode, res.stderr, res.stdout)


def test_no_room_for_threads_runs_the_steps_one_after_another(sandbox: Sandbox, fixture_spec: Path) -> None:
    """`ulimit -v 51200` left no room for a thread's stack: RuntimeError "can't start new thread" (a traceback).

    With 64 MiB stacks (`ulimit -s`, glibc's default thread stack size) no thread fits under the limit at all;
    with the usual 8 MiB one sometimes did, and the steps then ran side by side (the test failed 1 run in 5).
    """
    res = run_limited(sandbox, fixture_spec, "-s 65536 -v 51200")
    assert res.status == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "running the steps one after another" in res.stderr, res.stderr[-3000:]
    assert res.stdout == f"{sandbox.out / 'fixture.img'}\n"
    image = sandbox.out / "fixture.img"
    check = subprocess.run(["e2fsck", "-fn", f"{image}?offset={part_offset(image, 2)}"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert tree_listing(sandbox.tmpdir) == []


def test_a_process_limit_as_a_build_user_is_one_clear_line(sandbox: Sandbox, make_spec: SpecFactory,
                                                           fixture_spec: Path) -> None:
    """`ulimit -u 5` as nobody (here `-u 3` as a uid of its own): a traceback from builder/concurrent.py.
    Now a tool that cannot be started is one line naming the limit (exit 1)."""
    spec = sandbox.private / "spec.json"
    shutil.copy(make_spec(contents=[]), spec)
    with readable_by_others(spec, fixture_spec.parent / "closure-info" / "registration"):
        res = run_limited(sandbox, spec, "-u 3", as_build_user=True)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    # A uid of its own, so the limit bites the same way every run: three processes and threads are too few.
    assert res.status == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("build failed: ") and "ulimit -u" in last, res.stderr[-3000:]
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


def test_too_few_file_descriptors_is_named_and_leaves_nothing(sandbox: Sandbox, fixture_spec: Path) -> None:
    """`ulimit -n 8`: "Too many open files", and TMPDIR/mdi-*/mdi-*/root left behind (rmtree holds two
    descriptors per level)."""
    res = run_limited(sandbox, fixture_spec, "-n 8")
    assert res.status == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("build failed: [Errno 24] Too many open files") and "raise ulimit -n" in last, last
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)


@pytest.mark.parametrize("change", ["grown", "replaced"])
def test_a_store_file_changing_during_the_build_is_named(change: str, sandbox: Sandbox, make_spec: SpecFactory,
                                                         fixture_spec: Path) -> None:
    """A store file grown or replaced while mkfs ran: "estimate too low; please report" (or mkfs out of space).
    Now the build names the store path that changed."""
    with forged(f"changing-{change}") as top:
        top.mkdir()
        (top / "data").write_bytes(b"x" * 4096)
        os.chmod(top / "data", 0o444)
        spec = spec_with(make_spec, fixture_spec, [top], sandbox.private)
        sandbox.hold("mkfs.ext4", " -d ")
        grown = {"grown": 24 << 20, "replaced": 12 << 20}[change]

        def on_line(line: str, proc: subprocess.Popen[str]) -> None:
            if line.strip() == "[makeDiskImage] root filesystem (mkfs.ext4 -d) ...":
                wait_for(sandbox.held, "mkfs.ext4 -d to start")
                os.chmod(top, 0o755)
                if change == "grown":
                    with open(top / "data", "ab") as f:
                        f.write(os.urandom(grown))
                else:
                    (top / "new").write_bytes(os.urandom(grown))
                    os.replace(top / "new", top / "data")
                sandbox.release()

        res = run_build(sandbox, spec, on_line)
    assert res.status == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "please report" not in res.stderr, res.stderr[-3000:]
    assert (f"build failed: the store changed while the image was being built: '{top}' is not as when measured"
            in res.stderr), res.stderr[-3000:]
    assert_nothing_left(sandbox.private, sandbox.tmpdir, sandbox.out)
