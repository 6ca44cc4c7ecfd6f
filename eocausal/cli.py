"""`eocausal` command line: demo | run | validate | simulate | docs | report.

`run` and `demo` materialise the Dagster graph in-process; the Dagster layer is imported only
inside those commands, so the library itself stays free of it.

A rejection or failure prints its reason (the rule and the rows, units, keys or file) and the path
of a log with the full trace, never a stack trace, and exits with a code that says what kind of
problem it was (eocausal.failures: 2 input rejected, 3 working folder unusable, 4 busy, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eocausal import __version__, failures
from eocausal.failures import InputRejected

# Offline by default: no usage statistics from dbt, great-expectations or Dagster (set by main(),
# not on import).
_OFFLINE_ENV = {"DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "GX_ANALYTICS_ENABLED": "false",
                "DAGSTER_DISABLE_TELEMETRY": "true"}

JSON_COLUMNS = ["estimand", "estimator", "feature_set", "estimate", "std_error", "ci_low", "ci_high", "n",
                "estimate_version", "study", "n_treated", "n_control", "n_features", "code_version",
                "survey_version", "embeddings_version", "computed_at",
                # outcome imputation and sensitivity (NULL where they do not apply)
                "outcome_source", "n_outcome_observed", "robustness_value", "robustness_value_alpha",
                # fragility of the image adjustment (NULL: the check stayed quiet or did not run)
                "specification_warning", "chip_scale_warning"]


def _estimates_json(table) -> str:
    records = []
    columns = [c for c in JSON_COLUMNS if c in table.columns]
    for row in table[columns].to_dict(orient="records"):
        row["computed_at"] = str(row["computed_at"])
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        # JSON has no NaN: a value that does not apply is null.
        records.append({k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()})
    return json.dumps(records, indent=2)


# The command line of this invocation and the working folder it names (for the failure log).
_invocation: dict = {"argv": [], "workdir": None}

_HEADLINES = {
    failures.EXIT_FAILED: "the run did not complete.",
    failures.EXIT_INPUT: "input rejected.",
    failures.EXIT_WORKDIR: "the working folder cannot be used.",
    failures.EXIT_BUSY: "the working folder is busy.",
    failures.EXIT_CREDENTIALS: "Earth Engine access refused.",
}


def _fail(code: int, message: str, *, workdir: Path | None = None, traces=(), exc: BaseException | None = None,
          run_log: Path | None = None) -> int:
    """Print the reason and where the full trace is; return the exit code. Never a stack trace."""
    print(f"eocausal: {message}", file=sys.stderr)
    log = failures.write_failure_log(workdir or _invocation["workdir"], _invocation["argv"], message, code,
                                     traces=traces, exc=exc, run_log=run_log)
    where = f"full trace: {log}" if log else "no log could be written"
    print(f"eocausal: exit code {code} - {failures.EXIT_CODES.get(code, 'failure')}; nothing already published "
          f"was changed; {where}", file=sys.stderr)
    return code


def _unraisable_to_log(unraisable) -> None:
    """Python prints an exception it cannot raise (one in a finaliser: a generator of a failed dbt
    invocation closed at exit, say) with its traceback on stderr; write it to a log instead."""
    import traceback

    text = "".join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
    folder = failures.failure_log_dir(_invocation["workdir"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"eocausal-{os.getpid()}-ignored.log", "a", encoding="utf-8") as log:
            log.write(f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}\n{text}\n")
    except OSError:
        pass  # nowhere to write it (a full disk): dropped rather than printed


def _report_failure(outcome) -> int:
    code = getattr(outcome, "exit_code", failures.EXIT_FAILED) or failures.EXIT_FAILED
    if len(outcome.errors) == 1 and not outcome.failed_checks and code in (
            failures.EXIT_WORKDIR, failures.EXIT_BUSY, failures.EXIT_CREDENTIALS):
        lines = [outcome.errors[0]]  # one reason that names the folder or the credentials: one line
    else:
        lines = [_HEADLINES.get(code, _HEADLINES[failures.EXIT_FAILED])]
        lines += [f"  error: {err}" for err in outcome.errors]
        lines += [f"  failed check: {check}" for check in outcome.failed_checks]
    return _fail(code, "\n".join(lines), workdir=outcome.workdir, traces=getattr(outcome, "traces", ()),
                 run_log=outcome.log_path)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _OutsideDagsterRuns(logging.Filter):
    """Inside a Dagster run, the library's records reach the terminal through Dagster's console
    logger (its handler sits on the `eocausal` logger while the run captures it): not twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(type(h).__name__ == "DagsterLogHandler" for h in logging.getLogger("eocausal").handlers)


def configure_logging(level: str) -> None:
    """The library's loggers (`eocausal.*`) on stderr at ``level``, for this process."""
    logger = logging.getLogger("eocausal")
    for handler in [h for h in logger.handlers if getattr(h, "_eocausal_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._eocausal_cli = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("eocausal %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OutsideDagsterRuns())
    logger.addHandler(handler)
    # INFO at least, so that the stages' records reach Dagster's run logs whatever the terminal shows.
    logger.setLevel(min(logging.getLevelName(level), logging.INFO))


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def _terminal_progress(as_json: bool) -> Iterator[None]:
    """Per-stage progress on stderr while the block runs: only when stdout and stderr are a
    terminal, and never under --json."""
    from eocausal import progress

    if as_json or not (_is_terminal(sys.stdout) and _is_terminal(sys.stderr)):
        yield
        return
    with progress.reporting_to(progress.TerminalProgress(sys.stderr)):
        yield


def _check_survey(study):
    """The survey suite and the design rules, with the study's settings, before any chip is cut."""
    return _checked_survey(study)[1]


def _checked_survey(study):
    """(the canonical survey, its quality report); a rejection names the rule and the rows."""
    from eocausal.quality import DataQualityError
    from eocausal.survey import SurveyError, load_study_survey

    try:
        return load_study_survey(study)
    except (DataQualityError, SurveyError) as exc:
        raise InputRejected(f"survey rejected: {exc}") from None


def _check_imagery(study) -> None:
    """Local rasters open (GeoTIFF, georeferenced, the bands asked for), before any chip is cut.

    Remote sources (Earth Engine, STAC, an http(s) COG) are not asked here: a fully cached re-run
    needs neither credentials nor the network.
    """
    if study.imagery.source != "geotiff" or getattr(study, "imagery_is_remote", False):
        return
    from eocausal.imagery.bandfiles import BandFileError
    from eocausal.imagery.geotiff import ImageryError
    from eocausal.imagery.sources import open_source

    try:
        open_source(study)
    except (ImageryError, BandFileError) as exc:
        raise InputRejected(f"imagery rejected: {exc}") from None


def _check_coverage(study, survey):
    """Every unit against the imagery, for every source (eocausal.imagery.preflight): local rasters'
    chip windows (coverage, nodata share), remote COGs' headers, each STAC period's item search,
    Earth Engine's credentials and collection. Writes nothing. A rejection is one line: exit 2, or 5
    where Earth Engine refuses the credentials (as `run` exits)."""
    from eocausal.imagery.bandfiles import BandFileError
    from eocausal.imagery.geotiff import ImageryError
    from eocausal.imagery.preflight import ImageryAccessRefused, ImageryRejected, check_imagery

    try:
        return check_imagery(study, survey)
    except ImageryAccessRefused as exc:
        raise failures.CredentialsRefused(str(exc)) from None
    except ImageryRejected as exc:
        raise InputRejected(str(exc)) from None
    except (ImageryError, BandFileError) as exc:
        message = f"imagery rejected: {' '.join(str(exc).split())}"
        if failures.code_for_names(failures.exception_names(exc)) == failures.EXIT_CREDENTIALS:
            raise failures.CredentialsRefused(message) from None
        raise InputRejected(message) from None


def _run(study_path: Path, workdir: Path | None, as_json: bool, truth: dict | None = None,
         log_level: str = "WARNING") -> int:
    from eocausal.quality import IncompleteEstimatesError, check_estimates_complete
    from eocausal.study import default_workdir, load_study
    from eocausal.workdir import prepare_workdir

    started = time.perf_counter()
    study = load_study(study_path)
    _invocation["workdir"] = Path(workdir).resolve() if workdir else default_workdir(study_path)
    _check_survey(study)  # before Dagster and dbt are even imported
    _check_imagery(study)
    prepare_workdir(_invocation["workdir"])  # a file, read-only or full: say so before Dagster starts
    from eocausal.estimate.effects import estimates_markdown
    from eocausal.launch import find_launcher

    run_study = find_launcher().run_study  # the orchestration layer (Dagster), found by entry point

    with _terminal_progress(as_json):
        outcome = run_study(study_path, workdir, log_level=log_level)
    elapsed = time.perf_counter() - started
    if not outcome.success:
        return _report_failure(outcome)
    try:
        # Exit 0 only with every requested estimate row printed (and in the published warehouse).
        check_estimates_complete(outcome.estimates, study.analysis, study.name)
    except IncompleteEstimatesError as exc:
        return _fail(failures.EXIT_FAILED,
                     f"the run did not complete: {exc}\n"
                     f"published warehouse: {outcome.workdir / 'published' / 'warehouse.duckdb'}",
                     workdir=outcome.workdir, run_log=outcome.log_path)
    if as_json:
        print(_estimates_json(outcome.estimates))
        return 0
    version = outcome.estimates["estimate_version"].iloc[0]
    chips = outcome.metadata.get("image_chips", {})
    print(f"study {outcome.estimates['study'].iloc[0]} | estimate version {version} | {elapsed:.1f} s")
    print(f"units: {chips.get('n_usable', '?')} usable, {chips.get('n_excluded', '?')} excluded "
          f"{chips.get('excluded_by_reason', {})}; chips from cache: {chips.get('n_chips_from_cache', '?')}")
    if truth is not None:
        print(f"truth over the imageable units: ATE {truth['ATE']:.3f}, ATT {truth['ATT']:.3f}; "
              f"dml targets the variance-weighted effect {truth['dml']:.3f}")
    print(estimates_markdown(outcome.estimates, truth=truth))
    print(f"warehouse (read-only copy): {outcome.workdir / 'published' / 'warehouse.duckdb'}")
    report = outcome.metadata.get("study_report", {}).get("path")
    if report:
        print(f"study report: {report}")
    home = getattr(outcome, "dagster_home", None)
    if home is not None:
        print(f"Dagster instance (runs, checks, lineage): {home}")
    return 0


def cmd_run(args) -> int:
    return _run(Path(args.study), Path(args.workdir) if args.workdir else None, args.json,
                log_level=args.log_level)


def cmd_demo(args) -> int:
    from eocausal.simulate import DEMO_SEED_VARIANT, write_demo_study, write_seed_variant

    root = Path(args.workdir)
    study_path = write_demo_study(root / "study", n_units=args.n_units, seed=args.seed,
                                  effect_clusters=args.effect_clusters)
    # The demo deployment's second study (assets/defs/eocausal_demo_seed7): the same study under
    # another analysis seed, in its own folder; `dagster dev` shows it, `eocausal run` runs it.
    variant = write_seed_variant(study_path, root / f"study_seed{DEMO_SEED_VARIANT}")
    # The analysis units are the imageable ones (the demo's nodata rule is the study's).
    imageable = json.loads((study_path.parent / "truth.json").read_text())["imageable"]
    truth = {"ATE": imageable["ate"], "ATT": imageable["att"], "dml": imageable["variance_weighted_effect"]}
    if not args.json:
        print(f"demo study written to {study_path}")
        print(f"the same study under analysis seed {DEMO_SEED_VARIANT} written to {variant} "
              f"(run it: eocausal run {variant})")
    return _run(study_path, None, args.json, truth=None if args.json else truth, log_level=args.log_level)


def cmd_docs(args) -> int:
    from eocausal.launch import find_launcher
    from eocausal.study import default_workdir, load_study

    study = load_study(args.study)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.study)
    out = Path(args.out) if args.out else None
    page = find_launcher().generate_docs(workdir, out, study.imagery.analysis_period_name())
    print(f"dbt docs for the published warehouse: {page}")
    return 0


def cmd_report(args) -> int:
    from eocausal.heterogeneity import latest_report
    from eocausal.study import default_workdir, load_study

    study = load_study(args.study)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.study)
    path = latest_report(workdir, study.name)
    if path is None:
        print(f"eocausal: no report for study {study.name} in {workdir}; run `eocausal run {args.study}` first",
              file=sys.stderr)
        return 1
    print(path)
    if args.open:
        import webbrowser

        webbrowser.open(path.as_uri())
    return 0


def cmd_validate(args) -> int:
    from eocausal.study import load_study

    # The checks `eocausal run` makes before any work, and the imagery against every unit (coverage,
    # nodata share of each chip window, CRS, bands); a rejection exits 2, as there. Nothing is
    # written: no chip is cut, no cache filled.
    study = load_study(args.study)
    survey, report = _checked_survey(study)
    _check_imagery(study)
    print(report.message())
    print(_check_coverage(study, survey).message())
    return 0


def cmd_zoo(args) -> int:
    from eocausal import montecarlo as mc
    from eocausal import zoo

    names = args.designs.split(",") if args.designs else [d.name for d in zoo.ZOO]
    try:
        designs = [zoo.design_by_name(n) for n in names]
    except ValueError as exc:
        raise InputRejected(str(exc)) from None
    log = (lambda message: None) if args.quiet else mc.stderr_log
    result = zoo.run_zoo(designs, Path(args.out), replications=args.replications, folds=args.folds,
                         jobs=args.jobs, landsat=Path(args.landsat) if args.landsat else None, log=log)
    print(result["table"])
    print(f"results: {args.out}")
    return 0


def cmd_simulate(args) -> int:
    from eocausal import montecarlo as mc

    if args.zoo:
        return cmd_zoo(args)

    scenarios = mc.expand_scenarios(args.scenarios.split(","))
    estimators = tuple(args.estimators.split(","))
    log = (lambda message: None) if args.quiet else mc.stderr_log
    print(mc.DESIGN_NOTE, file=sys.stderr)
    design = mc.prepare_design(
        scene=Path(args.scene) if args.scene else None, n_units=args.n_units, seed=args.seed,
        chip_size_px=args.chip_size or mc.DEMO_CHIP_SIZE_PX, n_features=args.n_features,
        image_components=args.image_components,
        confounder_radius_m=args.confounder_radius_m,
        factors=sorted({1, *(int(s.removeprefix("resolution_x")) for s in scenarios if s.startswith("resolution_x"))}),
        cache_dir=Path(args.out) / "cache", log=log,
    )
    started = time.perf_counter()
    replicates = mc.run_monte_carlo(
        design, replications=args.replications, scenarios=scenarios, estimators=estimators,
        seed=args.seed, folds=args.folds, jobs=args.jobs, log=log,
    )
    settings = {"replications": args.replications, "scenarios": list(scenarios), "estimators": list(estimators),
                "folds": args.folds, "seed": args.seed, "jobs": args.jobs,
                "seconds": round(time.perf_counter() - started, 1)}
    written = mc.write_results(Path(args.out), design, replicates, settings)
    print(mc.summary_markdown(written["summary"]))
    for name, path in written["paths"].items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    for name, value in _OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    parser = argparse.ArgumentParser(prog="eocausal", description=__doc__.splitlines()[0],
                                     epilog=failures.exit_codes_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"eocausal {__version__}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="WARNING", type=str.upper,
                        help="messages shown on stderr: the library's and, during a run, Dagster's "
                        "(default WARNING; the run logs in Dagster keep INFO and above)")
    # --log-level is accepted after the command too (`eocausal run study.yaml --log-level INFO`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, type=str.upper,
                        help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="materialise the graph for a study and print its estimates",
                       description=textwrap.fill(
                           "Check the study file, the survey and the imagery, then materialise the graph in the "
                           "working folder and print the estimates. A rejection or failure prints the rule and "
                           "the rows, units or file at fault and the path of a log with the full trace (in "
                           "<workdir>/logs, or a temporary folder when the working folder cannot hold it); "
                           "nothing already published is changed.", 88),
                       epilog=failures.exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="path to study.yaml (or its folder)")
    p.add_argument("--workdir", help="lake, cache and warehouse folder (default: <study folder>/eocausal_work)")
    p.add_argument("--json", action="store_true", help="print the estimates as a JSON list")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", parents=[common],
                       help="generate the embedded demo study, run it, print estimates beside the truth")
    p.add_argument("--workdir", default="demo_run")
    p.add_argument("--n-units", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--effect-clusters", type=int, default=None, metavar="K",
                   help="simulate an effect clustered by settlement class (K >= 2 classes) instead of a linear one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", parents=[common],
        help="Monte Carlo of the demo process: bias, RMSE and 95%% CI coverage per estimator x feature set",
        description="Design-based Monte Carlo: the demo's scene, units, chips and embeddings are fixed; each "
        "replication redraws covariates, treatment and outcomes from the known process. Writes "
        "replications.csv, summary.csv, summary.png and settings.json to --out.",
    )
    p.add_argument("--replications", type=int, default=200)
    p.add_argument("--scenarios", default="demo,resolution,confounder_3km",
                   help="comma-separated: demo, resolution (x2, x4, x8), confounder_3km, or single scenarios")
    p.add_argument("--estimators", default="difference_in_means,ipw,aipw,dml")
    p.add_argument("--out", default="simulate_out", help="results folder (embeddings are cached in OUT/cache)")
    p.add_argument("--n-units", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="replications run in parallel processes")
    p.add_argument("--scene", help="a GeoTIFF scene instead of the shipped Landsat-8 crop")
    p.add_argument("--chip-size", type=int, default=None, help="chip side in pixels (default: the demo's, 50)")
    p.add_argument("--n-features", type=int, default=1024, help="RCF embedding size (the demo's: 1024)")
    p.add_argument("--image-components", type=int, default=64, help="principal components of the embedding")
    p.add_argument("--confounder-radius-m", type=float, default=750.0,
                   help="radius of the built-up share that confounds "
                        "(the demo's: 750 m; capped at the chip half-width)")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument("--zoo", action="store_true",
                   help="run the confounder zoo (eocausal.zoo) instead of the demo Monte Carlo "
                   "(default 100 replications per design with --replications 100)")
    p.add_argument("--designs", help="with --zoo: comma-separated design names (default: all)")
    p.add_argument("--landsat", help="with --zoo: the Landsat-8 scene (default: ../shared/data/...)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("docs", parents=[common],
                       help="dbt docs (tables, views, columns) of a study's published warehouse")
    p.add_argument("study", help="path to study.yaml (or its folder)")
    p.add_argument("--workdir", help="the study's working folder (default: <study folder>/eocausal_work)")
    p.add_argument("--out", help="docs folder (default: <workdir>/docs)")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("report", parents=[common], help="print the path of a study's latest HTML report")
    p.add_argument("study", help="path to study.yaml (or its folder)")
    p.add_argument("--workdir", help="the study's working folder (default: <study folder>/eocausal_work)")
    p.add_argument("--open", action="store_true", help="also open it in the default browser")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("validate", parents=[common],
                       help="check the study file, the survey (GX suite, design rules) and the imagery (local rasters: "
                       "every unit's coverage and chip-window nodata share, CRS, bands; remote COGs: headers and "
                       "coverage; STAC: items per period and coverage; Earth Engine: credentials and collection) "
                       "before any chip is cut; "
                       "write nothing (but a log when it rejects)",
                       epilog=failures.exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.set_defaults(func=cmd_validate)

    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from eocausal.study import StudyError, default_workdir
    from eocausal.workdir import WorkdirBusy, WorkdirUnusable, disk_problem

    _invocation["argv"] = list(sys.argv[1:] if argv is None else argv)
    sys.unraisablehook = _unraisable_to_log
    _invocation["workdir"] = (Path(args.workdir).resolve() if getattr(args, "workdir", None)
                              else default_workdir(args.study) if getattr(args, "study", None) else None)
    try:
        return args.func(args)
    except (StudyError, InputRejected) as exc:
        return _fail(failures.EXIT_INPUT, str(exc), exc=exc)
    except failures.CredentialsRefused as exc:
        return _fail(failures.EXIT_CREDENTIALS, str(exc), exc=exc)
    except WorkdirUnusable as exc:
        return _fail(failures.EXIT_WORKDIR, str(exc), exc=exc)
    except WorkdirBusy as exc:
        return _fail(failures.EXIT_BUSY, str(exc), exc=exc)
    except KeyboardInterrupt as exc:
        return _fail(failures.EXIT_INTERRUPTED, "interrupted", exc=exc)
    except Exception as exc:  # a bug or an unforeseen environment problem: still no stack trace here
        problem = disk_problem(_invocation["workdir"], exc) if _invocation["workdir"] else None
        if problem:
            return _fail(failures.EXIT_WORKDIR, problem, exc=exc)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(failures.EXIT_FAILED, f"unexpected error: {type(exc).__name__}: {reason}", exc=exc)


if __name__ == "__main__":
    sys.exit(main())
