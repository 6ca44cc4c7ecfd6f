"""Load on the published warehouse: N concurrent SQL readers while a refresh publishes a new version.

    python benchmarks/readers.py                    # 20 readers, a 120-unit study, wave 2 = +40 units
    python benchmarks/readers.py --readers 5 --out /tmp/readers.md

What it does, all on this machine (files only; no server, no network):

1. writes a small study (the demo process on a procedural scene, 32 px chips) and runs wave 1
   (`eocausal run`), which publishes <workdir>/published/warehouse.duckdb;
2. starts N reader processes. Each is a SQL consumer as a BI tool would be: in a bounded loop
   (until told to stop, or --max-seconds) it opens the published file read-only (a fresh, short
   connection), runs three queries (the estimate history by version, the latest-version view, the
   analysis units), closes it, waits --think-ms, and records every error, every version it saw
   with its row and key counts, and each query's latency;
3. runs the refresh, `eocausal run` on wave 2 (the survey plus new units: new chips, embeddings,
   estimates and a new published copy swapped in), lets the readers go on until each has read the
   new version (bounded), then stops them.

It reports errors (must be 0), the versions seen and whether every read of each was complete (all
the version's rows, each key once), and the p50/p99 latency of the queries and of a whole
connect-query-close cycle, and writes the table with the command to benchmarks/results/readers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERIES = {
    "history": """select estimate_version, count(*) as n_rows,
                         count(distinct estimand || '/' || estimator || '/' || feature_set || '/' ||
                                        coalesce(outcome_source, '')) as n_keys
                  from marts.effect_estimates group by 1""",
    "latest": "select estimate_version, count(*) from marts.effect_estimates_latest group by 1",
    "units": "select count(*) from marts.analysis_units",
}


# -- one reader (a process) ---------------------------------------------------------------------


def reader(db: str, stop_file: str, result_file: str, max_seconds: float, think_ms: float) -> None:
    import duckdb

    errors: list[str] = []
    latency: dict[str, list[float]] = {name: [] for name in (*QUERIES, "cycle")}
    shapes: dict[str, int] = {}  # "version:n_rows:n_keys" -> reads that saw it
    latest: dict[str, int] = {}
    started = time.monotonic()
    cycles = 0
    while not os.path.exists(stop_file) and time.monotonic() - started < max_seconds:
        t0 = time.perf_counter()
        try:
            with duckdb.connect(db, read_only=True) as con:
                rows = {}
                for name, sql in QUERIES.items():
                    q0 = time.perf_counter()
                    rows[name] = con.execute(sql).fetchall()
                    latency[name].append(time.perf_counter() - q0)
        except Exception as exc:  # every failure counts: a consumer must never see one
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            latency["cycle"].append(time.perf_counter() - t0)
            for version, n_rows, n_keys in rows["history"]:
                key = f"{version}:{n_rows}:{n_keys}"
                shapes[key] = shapes.get(key, 0) + 1
            for version, n_rows in rows["latest"]:
                key = f"{version}:{n_rows}"
                latest[key] = latest.get(key, 0) + 1
            progress = Path(result_file + ".versions")
            progress.with_suffix(".tmp").write_text(json.dumps(sorted(v for v, _, _ in rows["history"])))
            progress.with_suffix(".tmp").replace(progress)
        cycles += 1
        time.sleep(think_ms / 1000)
    Path(result_file).write_text(json.dumps({"cycles": cycles, "errors": errors, "latency": latency,
                                             "shapes": shapes, "latest": latest}))


# -- the benchmark -----------------------------------------------------------------------------


def _eocausal() -> str:
    return str(Path(sys.executable).with_name("eocausal"))


def build_study(root: Path, n_units: int, n_new: int, seed: int) -> tuple[Path, Path]:
    """Wave 1 (study.yaml) and the wave-2 survey (wave 1 plus n_new units)."""
    import pandas as pd
    import yaml

    from eocausal.simulate import write_demo_study, write_procedural_scene

    scene = write_procedural_scene(root / "scene_src" / "scene.tif", width=640, height=560, seed=seed)
    study_path = write_demo_study(root / "study", n_units=n_units, seed=seed, scene=scene, chip_size_px=32)
    doc = yaml.safe_load(study_path.read_text())
    doc["embedding"].update({"n_features": 132, "batch_size": 128})
    doc["analysis"].update({"estimators": ["difference_in_means", "ipw", "aipw"],
                            "feature_sets": ["none", "tabular+image"], "folds": 3, "image_components": 16})
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    extra = write_demo_study(root / "extra", n_units=n_new, seed=seed + 6, scene=scene, chip_size_px=32)
    wave1 = pd.read_csv(study_path.parent / "villages.csv", dtype=str)
    new = pd.read_csv(extra.parent / "villages.csv", dtype=str)
    new["village_code"] = "W2-" + new["village_code"]
    wave2 = root / "wave2.csv"
    pd.concat([wave1, new], ignore_index=True).to_csv(wave2, index=False, lineterminator="\n")
    return study_path, wave2


def expected_rows(study_path: Path) -> int:
    from eocausal.quality import requested_estimates
    from eocausal.study import load_study

    return len(requested_estimates(load_study(study_path).analysis))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_readers(db: Path, folder: Path, n: int, max_seconds: float, think_ms: float) -> tuple[list, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stop = folder / "stop"
    procs = []
    for i in range(n):
        result = folder / f"reader_{i:02d}.json"
        procs.append((subprocess.Popen([sys.executable, __file__, "--reader", str(db), str(stop), str(result),
                                        str(max_seconds), str(think_ms)]), result))
    return procs, stop


def wait_until_all_saw(procs, versions: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        seen = []
        for proc, result in procs:
            progress = Path(str(result) + ".versions")
            seen.append(progress.exists() and len(json.loads(progress.read_text() or "[]")) >= versions)
            if proc.poll() is not None:
                seen[-1] = True
        if all(seen):
            return
        time.sleep(0.1)


def summarise(results: list[dict], rows_per_version: int) -> dict:
    errors = [e for r in results for e in r["errors"]]
    latency = {name: [v for r in results for v in r["latency"][name]] for name in (*QUERIES, "cycle")}
    versions: dict[str, dict] = {}
    for r in results:
        for shape, reads in r["shapes"].items():
            version, n_rows, n_keys = shape.split(":")
            entry = versions.setdefault(version, {"reads": 0, "incomplete_reads": 0, "shapes": set()})
            entry["reads"] += reads
            entry["shapes"].add((int(n_rows), int(n_keys)))
            if not int(n_rows) == int(n_keys) == rows_per_version:
                entry["incomplete_reads"] += reads
    latest_shapes = {k for r in results for k in r["latest"]}
    return {
        "readers": len(results),
        "cycles": sum(r["cycles"] for r in results),
        "queries": sum(len(latency[name]) for name in QUERIES),
        "errors": errors,
        "versions": {v: {**e, "shapes": sorted(e["shapes"])} for v, e in versions.items()},
        "latest_view": sorted(latest_shapes),
        "latency_ms": {name: {"p50": 1000 * percentile(values, 50), "p99": 1000 * percentile(values, 99),
                              "max": 1000 * max(values) if values else float("nan"), "n": len(values)}
                       for name, values in latency.items()},
    }


def markdown(summary: dict, settings: dict, command: str) -> str:
    lines = [
        "# Concurrent SQL readers on the published warehouse during a refresh",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"Machine: {settings['machine']}; load average at start {settings['load_start']}, at end {settings['load_end']}.",
        f"Study: {settings['n_units']} units, wave 2 adds {settings['n_new']} (new chips, embeddings, estimates, a new "
        f"published copy); {settings['rows_per_version']} estimate rows per version. Readers: {summary['readers']} "
        f"processes, each a fresh read-only connection per cycle (3 queries), {settings['think_ms']:.0f} ms between "
        f"cycles; the refresh (`eocausal run` on wave 2) took {settings['refresh_s']:.1f} s and exited "
        f"{settings['refresh_rc']}; readers ran {settings['readers_s']:.1f} s in all.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| reader processes | {summary['readers']} |",
        f"| connect-query-close cycles | {summary['cycles']:,} |",
        f"| queries | {summary['queries']:,} |",
        f"| errors | **{len(summary['errors'])}** |",
    ]
    for version, entry in summary["versions"].items():
        complete = "all complete" if entry["incomplete_reads"] == 0 else f"**{entry['incomplete_reads']} incomplete**"
        rows = ", ".join(f"{r} rows/{k} keys" for r, k in entry["shapes"])
        lines.append(f"| version `{version}` seen | {entry['reads']:,} reads, {complete} ({rows}) |")
    lines.append(f"| latest view showed | {', '.join(summary['latest_view'])} (version:rows) |")
    for name, lat in summary["latency_ms"].items():
        label = "whole cycle (connect, 3 queries, close)" if name == "cycle" else f"query `{name}`"
        lines.append(f"| {label} latency p50 / p99 / max | {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} ms "
                     f"(n = {lat['n']:,}) |")
    if summary["errors"]:
        lines += ["", "Errors (first 10):", "", *[f"- {e}" for e in summary["errors"][:10]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--reader":
        reader(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--n-units", type=int, default=120)
    parser.add_argument("--n-new", type=int, default=40)
    parser.add_argument("--think-ms", type=float, default=50.0, help="pause between a reader's cycles")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="bound on each reader's loop")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--root", help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "readers.md"))
    args = parser.parse_args(argv)

    command = " ".join(["python benchmarks/readers.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "GX_ANALYTICS_ENABLED": "false",
           "DAGSTER_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory(prefix="eocausal-readers-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        study_path, wave2 = build_study(root, args.n_units, args.n_new, args.seed)
        workdir = root / "work"
        print(f"wave 1: eocausal run ({args.n_units} units) ...", file=sys.stderr)
        done = subprocess.run([_eocausal(), "run", str(study_path), "--workdir", str(workdir), "--json"],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        published = workdir / "published" / "warehouse.duckdb"
        load_start = os.getloadavg()[0]
        print(f"starting {args.readers} readers, then the refresh (wave 2: +{args.n_new} units) ...", file=sys.stderr)
        readers_started = time.monotonic()
        procs, stop = run_readers(published, root / "readers", args.readers, args.max_seconds, args.think_ms)
        wait_until_all_saw(procs, 1, 120)
        (study_path.parent / "villages.csv").write_bytes(wave2.read_bytes())
        t0 = time.monotonic()
        refresh = subprocess.run([_eocausal(), "run", str(study_path), "--workdir", str(workdir), "--json"],
                                 capture_output=True, text=True, env=env)
        refresh_s = time.monotonic() - t0
        wait_until_all_saw(procs, 2, 120)  # each reader reads the new version too
        stop.write_text("stop")
        for proc, _ in procs:
            proc.wait(timeout=120)
        readers_s = time.monotonic() - readers_started
        results = [json.loads(result.read_text()) for _, result in procs]
        if refresh.returncode != 0:
            print(refresh.stderr, file=sys.stderr)
        settings = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "load_start": f"{load_start:.1f}", "load_end": f"{os.getloadavg()[0]:.1f}",
            "n_units": args.n_units, "n_new": args.n_new, "rows_per_version": expected_rows(study_path),
            "think_ms": args.think_ms, "refresh_s": refresh_s, "refresh_rc": refresh.returncode,
            "readers_s": readers_s,
        }
        summary = summarise(results, settings["rows_per_version"])
    text = markdown(summary, settings, command)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary}, indent=2))
    ok = not summary["errors"] and all(e["incomplete_reads"] == 0 for e in summary["versions"].values())
    return 0 if ok and refresh.returncode == 0 and len(summary["versions"]) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
