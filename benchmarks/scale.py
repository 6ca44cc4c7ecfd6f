"""A large study end to end on this machine: wall time, peak memory and per-stage rates, cold and warm.

    .venv/bin/python benchmarks/scale.py --units 100000            # issue 14's study (~20-30 min)
    .venv/bin/python benchmarks/scale.py --units 5000 --scene-px 2000 --skip-e2
    .venv/bin/python benchmarks/scale.py --units 20000 --scene-px 2000 --e2-only  # E(2) of the tile runs

Builds a semi-synthetic study (``eocausal.simulate.write_demo_study``) of ``--units`` units on a
procedural ``--bands``-band scene of ``--scene-px`` square (``write_procedural_scene``), then runs
``eocausal run --json`` on it twice in a child process: cold (empty working folder) and warm (every
stage's output cached). For each run it reports the wall time and the child's peak RSS
(``getrusage(RUSAGE_CHILDREN)``: the largest process) and of its process tree (dbt runs in its own
processes; sampled every half second), and per Dagster step the seconds and units/s, read from the
run's step statistics in the working folder's Dagster instance, and the tree's peak RSS while the
step ran. Then bytes and files per million
units in the chip store, the lake and the warehouse, the last run's estimates against the study's
known truth (``truth.json``: at this n the SEs are small, so a bias the zoo's 1,500-unit designs
hide shows here), and (unless ``--skip-e2``) the scaling
efficiency E(2) = T1 / (2 T2) of the tile runs (chips and embeddings, cold, one thread each) as
`eocausal run` makes them: T1 in one worker process, T2 in two (``tile_runs_e2``).

Prints a markdown table; ``--out`` also writes it (and a JSON of the figures). Numbers from one run
on a shared machine: the GEMM rate of the same machine is printed beside them
(``benchmarks/embeddings.py`` has the embedding stage's own table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _child_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def build_study(out: Path, units: int, scene_px: int, bands: int, seed: int) -> Path:
    from eocausal.simulate import write_demo_study, write_procedural_scene

    scene = write_procedural_scene(out / "scene.tif", scene_px, scene_px, seed=seed, n_bands=bands)
    return write_demo_study(out / "study", n_units=units, seed=seed, scene=scene, chip_size_px=64)


def run_once(study: Path, workdir: Path) -> dict:
    """``eocausal run --json`` in a child process (its own peak RSS): wall seconds, RSS, exit code,
    and the RSS of its process tree (it and dbt's processes) sampled every half second, with times."""
    import psutil

    script = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        f"rc = subprocess.call([{str(Path(PY).parent / 'eocausal')!r}, 'run', '--json', '--workdir', "
        f"{str(workdir)!r}, {str(study)!r}], stdout=subprocess.DEVNULL)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'rc': rc, 'wall_s': wall, 'peak_rss_mb': rss}))\n"
    )
    env = {**os.environ, "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    wrapper = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    samples = []  # (unix time, MB of the run's process tree, wrapper excluded)
    parent = psutil.Process(wrapper.pid)
    while wrapper.poll() is None:
        total = 0
        try:
            for child in parent.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        samples.append((time.time(), total / 2**20))
        time.sleep(0.5)
    out, _ = wrapper.communicate()
    if wrapper.returncode:
        raise subprocess.CalledProcessError(wrapper.returncode, wrapper.args)
    run = json.loads(out.strip().splitlines()[-1])
    run["peak_tree_rss_mb"] = max((mb for _, mb in samples), default=0.0)
    run["rss_samples"] = samples
    return run


def step_windows(workdir: Path, since: float) -> dict[str, list[tuple[float, float]]]:
    """(start, end) unix times of each step's executions over the runs made in the working folder's
    instance since ``since`` (unix time; the runs of one `eocausal run`: its waves, and its tile
    workers' runs): a tile step once per tile and period, the survey and the embedder in the first
    wave and again (cached) in the analysis run."""
    import datetime

    import dagster as dg

    windows: dict[str, list[tuple[float, float]]] = {}
    after = datetime.datetime.fromtimestamp(since, datetime.timezone.utc)
    with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
        # Filtered here, not by dg.RunsFilter(created_after=...): after a 100,000-unit run its record
        # check once failed ("isinstance() arg 2 must be a type"), which the same call on a fresh
        # instance did not reproduce.
        for record in instance.get_run_records(limit=10_000):
            created = record.create_timestamp
            if created.tzinfo is None:
                created = created.replace(tzinfo=datetime.timezone.utc)
            if created < after:
                continue
            for s in instance.get_run_step_stats(record.dagster_run.run_id):
                windows.setdefault(s.step_key.split("__", 1)[-1], []).append((s.start_time or 0, s.end_time or 0))
    return windows


def step_peak_rss(run: dict, windows: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """The largest sampled process-tree RSS (MB) while each step ran."""
    return {step: max((mb for t, mb in run["rss_samples"] for start, end in spans if start <= t <= end),
                      default=float("nan"))
            for step, spans in windows.items()}


def folder_bytes_files(path: Path) -> tuple[int, int]:
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
                files += 1
            except OSError:
                pass
    return total, files


def tile_runs_e2(base: Path, study: Path, units: int) -> dict:
    """E(2) of a study's tile wave as `eocausal run` runs it: the tile runs (chips and embeddings,
    cold) in one worker process, then in two, one thread each (``embedding.cpu_threads: 1``), on a
    copy of the study whose tiles hold at most a quarter of its units. T = the first tile run's
    start to the last one's end; the survey, the embedder and the merge (inputs only) around them."""
    import dagster as dg
    import yaml

    from assets.partitions import tiles_job_name
    from eocausal.study import load_study

    doc = yaml.safe_load(study.read_text())
    doc["embedding"]["cpu_threads"] = 1
    doc["imagery"]["max_units_per_tile"] = max(100, units // 4)
    copy = study.with_name("study_e2.yaml")  # beside the original: its relative paths still hold
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    job = tiles_job_name(load_study(copy).name)
    code = "import sys; from assets.runner import run_study; sys.exit(0 if run_study(sys.argv[1], sys.argv[2], " \
           "inputs_only=True).success else 1)"
    figures: dict = {}
    for workers in (1, 2):
        workdir = base / f"work_e2_{workers}"
        shutil.rmtree(workdir, ignore_errors=True)
        env = {**os.environ, "EOCAUSAL_TILE_WORKERS": str(workers)}
        env.pop("DAGSTER_HOME", None)
        subprocess.run([PY, "-c", code, str(copy), str(workdir)], check=True, env=env, cwd=REPO)
        with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
            records = instance.get_run_records(dg.RunsFilter(job_name=job))
            figures[f"t{workers}_s"] = max(r.end_time for r in records) - min(r.start_time for r in records)
            figures["tiles"] = len(records)
        shutil.rmtree(workdir, ignore_errors=True)
    figures["units"] = units
    figures["e2"] = figures["t1_s"] / (2 * figures["t2_s"])
    return figures


def accuracy(workdir: Path, truth) -> list[dict]:
    """The run's latest estimates (the published warehouse's ``marts.effect_estimates_latest``)
    against the study's known truth (``eocausal.heterogeneity.load_truth``: over the imageable
    units, which are the analysis units): the ATE for every estimator but DML, whose target is the
    variance-weighted effect. Each row: estimator, feature set, estimate, SE, CI, truth, error in
    SEs, covered, and the fragility warnings."""
    import duckdb

    from eocausal.layout import Layout

    with duckdb.connect(str(Layout(workdir).published), read_only=True) as con:
        rows = con.sql("select estimator, feature_set, estimate, std_error, ci_low, ci_high, "
                       "specification_warning, chip_scale_warning from marts.effect_estimates_latest "
                       "where feature_set <> 'none' and estimator <> 'difference_in_means' "
                       "order by feature_set, estimator").df().to_dict("records")
    for r in rows:
        r["truth"] = truth.variance_weighted_effect if r["estimator"] == "dml" else truth.ate
        r["error_over_se"] = (r["estimate"] - r["truth"]) / r["std_error"]
        r["covered"] = bool(r["ci_low"] <= r["truth"] <= r["ci_high"])
    return rows


def gemm_rate_gflops() -> float:
    import torch

    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--scene-px", type=int, default=4000)
    parser.add_argument("--bands", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-e2", action="store_true")
    parser.add_argument("--e2-only", action="store_true", help="only E(2) of the tile runs (no cold/warm runs)")
    parser.add_argument("--keep", type=Path, help="build the study and working folder here (kept; an existing "
                                                  "study there is reused)")
    parser.add_argument("--runs", default="cold,warm", help="which runs: cold (empty working folder), warm")
    parser.add_argument("--out", type=Path, help="write the markdown table and JSON here (a folder)")
    args = parser.parse_args()

    holder = tempfile.TemporaryDirectory() if args.keep is None else None
    base = Path(holder.name) if holder else args.keep
    base.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    existing = base / "study" / "study.yaml"
    study = existing if existing.is_file() else build_study(base, args.units, args.scene_px, args.bands, args.seed)
    build_s = time.perf_counter() - t
    if args.e2_only:
        e = tile_runs_e2(base, study, args.units)
        line = (f"E(2), the tile runs of {e['units']:,} units in {e['tiles']} tiles, cold, one thread each, in one "
                f"process vs two workers: T1 = {e['t1_s']:.0f} s, T2 = {e['t2_s']:.0f} s, E(2) = {e['e2']:.2f}")
        print(line)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"e2_{args.units}.md").write_text(line + "\n")
            (args.out / f"e2_{args.units}.json").write_text(json.dumps(e, indent=2) + "\n")
        if holder:
            holder.cleanup()
        return
    workdir = base / "work"
    runs = args.runs.split(",")
    if "cold" in runs and workdir.exists():
        shutil.rmtree(workdir)
    figures: dict = {"units": args.units, "scene_px": args.scene_px, "bands": args.bands,
                     "study_build_s": build_s, "cpu_count": os.cpu_count(), "gemm_fp32_gflops": gemm_rate_gflops()}
    for label in runs:
        started = time.time()
        run = run_once(study, workdir)
        windows = step_windows(workdir, started)
        run["steps_s"] = {step: sum(end - start for start, end in spans) for step, spans in windows.items()}
        run["steps_peak_rss_mb"] = step_peak_rss(run, windows)
        del run["rss_samples"]
        figures[label] = run
        print(f"{label}: {run['wall_s']:.0f} s, peak RSS {run['peak_rss_mb']:.0f} MB (process tree "
              f"{run['peak_tree_rss_mb']:.0f} MB), exit {run['rc']}", flush=True)
    from eocausal.layout import Layout

    layout = Layout(workdir)
    per_million = 1e6 / args.units
    figures["storage"] = {}
    for name, path in (("chip store", layout.chip_cache), ("lake", layout.lake),
                       ("embedding cache", layout.embedding_cache), ("warehouse", layout.warehouse),
                       ("published warehouse", layout.published)):
        if path.is_dir():
            size, files = folder_bytes_files(path)
        else:
            size, files = (path.stat().st_size, 1) if path.exists() else (0, 0)
        figures["storage"][name] = {"gb_per_million_units": size * per_million / 1e9,
                                    "files_per_million_units": files * per_million}
    from eocausal.heterogeneity import load_truth
    from eocausal.study import load_study

    truth = load_truth(load_study(study))
    if truth.ate is not None and Layout(workdir).published.is_file():
        figures["accuracy"] = accuracy(workdir, truth)
    if not args.skip_e2:
        figures["e2"] = tile_runs_e2(base, study, args.units)

    lines = [f"# Scale: {args.units:,} units, {args.scene_px} px {args.bands}-band procedural scene, 64 px chips",
             "", f"fp32 GEMM (torch, 2048^2, all threads): {figures['gemm_fp32_gflops']:.0f} GFLOP/s; "
             f"{os.cpu_count()} cores; study built in {build_s:.0f} s", "",
             "| stage | cold s | cold units/s | cold peak RSS MB | warm s | warm units/s | warm peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for step in figures[runs[0]]["steps_s"]:
        c = figures.get("cold", {}).get("steps_s", {}).get(step, nan)
        w = figures.get("warm", {}).get("steps_s", {}).get(step, nan)
        cm = figures.get("cold", {}).get("steps_peak_rss_mb", {}).get(step, nan)
        wm = figures.get("warm", {}).get("steps_peak_rss_mb", {}).get(step, nan)
        lines.append(f"| {step} | {c:.1f} | {args.units / c if c else float('nan'):,.0f} | {cm:,.0f} | {w:.1f} | "
                     f"{args.units / w if w else float('nan'):,.0f} | {wm:,.0f} |")
    for label in runs:
        r = figures[label]
        lines.append(f"| **{label} run, end to end** | {r['wall_s']:.0f} | {args.units / r['wall_s']:,.0f} | "
                     f"peak RSS {r['peak_rss_mb']:,.0f} MB (tree {r['peak_tree_rss_mb']:,.0f}) | exit {r['rc']} |")
    lines += ["", "| storage | GB per million units | files per million units |", "|---|---:|---:|"]
    for name, s in figures["storage"].items():
        lines.append(f"| {name} | {s['gb_per_million_units']:.2f} | {s['files_per_million_units']:,.0f} |")
    if figures.get("accuracy"):
        lines += ["", "Estimates against the known truth (the imageable units' ATE; DML: the variance-weighted "
                  "effect):",
                  "", "| estimator | feature set | estimate | 95 % CI | truth | error / SE | covered | spec warning | "
                  "chip-scale warning |", "|---|---|---:|---|---:|---:|---|---|---|"]
        for r in figures["accuracy"]:
            lines.append(f"| {r['estimator']} | {r['feature_set']} | {r['estimate']:.4f} | [{r['ci_low']:.4f}, "
                         f"{r['ci_high']:.4f}] | {r['truth']:.4f} | {r['error_over_se']:+.2f} | "
                         f"{'yes' if r['covered'] else 'no'} | {r['specification_warning'] or '–'} | "
                         f"{r['chip_scale_warning'] or '–'} |")
    if "e2" in figures:
        e = figures["e2"]
        lines += ["", f"E(2), the tile runs of {e['units']:,} units in {e['tiles']} tiles, cold, one thread each, "
                  f"in one worker vs two (`EOCAUSAL_TILE_WORKERS`): T1 = {e['t1_s']:.0f} s, T2 = {e['t2_s']:.0f} s, "
                  f"E(2) = T1 / (2 T2) = {e['e2']:.2f}"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = "" if runs == ["cold", "warm"] else "_" + "_".join(runs)
        (args.out / f"scale_{args.units}{suffix}.md").write_text(table + "\n")
        (args.out / f"scale_{args.units}{suffix}.json").write_text(json.dumps(figures, indent=2) + "\n")
    if holder:
        holder.cleanup()


if __name__ == "__main__":
    main()
