"""`eocausal` command line: demo | run | validate.

`run` and `demo` materialise the Dagster graph in-process; the Dagster layer is imported only
inside those commands, so the library itself stays free of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Offline by default: no usage statistics from dbt or great-expectations.
os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "true")

JSON_COLUMNS = ["estimand", "estimator", "feature_set", "estimate", "std_error", "ci_low", "ci_high", "n",
                "estimate_version", "study", "n_treated", "n_control", "n_features", "code_version",
                "survey_version", "embeddings_version", "computed_at"]


def _estimates_json(table) -> str:
    records = []
    for row in table[JSON_COLUMNS].to_dict(orient="records"):
        row["computed_at"] = str(row["computed_at"])
        records.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
    return json.dumps(records, indent=2)


def _report_failure(outcome) -> int:
    print("eocausal: the run did not complete.", file=sys.stderr)
    for err in outcome.errors:
        print(f"  error: {err}", file=sys.stderr)
    for check in outcome.failed_checks:
        print(f"  failed check: {check}", file=sys.stderr)
    print("Nothing already published was changed.", file=sys.stderr)
    if outcome.log_path:
        print(f"dbt log: {outcome.log_path}", file=sys.stderr)
    return 1


def _run(study_path: Path, workdir: Path | None, as_json: bool, truth: float | None = None) -> int:
    from assets.runner import run_study
    from eocausal.estimate.effects import estimates_markdown

    started = time.perf_counter()
    outcome = run_study(study_path, workdir)
    elapsed = time.perf_counter() - started
    if not outcome.success:
        return _report_failure(outcome)
    if as_json:
        print(_estimates_json(outcome.estimates))
        return 0
    version = outcome.estimates["estimate_version"].iloc[0]
    chips = outcome.metadata.get("image_chips", {})
    print(f"study {outcome.estimates['study'].iloc[0]} | estimate version {version} | {elapsed:.1f} s")
    print(f"units: {chips.get('n_usable', '?')} usable, {chips.get('n_excluded', '?')} excluded "
          f"{chips.get('excluded_by_reason', {})}; chips from cache: {chips.get('n_chips_from_cache', '?')}")
    if truth is not None:
        print(f"true ATE: {truth:.3f}")
    print(estimates_markdown(outcome.estimates, truth=truth))
    print(f"warehouse (read-only copy): {outcome.workdir / 'published' / 'warehouse.duckdb'}")
    return 0


def cmd_run(args) -> int:
    return _run(Path(args.study), Path(args.workdir) if args.workdir else None, args.json)


def cmd_demo(args) -> int:
    from eocausal.simulate import write_demo_study

    root = Path(args.workdir)
    study_path = write_demo_study(root / "study", n_units=args.n_units, seed=args.seed)
    truth = json.loads((study_path.parent / "truth.json").read_text())["ate"]
    if not args.json:
        print(f"demo study written to {study_path}")
    return _run(study_path, None, args.json, truth=None if args.json else truth)


def cmd_validate(args) -> int:
    from eocausal.quality import DataQualityError
    from eocausal.study import load_study
    from eocausal.survey import SurveyError, load_survey

    study = load_study(args.study)
    try:
        df, report = load_survey(study.survey_path, study.survey)
    except (DataQualityError, SurveyError) as exc:
        print(f"survey rejected: {exc}", file=sys.stderr)
        return 1
    print(report.message())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eocausal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="materialise the graph for a study and print its estimates")
    p.add_argument("study", help="path to study.yaml (or its folder)")
    p.add_argument("--workdir", help="lake, cache and warehouse folder (default: <study folder>/eocausal_work)")
    p.add_argument("--json", action="store_true", help="print the estimates as a JSON list")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="generate the embedded demo study, run it, print estimates beside the truth")
    p.add_argument("--workdir", default="demo_run")
    p.add_argument("--n-units", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("validate", help="validate a study's survey against the GX suite, write nothing")
    p.add_argument("study")
    p.set_defaults(func=cmd_validate)

    args = parser.parse_args(argv)
    from eocausal.study import StudyError

    try:
        return args.func(args)
    except StudyError as exc:
        print(f"eocausal: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
