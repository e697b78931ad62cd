"""`python -m bench`: generate the closures, time every method in alternated runs, write the results."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .closure import CLOSURE_KINDS, Closure, ensure_closure, remove_tree
from .machine import machine_facts
from .measure import image_facts
from .methods import (
    BOOT_MIB,
    FORMATS,
    METHODS,
    ROOT_ONLY,
    Plan,
    builder_plan,
    compile_bytecode,
    ensure_loop_nodes,
    floor_plan,
    repart_plan,
    seed_plan,
    stat_shim,
)
from .reflink import LABEL as REFLINK_LABEL
from .reflink import ReflinkUnavailable, copy_closure, mounted_xfs, preflight, shared_bytes, terminate, used_bytes
from .report import DIRS_LABELS, render, summarise
from .seedsize import seed_auto_size

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'256M', '1G', '4G' -> bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def _parser() -> argparse.ArgumentParser:
    """Command line options."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--sizes", default="256M,1G,4G", help="closure sizes to generate and time (default 256M,1G,4G)")
    p.add_argument("--runs", type=int, default=3, help="alternated runs per method and size; medians are reported")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/var/tmp/mdi-bench")),
                   help="work dir: cached closures and scratch space (default $BENCH_WORK or /var/tmp/mdi-bench)")
    p.add_argument("--cache", choices=("warm", "drop"), default="warm",
                   help="before every timed run: read the whole tree (warm) or sync and drop the page cache (drop)")
    p.add_argument("--seed-staging", choices=("disk", "tmpfs"), default="disk",
                   help="where the seed's method stages its copy of the closure (disk: in --work; tmpfs: /dev/shm)")
    p.add_argument("--seed", type=int, default=1, help="PRNG seed of the closure generator")
    p.add_argument("--closure", choices=CLOSURE_KINDS, default="synthetic",
                   help="synthetic: PRNG file contents (incompressible); debian: this machine's ELF and text files "
                        "(bench/debian_closure.py), which compress like a real closure")
    p.add_argument("--debian-sizes", default="1G",
                   help="sizes of `debian` closures timed after --sizes' (one 16631-file directory and 1464 store "
                        "paths at 1G: real closures' big directories), reported as e.g. '1G debian'; '' for none")
    p.add_argument("--dirs", action="store_true",
                   help="also time 20000 files in one directory against the same files in 100 directories of 200 "
                        "(closures dirs-one and dirs-spread): populating a directory must cost what its entries do")
    p.add_argument("--format", choices=FORMATS, default="raw",
                   help="the image format: raw; qcow2 or qcow2-compressed (the floor and repart then add one "
                        "`qemu-img convert` of their raw image, -c for compressed)")
    p.add_argument("--reflink", action="store_true",
                   help="time every closure on an XFS with reflink made in a file in --work and loop-mounted (root "
                        "only): closure copy and every method's output there, XFS used space before and after each "
                        "build reported; labels '<size> reflink-xfs'; skipped with the reason printed where it "
                        "cannot be made")
    p.add_argument("--out", type=Path, default=None,
                   help="results table (markdown; default bench/results.md, bench/results-reflink.md with --reflink)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the builder")
    p.add_argument("--builder-src", type=Path, default=REPO,
                   help="directory holding the `builder` package to time (default: this checkout)")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                   help="only rewrite the markdown (--out) from an earlier run's results.json")
    return p


def prepare_cache(closure: Closure, mode: str) -> None:
    """Make the page cache state the same before every timed run."""
    subprocess.run(["sync"], check=True)
    if mode == "drop":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        subprocess.run(f"find {closure.root!s} -type f -print0 | xargs -0 -r cat > /dev/null", shell=True,
                       check=True)


def run_plan(plan: Plan) -> dict[str, Any]:
    """Time a plan in a fresh child (bench.runner), so its rusage covers exactly these commands.

    The child leads its own process group: when the bench is interrupted, the whole method is stopped
    (SIGTERM, then SIGKILL after 10 s) before the bench cleans up, so nothing keeps writing into its scratch.
    """
    with subprocess.Popen([sys.executable, "-m", "bench.runner"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True) as child:
        try:
            stdout, stderr = child.communicate(json.dumps(plan.steps))
        except BaseException:
            stop_group(child)
            raise
    if not stdout.strip():
        return {"error": f"runner failed: {stderr[-2000:]}"}
    result: dict[str, Any] = json.loads(stdout)
    return result


def stop_group(child: subprocess.Popen[str]) -> None:
    """Stop a runner and every process of its group: SIGTERM (the builder cleans up on it), SIGKILL to whatever
    is left after 10 s; returns when the group is gone (or after 15 s)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        try:
            os.killpg(child.pid, sig)
            while time.monotonic() < deadline:
                child.poll()  # reap the leader; its children go to init, which reaps them
                os.killpg(child.pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            return


def cleanup(scratch: Path) -> None:
    """Undo what a failed run may leave: mounts under scratch, loop devices on its images, files."""
    mnt = scratch / "mnt"
    if mnt.is_dir() and subprocess.run(["mountpoint", "-q", str(mnt)]).returncode == 0:
        subprocess.run(["umount", str(mnt)])
    loops = subprocess.run(["losetup", "-nO", "NAME,BACK-FILE", "-l"], capture_output=True, text=True).stdout
    for line in loops.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith(str(scratch)):
            subprocess.run(["losetup", "-d", parts[0]])
    remove_tree(scratch)


def time_method(method: str, closure: Closure, work: Path, args: argparse.Namespace,
                ref: dict[str, int], measure_all: bool) -> dict[str, Any]:
    """One timed run of one method, then its image measured (outside the timing) and removed."""
    scratch = work / "scratch" / method
    cleanup(scratch)
    scratch.mkdir(parents=True)
    staging = (Path("/dev/shm/mdi-bench-staging") if args.seed_staging == "tmpfs" else work / "staging")
    remove_tree(staging)
    if method == "builder":
        plan = builder_plan(closure, scratch, args.python, args.builder_src, os.geteuid() == 0, args.stat_shim,
                            args.format)
    elif method == "floor":
        plan = floor_plan(closure, scratch, ref["disk"], ref["root_offset"], ref["root_size"], args.format)
    elif method == "repart":
        plan = repart_plan(closure, scratch, ref["repart_disk"], ref["repart_root"], args.format)
    else:
        plan = seed_plan(closure, scratch, staging, REPO)
    if method in ROOT_ONLY:
        ensure_loop_nodes()
    prepare_cache(closure, args.cache)
    used_before = used_bytes(work) if args.reflink else 0
    result = run_plan(plan)
    record: dict[str, Any] = {"method": method, **result}
    if args.reflink:  # what the build added to the filesystem holding the store (its steps end with sync)
        record["xfs_used"] = {"before": used_before, "after": used_bytes(work)}
        if result.get("error") is None:
            record["xfs_used"]["shared"] = shared_bytes(plan.output or plan.image)
    if result.get("error") is None and plan.output is not None:
        st = plan.output.stat()
        record["output"] = {"apparent": st.st_size, "allocated": st.st_blocks * 512}
        if not plan.image.exists():  # the builder's: read back into a raw image to measure, outside the timing
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(plan.output), str(plan.image)], check=True)
    if result.get("error") is None:
        try:
            facts = image_facts(plan.image, fsck=measure_all, scan=measure_all, offset=plan.root_offset)
            record["facts"] = facts.as_dict()
        except (OSError, subprocess.CalledProcessError, RuntimeError, KeyError) as exc:
            record["error"] = f"measuring {plan.image}: {exc}"
    if method == "repart":
        record["repart_root_request"] = ref["repart_root"]
    cleanup(scratch)
    remove_tree(staging)
    return record


def bench_size(label: str, args: argparse.Namespace, methods: list[str], kind: str | None = None,
               size: str | None = None) -> dict[str, Any] | None:
    """Generate (or reuse) one closure (of kind, default --closure; size, default the label) and time every
    method on it in alternated runs; with --reflink on a fresh XFS holding a copy of it (None when the XFS
    cannot be made here: the reason is printed and kept in args.skipped)."""
    t0 = time.monotonic()
    size = size or label
    closure = ensure_closure(args.work, parse_size(size), args.seed, size, kind or args.closure)
    print(f"== {label}: closure ready in {time.monotonic() - t0:.1f}s "
          f"({closure.manifest['store_paths']} store paths, {closure.manifest['counts']['inodes']} inodes)",
          flush=True)
    if not args.reflink:
        return time_closure(label, closure, args.work, args, methods)
    label = f"{label} {REFLINK_LABEL}"
    du = closure.manifest["counts"]["du_bytes"]
    need, free = 3 * du + 2 * GiB, shutil.disk_usage(args.work).free
    if free < need:
        skip_reflink(args, label, f"needs about {need / GiB:.1f} GiB free in {args.work} for the closure's "
                                  f"copy and an image, has {free / GiB:.1f} GiB")
        return None
    try:
        with mounted_xfs(args.work, 4 * du + 4 * GiB) as xfs:
            print(f"   {label}: XFS on {xfs.device} mounted at {xfs.mount} in {xfs.facts['made and mounted in']} "
                  f"(loop direct I/O {xfs.facts['loop direct I/O']})", flush=True)
            t0 = time.monotonic()
            placed = copy_closure(closure, xfs.mount / "closures")
            copied = time.monotonic() - t0
            print(f"   {label}: closure copied onto the XFS in {copied:.1f}s", flush=True)
            xfs.facts["closure copied in"] = f"{copied:.1f}s (cp -a, once per size and bench run, untimed)"
            result = time_closure(label, placed, xfs.mount, args, methods)
            result["xfs"] = xfs.facts
            return result
    except ReflinkUnavailable as exc:
        skip_reflink(args, label, str(exc))
        return None


def skip_reflink(args: argparse.Namespace, label: str, reason: str) -> None:
    """Say why a reflink run cannot happen, on stderr and in the results."""
    print(f"reflink run skipped ({label}): {reason}", file=sys.stderr, flush=True)
    args.skipped.append(f"{label}: {reason}")


def time_closure(label: str, closure: Closure, work: Path, args: argparse.Namespace,
                 methods: list[str]) -> dict[str, Any]:
    """Time every method on one closure in alternated runs, with scratch space in work."""
    formula = seed_auto_size(closure.root, BOOT_MIB * MiB, 512 * MiB)
    # the floor and repart get the builder's sizes; until (or unless) the builder ran, the seed formula's
    ref = {"disk": formula["disk"], "root_offset": BOOT_MIB * MiB, "root_size": formula["root_fs"]}
    records: list[dict[str, Any]] = []
    for run in range(args.runs):
        order = methods[run % len(methods):] + methods[:run % len(methods)]
        if run == 0 and "builder" in order:
            order.remove("builder")
            order.insert(0, "builder")
        for method in order:
            if method == "repart" and "repart_root" not in ref:
                ref["repart_disk"], ref["repart_root"] = ref["disk"], ref["root_size"]
            record = time_method(method, closure, work, args, ref, measure_all=(run == 0))
            while method == "repart" and run == 0 and record.get("error") and \
                    ref["repart_root"] < 3 * closure.manifest["counts"]["du_bytes"]:
                # hand sizing: grow the root by 10% of the tree until repart's copy fits
                print(f"   repart failed with root {ref['repart_root'] // MiB} MiB; growing it", flush=True)
                ref["repart_root"] += closure.manifest["counts"]["du_bytes"] // 10 // MiB * MiB
                ref["repart_disk"] += closure.manifest["counts"]["du_bytes"] // 10 // MiB * MiB
                record = time_method(method, closure, work, args, ref, measure_all=True)
            record["run"] = run
            records.append(record)
            status = "FAILED: " + record["error"][-1500:] if record.get("error") else \
                f"{record['wall']:.2f}s wall, {record['user'] + record['sys']:.2f}s cpu, " \
                f"{record['maxrss_kib'] / 1024:.0f} MiB peak"
            print(f"   run {run + 1}/{args.runs} {method:8s} {status}", flush=True)
            if method == "builder" and run == 0 and not record.get("error"):
                f = record["facts"]
                ref.update(disk=f["apparent"], root_offset=f["root_offset"], root_size=f["root_size"])
    return {"label": label, "manifest": closure.manifest, "seed_formula": formula, "records": records,
            "ref": ref}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results.md and results.json."""
    args = _parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as exceptions: the running method is stopped, the XFS removed
        signal.signal(sig, terminate)
    args.out = args.out or REPO / ("bench/results-reflink.md" if args.reflink else "bench/results.md")
    if args.render:
        data = json.loads(args.render.read_text())
        methods = data["config"]["methods"]
        args.out.write_text(render(data["machine"], data["config"], data["sizes"], summarise(data["sizes"], methods)))
        print(f"written: {args.out}")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.runs < 1:
        print(f"error: --methods {args.methods!r}: allowed {', '.join(METHODS)}; --runs must be >= 1",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        dropped = [m for m in methods if m in ROOT_ONLY]
        if dropped:
            print(f"note: not root, so {', '.join(dropped)} (loop devices and mount) are skipped", file=sys.stderr)
        methods = [m for m in methods if m not in ROOT_ONLY]
    args.skipped = []
    if args.reflink and (reason := preflight()):
        print(f"reflink run skipped: {reason}", file=sys.stderr, flush=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(args.work, REPO)
    commit_file = args.builder_src / "COMMIT"  # written by whoever snapshots a builder to time
    facts["builder timed"] = (f"{args.builder_src} (snapshot of {commit_file.read_text().strip()})"
                              if commit_file.exists() else f"{args.builder_src} at the repo commit")
    args.stat_shim, facts["stat shim"] = stat_shim(args.builder_src, args.work)
    facts["builder bytecode"] = compile_bytecode(args.builder_src, args.python)
    config = {"builder_src": str(args.builder_src), "sizes": args.sizes, "runs": args.runs, "methods": methods,
              "format": args.format,
              "debian_sizes": args.debian_sizes, "dirs": args.dirs,
              "cache": args.cache, "seed_staging": args.seed_staging, "seed": args.seed, "closure": args.closure,
              "work": str(args.work), "reflink": args.reflink, "skipped": args.skipped}
    timed = [bench_size(label.strip(), args, methods) for label in args.sizes.split(",") if label.strip()]
    timed += [bench_size(f"{size.strip()} debian", args, methods, "debian", size.strip())
              for size in args.debian_sizes.split(",") if size.strip() and args.closure != "debian"]
    if args.dirs:
        timed += [bench_size(label, args, methods, kind, "20000") for label, kind in DIRS_LABELS.items()]
    sizes = [s for s in timed if s is not None]
    summary = summarise(sizes, methods)
    text = render(facts, config, sizes, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": facts, "config": config, "sizes": sizes, "summary": summary}, indent=1) + "\n")
    print(text)
    print(f"written: {args.out} and {args.out.with_suffix('.json')}")
    return 0
