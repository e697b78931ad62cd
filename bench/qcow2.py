"""`python -m bench.qcow2`: time qcow2-compressed, the builder's writer against `qemu-img convert -c`.

One raw image is made once (the builder's `prepare --out` of the closure, efi layout, outside the
timing); then every method converts that same file, in alternated runs with the page cache warm (the
raw image read before each run), each ending with `sync` inside its timing like the main bench:

- `qemu-img`: `qemu-img convert -f raw -O qcow2 -c` (nixpkgs' command, what the builder ran before);
- `qemu-img-W`: the same with `-W -m 16` (out-of-order writes: faster, but not reproducible; off by default);
- `ours`: `python -m builder convert` of a qcow2-compressed spec (builder/disk/qcow2.py), every CPU;
- `ours-1`: the same under `taskset -c 0`, so it deflates on one CPU.

Each method's first good output is checked (`qemu-img check`, `qemu-img compare` with the raw image) and
hashed on every run, so the table also shows whether a method gave the same bytes each time. Use
`--closure debian` (the default here): the synthetic closure's files are PRNG bytes and do not compress.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.digest import sha256

from .cli import parse_size, run_plan
from .closure import CLOSURE_KINDS, ensure_closure, remove_tree
from .machine import machine_facts
from .methods import Plan, builder_plan, compile_bytecode, spec_document, stat_shim

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
METHODS = ("qemu-img", "qemu-img-W", "ours", "ours-1")
DEFAULT_METHODS = ("qemu-img", "ours-1", "ours")


def method_steps(method: str, raw: Path, out: Path, spec: Path, python: str, src: Path) -> list[dict[str, Any]]:
    """The commands one run of a method times."""
    if method.startswith("qemu-img"):
        extra = ["-W", "-m", "16"] if method == "qemu-img-W" else []
        convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", *extra, str(raw), str(out / "nixos.qcow2")]
        return [{"name": "convert", "argv": convert}, {"name": "sync", "argv": ["sync"]}]
    argv = [python, "-m", "builder", "convert", str(spec), "--image", str(raw), "--out", str(out)]
    if method == "ours-1":
        argv = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *argv]
    return [{"name": "convert", "argv": argv, "env": {"PYTHONPATH": str(src)}, "cwd": str(src)},
            {"name": "sync", "argv": ["sync"]}]


def output_facts(raw: Path, image: Path, check: bool) -> dict[str, Any]:
    """Size and hash of an output; with check, what qemu-img check and compare say of it."""
    facts: dict[str, Any] = {"bytes": image.stat().st_size, "sha256": sha256(image)}
    if check:
        done = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
        report = json.loads(done.stdout) if done.stdout.strip() else {}
        facts.update(check_status=done.returncode, compressed_clusters=report.get("compressed-clusters"),
                     allocated_clusters=report.get("allocated-clusters"))
        facts["compare_status"] = subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(image)]).returncode
    return facts


def make_raw(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path]:
    """The raw image to convert (the builder's prepare of the closure) and a qcow2-compressed spec for it."""
    closure = ensure_closure(args.work, parse_size(args.size), 1, args.size, args.closure)
    as_root = os.geteuid() == 0
    shim, _ = stat_shim(args.builder_src, args.work)
    compile_bytecode(args.builder_src, args.python)  # the convert runs are timed as the Nix package runs
    plan = builder_plan(closure, scratch, args.python, args.builder_src, as_root, shim)
    result = run_plan(plan)
    if result.get("error"):
        raise SystemExit(f"making the raw image failed: {result['error']}")
    raw = scratch / "input.img"
    plan.image.rename(raw)
    spec = scratch / "convert-spec.json"
    doc = spec_document(closure, logical_store=as_root)
    spec.write_text(json.dumps({**doc, "format": "qcow2-compressed"}, indent=2) + "\n")
    return raw, spec


def summarise(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: medians of the successful runs, the first good run's checks, distinct outputs."""
    rows = []
    for m in methods:
        ok = [r for r in records if r["method"] == m and not r.get("error")]
        row: dict[str, Any] = {"method": m, "runs": len(ok),
                               "errors": [r["error"][:300] for r in records if r["method"] == m and r.get("error")]}
        if ok:
            walls = [r["wall"] for r in ok]
            row.update(wall=statistics.median(walls), wall_min=min(walls), wall_max=max(walls),
                       cpu=statistics.median([r["user"] + r["sys"] for r in ok]),
                       rss_mib=max(r["maxrss_kib"] for r in ok) / 1024,
                       load=statistics.median([r["load_before"] for r in ok]),
                       distinct=len({r["facts"]["sha256"] for r in ok}),
                       **next(r["facts"] for r in ok if "check_status" in r["facts"]))
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], machine: dict[str, str], config: dict[str, Any], raw_facts: dict[str, Any]
           ) -> str:
    """The results as markdown."""
    base = next((r for r in rows if r["method"] == "qemu-img" and "wall" in r), None)
    out = ["# qcow2-compressed: the builder's writer against qemu-img convert -c", "",
           "Generated by `python -m bench.qcow2`; raw data in the .json beside it.", "", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in machine.items()]
    out += ["", "## Method", "", f"- {config['closure']} closure of {config['size']}; {config['runs']} alternated "
            f"runs per method, medians (min-max); page cache warm; each run ends with `sync`",
            f"- input: the builder's raw efi image of the closure, {raw_facts['bytes'] / MiB:.0f} MiB, "
            f"{raw_facts['allocated'] / MiB:.0f} MiB allocated", "- CPU = user+sys of the method's processes, "
            "load = 1-min load average before each run (median): other work on the machine shows there", "",
            "| method | wall s (min-max) | CPU s | load | peak RSS MiB | output MiB | compressed / allocated clusters "
            "| qemu-img check | compare | distinct outputs | speed-up vs qemu-img -c (wall, CPU) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wall" not in r:
            out.append(f"| {r['method']} | failed: {'; '.join(r['errors'])[:200]} |" + " |" * 9)
            continue
        speed = (f"{base['wall'] / r['wall']:.2f}x, {base['cpu'] / r['cpu']:.2f}x" if base else "-")
        check = "clean" if r["check_status"] == 0 else f"status {r['check_status']}"
        out.append(
            f"| {r['method']} | {r['wall']:.2f} ({r['wall_min']:.2f}-{r['wall_max']:.2f}) | {r['cpu']:.2f} "
            f"| {r['load']:.1f} | {r['rss_mib']:.0f} | {r['bytes'] / MiB:.1f} "
            f"| {r['compressed_clusters']} / {r['allocated_clusters']} "
            f"| {check} "
            f"| {'identical' if r['compare_status'] == 0 else 'DIFFERENT'} | {r['distinct']} of {r['runs']} "
            f"| {speed} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Make the raw image, time the methods in alternated runs, print and write the table."""
    p = argparse.ArgumentParser(prog="python -m bench.qcow2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="closure size (default 1G)")
    p.add_argument("--closure", choices=CLOSURE_KINDS, default="debian", help="closure kind (default debian)")
    p.add_argument("--runs", type=int, default=3, help="alternated runs per method (default 3)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/var/tmp/mdi-bench")))
    p.add_argument("--out", type=Path, default=REPO / "bench/results-qcow2.md", help="results table (markdown)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the builder")
    p.add_argument("--builder-src", type=Path, default=REPO, help="directory holding the `builder` package to time")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods) or args.runs < 1:
        print(f"error: --methods: allowed {','.join(METHODS)}; --runs must be >= 1", file=sys.stderr)
        return 2
    scratch = args.work / "scratch" / "qcow2"
    remove_tree(scratch)
    scratch.mkdir(parents=True)
    try:
        raw, spec = make_raw(args, scratch)
        raw_facts = {"bytes": raw.stat().st_size, "allocated": raw.stat().st_blocks * 512}
        records: list[dict[str, Any]] = []
        checked: set[str] = set()  # methods whose output qemu-img has checked (the first good run's)
        for run in range(args.runs):
            for method in methods[run % len(methods):] + methods[:run % len(methods)]:
                out = scratch / f"out-{method}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                subprocess.run(["cat", str(raw)], stdout=subprocess.DEVNULL, check=True)
                result = run_plan_steps(method_steps(method, raw, out, spec, args.python, args.builder_src))
                record = {"method": method, "run": run, **result}
                if not result.get("error"):
                    record["facts"] = output_facts(raw, out / "nixos.qcow2", check=method not in checked)
                    checked.add(method)
                records.append(record)
                status = record.get("error") or (f"{record['wall']:.2f}s wall, {record['user'] + record['sys']:.2f}s "
                                                 f"cpu, load {record['load_before']:.1f}")
                print(f"run {run + 1}/{args.runs} {method:10s} {status}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        remove_tree(scratch)
    config = {"size": args.size, "closure": args.closure, "runs": args.runs, "methods": methods}
    machine = machine_facts(args.work, REPO)
    rows = summarise(records, methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "config": config, "raw": raw_facts, "records": records, "summary": rows}, indent=1) + "\n")
    text = render(rows, machine, config, raw_facts)
    args.out.write_text(text)
    print(text)
    print(f"written: {args.out} and {args.out.with_suffix('.json')}")
    return 0


def run_plan_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Time steps in a fresh bench.runner child (its rusage covers exactly them)."""
    return run_plan(Plan(steps, Path("/dev/null")))


if __name__ == "__main__":
    sys.exit(main())
