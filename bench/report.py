"""Medians, ratios within the run, the issue's targets (PASS/FAIL) and the markdown results table."""

from __future__ import annotations

import statistics
from typing import Any

from .reflink import LABEL as REFLINK

MiB = 1 << 20
ADDITIONAL = 512 * MiB
TARGET_SIZES = ("1G", "4G")  # where the builder/floor target applies
# bench --dirs: the same 20000 entries in one directory and spread over 100 (closure kinds in bench.closure)
DIRS_LABELS = {"20000 in one directory": "dirs-one", "20000 in 100 directories": "dirs-spread"}
DIRS_RATIO = 1.5  # one directory at most this many times the spread one
DEBIAN_REPART = 1.5  # a `debian` closure: builder at most this many times systemd-repart
REFLINK_FLOOR = 0.25  # issue 25: on reflink XFS, 4 GiB raw at most this many times the floor's time


def _median(values: list[float]) -> float:
    """Median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def _method_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the successful runs of one method, with the first run's image facts."""
    ok = [r for r in records if not r.get("error")]
    out: dict[str, Any] = {"runs": len(ok), "failures": len(records) - len(ok),
                           "errors": [r["error"][:500] for r in records if r.get("error")]}
    if not ok:
        return out
    walls = [r["wall"] for r in ok]
    out.update(
        wall=_median(walls), wall_min=min(walls), wall_max=max(walls),
        cpu=_median([r["user"] + r["sys"] for r in ok]),
        rss_mib=_median([r["maxrss_kib"] / 1024 for r in ok]),
        rss_max_mib=max(r["maxrss_kib"] / 1024 for r in ok),
        load=_median([r.get("load_before", float("nan")) for r in ok]),
        cpu_stall=_median([r.get("cpu_stall", float("nan")) for r in ok]),
        facts=next((r["facts"] for r in ok if r["facts"]["fsck_ok"] is not None), ok[0]["facts"]),
    )
    if "output" in ok[0]:
        out["output"] = ok[0]["output"]
    if all("xfs_used" in r for r in ok):  # --reflink: the XFS holding store and output, before and after each build
        used = [r["xfs_used"] for r in ok]
        out["xfs_used"] = {"before": _median([u["before"] for u in used]), "after": _median([u["after"] for u in used]),
                           "growth": _median([u["after"] - u["before"] for u in used]),
                           "shared": _median([u["shared"] for u in used])}
    out["said"] = list(dict.fromkeys(line for r in ok for line in r.get("said", [])))
    steps: dict[str, list[float]] = {}
    for r in ok:
        for name, seconds in r["steps"]:
            steps.setdefault(name, []).append(seconds)
    out["steps"] = {name: _median(v) for name, v in steps.items()}
    return out


def summarise(sizes: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per size: each method's medians, the ratios between them, and the auto-size numbers."""
    result: dict[str, Any] = {}
    for size in sizes:
        per = {m: _method_summary([r for r in size["records"] if r["method"] == m]) for m in methods}
        wall = {m: s["wall"] for m, s in per.items() if "wall" in s}
        cpu = {m: s["cpu"] for m, s in per.items() if "cpu" in s}
        ratios, cpu_ratios = {}, {}
        for a, b in (("builder", "floor"), ("builder", "repart"), ("seed", "builder"), ("seed", "floor"),
                     ("repart", "floor")):
            if a in wall and b in wall:
                ratios[f"{a}/{b}"] = wall[a] / wall[b]
                cpu_ratios[f"{a}/{b}"] = cpu[a] / cpu[b]
        closure = size["manifest"]["counts"]["du_bytes"]
        result[size["label"]] = {"methods": per, "ratios": ratios, "cpu_ratios": cpu_ratios, "closure_bytes": closure,
                                 "free_window": [ADDITIONAL, ADDITIONAL + max(16 * MiB, closure // 50)]}
    return result


def targets(summary: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """The issue's targets as (target, size, measured, passed); None when it cannot be judged."""
    rows: list[tuple[str, str, str, bool | None]] = []
    builder_rss: list[tuple[str, float]] = []
    per_gib: list[tuple[str, float]] = []
    cpu_per_gib: list[tuple[str, float]] = []
    for label, s in summary.items():
        b = s["methods"].get("builder", {})
        r = s["ratios"]
        cr = s["cpu_ratios"]
        if "builder/floor" in r:
            rows.append(("builder wall <= 1.10x floor" + ("" if label in TARGET_SIZES else " (info only)"), label,
                         f"{r['builder/floor']:.2f}x", r["builder/floor"] <= 1.10 if label in TARGET_SIZES else None))
            rows.append(("  cross-check on CPU time (insensitive to other load)", label,
                         f"{cr['builder/floor']:.2f}x", cr["builder/floor"] <= 1.10 if label in TARGET_SIZES else None))
        if label.endswith(f" {REFLINK}") and "builder/floor" in r:
            judged = label == f"4G {REFLINK}"
            rows.append((f"reflink XFS: builder wall <= {REFLINK_FLOOR}x floor (issue 25)" + ("" if judged else
                         " (info only)"), label, f"{r['builder/floor']:.2f}x",
                         r["builder/floor"] <= REFLINK_FLOOR if judged else None))
        if label.endswith(" debian") and "builder/repart" in r:
            rows.append((f"builder wall <= {DEBIAN_REPART}x systemd-repart (big directories)", label,
                         f"{r['builder/repart']:.2f}x", r["builder/repart"] <= DEBIAN_REPART))
        if label in TARGET_SIZES and "builder/repart" in r:
            rows.append(("builder wall <= 1.00x systemd-repart", label, f"{r['builder/repart']:.2f}x",
                         r["builder/repart"] <= 1.00))
        if "seed/builder" in r:
            rows.append(("builder >= 2.5x faster than the seed", label, f"{r['seed/builder']:.2f}x",
                         r["seed/builder"] >= 2.5))
            rows.append(("  cross-check on CPU time", label, f"{cr['seed/builder']:.2f}x", cr["seed/builder"] >= 2.5))
        if "facts" not in b:
            if "builder" in s["methods"]:
                rows.append(("builder ran", label, "failed: " + "; ".join(b.get("errors", []))[:200], False))
            continue
        f = b["facts"]
        if not (label.endswith(" debian") or label in DIRS_LABELS):
            builder_rss.append((label, b["rss_max_mib"]))
        rows.append(("builder peak memory < 200 MiB", label, f"{b['rss_max_mib']:.0f} MiB", b["rss_max_mib"] < 200))
        free = f["fs_free_blocks"] * f["fs_block_size"]
        lo, hi = s["free_window"]
        rows.append((f"free space in [{lo // MiB}, {hi // MiB}] MiB", label, f"{free / MiB:.1f} MiB",
                     lo <= free <= hi))
        if f["nonzero"] > 0:
            ratio = f["allocated"] / f["nonzero"]
            rows.append(("image sparse: allocated <= 1.05x data written", label,
                         f"{f['allocated'] / MiB:.0f} / {f['nonzero'] / MiB:.0f} MiB = {ratio:.3f}", ratio <= 1.05))
        if label.endswith(" debian") or label in DIRS_LABELS:
            continue  # the series below compare the synthetic sizes with one another
        per_gib.append((label, b["wall"] / (s["closure_bytes"] / (1 << 30))))
        cpu_per_gib.append((label, b["cpu"] / (s["closure_bytes"] / (1 << 30))))
    one, spread = (summary.get(label, {}).get("methods", {}).get("builder", {}) for label in DIRS_LABELS)
    if "wall" in one and "wall" in spread:
        rows.append((f"one directory of 20000 <= {DIRS_RATIO}x 100 of 200 (builder wall)", "dirs",
                     f"{one['wall'] / spread['wall']:.2f}x", one["wall"] / spread["wall"] <= DIRS_RATIO))
        rows.append(("  cross-check on CPU time", "dirs", f"{one['cpu'] / spread['cpu']:.2f}x",
                     one["cpu"] / spread["cpu"] <= DIRS_RATIO))
    if len(builder_rss) >= 2:
        lo_rss, hi_rss = builder_rss[0][1], builder_rss[-1][1]
        rows.append(("builder peak memory not growing with the closure", "all",
                     " -> ".join(f"{lbl}: {v:.0f}" for lbl, v in builder_rss) + " MiB", hi_rss <= 1.25 * lo_rss))
    for name, series in (("cost linear: builder wall s/GiB does not grow (15% noise)", per_gib),
                         ("  cross-check on CPU s/GiB", cpu_per_gib)):
        if len(series) >= 2:
            grows = all(series[i][1] <= 1.15 * series[i - 1][1] for i in range(1, len(series)))
            rows.append((name, "all", " -> ".join(f"{lbl}: {v:.1f}" for lbl, v in series) + " s/GiB", grows))
    return rows


def _fmt_method(name: str, s: dict[str, Any]) -> str:
    """One table row."""
    if "facts" not in s:
        return f"| {name} | failed ({s['failures']}x): {'; '.join(s['errors'])[:160]} |" + " |" * 11
    f = s["facts"]
    free = f["fs_free_blocks"] * f["fs_block_size"]
    used_inodes = f["fs_inodes"] - f["fs_free_inodes"]
    fsck = {True: "clean", False: "ERRORS", None: "-"}[f["fsck_ok"]]
    return (f"| {name} | {s['wall']:.2f} ({s['wall_min']:.2f}-{s['wall_max']:.2f}) | {s['cpu']:.2f} "
            f"| {s['cpu_stall']:.0%} | {s['load']:.1f} | {s['rss_max_mib']:.0f} "
            f"| {f['apparent'] / MiB:.0f} | {f['allocated'] / MiB:.0f} "
            f"| {f['nonzero'] / MiB:.0f} | {f['root_size'] / MiB:.0f} | {free / MiB:.1f} "
            f"| {used_inodes} | {fsck} |")


def _xfs_section(size: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """--reflink: how the XFS was made, and what each method's build added to it (medians): sharing the
    store's blocks shows as growth by the image's metadata only and data extents flagged shared."""
    if "xfs" not in size:
        return []
    data = size["manifest"]["counts"]["file_bytes"]
    out = ["XFS holding store copy and output: " + "; ".join(f"{k} {v}" for k, v in size["xfs"].items()) + ".", "",
           "| method | XFS used before MiB | after MiB | growth MiB | image on disk MiB | of it shared MiB "
           "| growth / closure file data |", "|---|---|---|---|---|---|---|"]
    for m, ms in s["methods"].items():
        u = ms.get("xfs_used")
        if not u:
            continue
        on_disk = ms["output"]["allocated"] if ms.get("output") else ms["facts"]["allocated"]
        out.append(f"| {m} | {u['before'] / MiB:.1f} | {u['after'] / MiB:.1f} | {u['growth'] / MiB:.1f} "
                   f"| {on_disk / MiB:.1f} | {u['shared'] / MiB:.1f} | {u['growth'] / max(1, data):.2f} |")
    return [*out, ""]


def render(machine: dict[str, str], config: dict[str, Any], sizes: list[dict[str, Any]],
           summary: dict[str, Any]) -> str:
    """The results as markdown: machine, method, per-size tables, ratios, auto size and targets."""
    out = ["# makeDiskImage benchmark results", "",
           "Generated by `bench/run` (`python -m bench`); raw data in `results.json`.", "", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in machine.items()]
    out += ["", "## Method", "",
            f"- sizes {config['sizes']}, {config['runs']} alternated runs per method (order rotated each run; "
            f"medians shown with min-max), methods {', '.join(config['methods'])}",
            f"- format: {config.get('format', 'raw')} (for qcow2 and qcow2-compressed the floor and repart add one "
            "`qemu-img convert` of their raw image on disk, `-c` for compressed; the builder converts itself)",
            f"- closure: {config.get('closure', 'synthetic')} (synthetic: PRNG file contents, incompressible; "
            "debian: this machine's ELF and text files, bench/debian_closure.py)"
            + (f"; then `debian` closures of {config['debian_sizes']} (big directories: the debian closure's "
               "/nix/store and its biggest directory)" if config.get("debian_sizes") else "")
            + ("; then 20000 files in one directory and in 100 of 200 (--dirs)" if config.get("dirs") else ""),
            f"- page cache: `{config['cache']}` before every timed run "
            "(warm: the whole tree read once, so every method reads it from memory; drop: sync + drop_caches)",
            "- every method ends with `sync` inside its timing, so data still in the page cache "
            "(images, the seed's staging copy) is written to disk and counted; scratch is deleted afterwards",
            f"- seed staging on {config['seed_staging']}; CPU = user+sys of the method's processes "
            "(kernel loop-device and writeback threads are not included, which flatters repart and the seed)",
            "- peak RSS = largest ru_maxrss among the method's processes (worst run)",
            "- CPU stall = share of the run's wall time in which some task waited for a CPU (PSI "
            "/proc/pressure/cpu), load = 1-min load average at its start: other work on the machine shows "
            "there, and CPU-time ratios are given beside wall-time ratios because they are insensitive to it",
            "- layout: efi (ESP 8 MiB-256 MiB, ext4 root), additionalSpace 512M; the floor and repart get the "
            "builder's disk size (repart grown by 10% steps of the tree when its copy does not fit)"]
    if config.get("reflink"):
        out.append("- --reflink: each closure copied (untimed) onto a fresh XFS (`mkfs.xfs -m reflink=1` in a sparse "
                   "file in the work dir, loop-mounted), which also holds every method's scratch and output; XFS "
                   "used space (statvfs) read before each build and after it (its steps end with sync); shared = "
                   "the image's extents flagged shared (filefrag -v)")
    out += [f"- skipped: {reason}" for reason in config.get("skipped", [])]
    out.append("")
    for size in sizes:
        label = size["label"]
        s = summary[label]
        c = size["manifest"]["counts"]
        out += [f"## {label} closure", "",
                f"{size['manifest']['store_paths']} store paths, {c['files']} file names ({c['extra_links']} of them "
                f"extra hard links to {c['hardlinked_inodes']} inodes), {c['dirs']} directories, {c['symlinks']} "
                f"symlinks, {c['executables']} executables, {c['large_files']} files >= 1 MiB; "
                f"{c['file_bytes'] / MiB:.0f} MiB of file data, {c['du_bytes'] / MiB:.0f} MiB allocated (du), "
                f"{c['inodes']} distinct inodes.", "",
                "| method | wall s (min-max) | CPU s | CPU stall | load | peak RSS MiB | image MiB | on disk MiB "
                "| non-zero MiB | root fs MiB | root free MiB | used inodes | e2fsck -fn |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [_fmt_method(m, ms) for m, ms in s["methods"].items()]
        out += ["", "Ratios (medians of this run), wall: " +
                ", ".join(f"{k} = {v:.2f}" for k, v in s["ratios"].items()) + "; CPU time: " +
                ", ".join(f"{k} = {v:.2f}" for k, v in s["cpu_ratios"].items()), ""]
        outputs = [f"{m} {ms['output']['apparent'] / MiB:.0f} MiB ({ms['output']['allocated'] / MiB:.0f} on disk)"
                   for m, ms in s["methods"].items() if ms.get("output")]
        if outputs:
            out += [f"Output files ({config.get('format')}): " + ", ".join(outputs) + "; the table's image columns "
                    "are the raw image each converted from (the builder's: read back from its output)", ""]
        out += _xfs_section(size, s)
        for m, ms in s["methods"].items():
            if ms.get("steps"):
                out.append(f"- {m} steps (median s): " +
                           ", ".join(f"{k} {v:.2f}" for k, v in ms["steps"].items()))
            if ms.get("said"):
                out.append(f"- {m} log (every run's lines but its steps, once each): " +
                           " / ".join(f"`{line}`" for line in ms["said"]))
        f = size["seed_formula"]
        b = s["methods"].get("builder", {}).get("facts")
        sd = s["methods"].get("seed", {}).get("facts")
        out += ["", f"Auto size: free-space window [{s['free_window'][0] // MiB}, {s['free_window'][1] // MiB}] MiB "
                "(additionalSpace .. + max(16 MiB, 2% of the closure's du))."]
        if b:
            out.append(f"- builder: disk {b['apparent'] / MiB:.0f} MiB, root fs {b['root_size'] / MiB:.0f} MiB, "
                       f"free {b['fs_free_blocks'] * b['fs_block_size'] / MiB:.1f} MiB "
                       f"({b['fs_reserved_blocks'] * b['fs_block_size'] / MiB:.1f} MiB of it root-reserved)")
        out.append(f"- seed formula on the same tree: disk {f['disk'] / MiB:.0f} MiB (closure usage "
                   f"{f['usage'] / MiB:.0f} MiB incl. 2 blocks x {f['inodes']} inodes, fudge {f['fudge'] / MiB:.0f} "
                   f"MiB), root fs about {f['root_fs'] / MiB:.0f} MiB")
        if sd:
            out.append(f"- seed's own image (formula on its staged copy): disk {sd['apparent'] / MiB:.0f} MiB, free "
                       f"{sd['fs_free_blocks'] * sd['fs_block_size'] / MiB:.1f} MiB")
        rp = [r for r in size["records"] if r["method"] == "repart"]
        if rp:
            asked = max(r["repart_root_request"] for r in rp)
            out.append(f"- repart root partition requested: {asked / MiB:.0f} MiB "
                       f"({asked / max(1, size['manifest']['counts']['du_bytes']):.2f}x the tree's du)")
        out.append("")
    out += ["## Targets (issue 6)", "", "| target | size | measured | result |", "|---|---|---|---|"]
    for name, label, measured, passed in targets(summary):
        out.append(f"| {name} | {label} | {measured} | {'-' if passed is None else 'PASS' if passed else 'FAIL'} |")
    out += ["", "Notes: store path hashes are random but well-formed; narHash/narSize are real (computed from the "
            "tree), so the registration passes `nix-store --verify --check-contents`.", ""]
    return "\n".join(out)
