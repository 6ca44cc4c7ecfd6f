"""A study's results as Python objects, for a notebook.

    import eocausal
    results = eocausal.open_study("path/to/study.yaml")      # a study that has run (or its working folder)
    results = eocausal.run_study("path/to/study.yaml")       # run it first (the whole graph, recorded)
    results.headline                  # the answer: recommended estimate, naive, what the image changed, verdicts
    results.estimates                 # DataFrame: every estimate row of the current version
    results.matrix                    # estimator x feature set
    results.diagnostics               # DataFrame: overlap, balance and nuisance fit per estimate
    results.units, results.cate, results.clusters, results.transport
    results.figures["unit_map"]       # matplotlib Figures (pyplot-free: shown inline, or .savefig)

Opening reads what a run published: the read-only warehouse copy (``<workdir>/published/warehouse.duckdb``,
``marts.*``), the Parquet lake (the survey, the chip index, the embedding PCA) and the chip cache of
the working folder (eocausal.heterogeneity.Workspace); it writes nothing and needs no orchestrator.
Running goes through the orchestration layer the command line uses (eocausal.launch: found by entry
point, so this module imports nothing from the Dagster layer).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from eocausal.layout import PUBLISHED_WAREHOUSE

if TYPE_CHECKING:
    from eocausal.report import Headline
    from eocausal.study import Study

PUBLISHED = PUBLISHED_WAREHOUSE
FIGURE_NAMES = ("forest", "unit_map", "example_chips", "overlap", "balance", "pca_variance", "cate_distribution",
                "rate", "clusters", "transport")


class ResultsNotFound(FileNotFoundError):
    """No published results where a study's were looked for (it has not run, or not there)."""


class StudyRunFailed(RuntimeError):
    """A run did not complete; the message says what failed (each error and failed check on a line)."""

    def __init__(self, message: str, outcome: Any = None):
        super().__init__(message)
        self.outcome = outcome


def _locate(path: str | Path, workdir: str | Path | None) -> tuple["Study | None", Path]:
    """(the study, its working folder) from a study file or folder, or a working folder."""
    from eocausal.study import default_workdir, load_study

    path = Path(path)
    if workdir is None and path.is_dir() and (path / PUBLISHED).exists():
        # A working folder: its study is the one beside it, when there is one (the default layout).
        candidate = path.parent / "study.yaml"
        study = load_study(candidate) if candidate.is_file() else None
        return study, path.resolve()
    study = load_study(path)
    return study, Path(workdir).resolve() if workdir is not None else default_workdir(path)


def open_study(path: str | Path, workdir: str | Path | None = None, name: str | None = None) -> "StudyResults":
    """The published results of a study: ``path`` is its study file, the folder holding it, or its
    working folder; ``workdir`` a working folder other than the default (``<study folder>/eocausal_work``);
    ``name`` the study, where a working folder given alone holds several. Raises
    :class:`ResultsNotFound` when nothing has been published there."""
    study, workdir = _locate(path, workdir)
    published = workdir / PUBLISHED
    if not published.is_file():
        where = study.name if study is not None else str(path)
        raise ResultsNotFound(
            f"no published results of {where} in {workdir} (no {PUBLISHED}): run the study first "
            f"(`eocausal run STUDY.yaml`, or eocausal.run_study(...))"
        )
    return _read(study, workdir, name or (study.name if study is not None else None))


def run_study(study_path: str | Path, workdir: str | Path | None = None, log_level: str = "WARNING",
              **options: Any) -> "StudyResults":
    """Run a study end to end in this process (every imagery period, then the analysis; recorded in
    the Dagster instance as `eocausal run` does) and open its results. The study file and the survey
    are checked first (their errors name the rule); a failed run raises :class:`StudyRunFailed`
    naming each failed step and check and the run's log."""
    from eocausal.launch import find_launcher
    from eocausal.study import default_workdir, load_study
    from eocausal.survey import load_study_survey
    from eocausal.workdir import prepare_workdir

    study = load_study(study_path)
    load_study_survey(study)  # SurveyError / DataQualityError: the rule and the rows, before any work
    target = Path(workdir).resolve() if workdir is not None else default_workdir(study_path)
    prepare_workdir(target)
    outcome = find_launcher().run_study(study_path, workdir, log_level=log_level, **options)
    if not outcome.success:
        lines = [f"the run of {study.name} did not complete:"]
        lines += [f"  error: {e}" for e in outcome.errors]
        lines += [f"  failed check: {c}" for c in outcome.failed_checks]
        if outcome.log_path is not None:
            lines.append(f"  run log: {outcome.log_path}")
        raise StudyRunFailed("\n".join(lines), outcome)
    results = open_study(study_path, outcome.workdir)
    results.run = outcome
    return results


def _latest(db: Path, table: str, version: str, study: str) -> pd.DataFrame:
    """A marts table's rows of ``study``'s most recently computed version (empty if none)."""
    from eocausal.warehouse import query

    try:
        return query(db, f"select * from marts.{table} where study = ? and {version} = "
                     f"(select arg_max({version}, computed_at) from marts.{table} where study = ?)", [study, study])
    except Exception:  # noqa: BLE001 - a table a study without that stage never built
        return pd.DataFrame()


def _read(study: "Study | None", workdir: Path, name: str | None) -> "StudyResults":
    from eocausal import heterogeneity as het
    from eocausal.warehouse import query

    db = workdir / PUBLISHED
    studies = query(db, "select distinct study from marts.effect_estimates_latest order by study")["study"].tolist()
    if name is None:
        if len(studies) != 1:
            raise ResultsNotFound(f"{db} holds the studies {studies}: say which with name=")
        name = studies[0]
    if name not in studies:
        raise ResultsNotFound(f"{db} holds no estimates of study {name!r} (it holds {studies})")
    estimates = query(db, "select * from marts.effect_estimates_latest where study = ? "
                      "order by estimand, estimator, feature_set", [name])
    exclusions = query(db, "select * from marts.unit_exclusions order by unit_id")
    cate = _latest(db, "cate_predictions", "cate_version", name)
    evaluation = _latest(db, "cate_evaluation", "cate_version", name)
    clusters = _latest(db, "effect_clusters", "cluster_version", name)
    transport = _latest(db, "transport_predictions", "transport_version", name)
    ws = het.Workspace(workdir)
    cluster_summary: dict = {}
    if len(clusters):
        path = ws.models / "clusters" / f"{name}-{clusters['cluster_version'].iloc[0]}.json"
        if path.is_file():
            cluster_summary = json.loads(path.read_text(encoding="utf-8"))
    raster = None
    if len(transport):
        candidate = ws.figures / "transport" / f"{name}-{transport['transport_version'].iloc[0]}" / "transport_cate.tif"
        raster = candidate if candidate.is_file() else None
    embeddings_version = str(estimates["embeddings_version"].iloc[0]) if len(estimates) else None
    period = study.imagery.analysis_period_name() if study is not None else _only_period(ws)
    if (ws.lake / "survey.parquet").is_file():
        extras = het.report_extras(study, ws, exclusions, cate if len(cate) else None,
                                   clusters if len(clusters) else None, embeddings_version, period=period)
    else:
        extras = {"units": pd.DataFrame(), "scene": None, "example_chips": None, "pca_explained_variance": None}
    truth = het.load_truth(study) if study is not None else None
    return StudyResults(
        name=name, workdir=workdir, study=study, estimates=estimates, exclusions=exclusions,
        units=extras["units"], cate=cate, cate_evaluation=evaluation, clusters=clusters,
        cluster_summary=cluster_summary, transport=transport, transport_raster=raster,
        report_path=het.latest_report(workdir, name), truth_ate=truth.ate if truth else None,
        truth_dml=truth.variance_weighted_effect if truth else None,
        pca_explained_variance=extras["pca_explained_variance"], _scene=extras["scene"],
        _example_chips=extras["example_chips"], _truth_tau=truth.units if truth else None,
    )


def _only_period(ws) -> str | None:
    files = sorted((ws.lake / "image_chips").glob("period=*.parquet"))
    return files[0].stem.removeprefix("period=") if len(files) == 1 else None


@dataclass(eq=False)
class StudyResults:
    """One study's current results (see the module docstring)."""

    name: str
    workdir: Path
    study: "Study | None"
    estimates: pd.DataFrame  # marts.effect_estimates_latest: the current version's rows
    exclusions: pd.DataFrame  # marts.unit_exclusions: unit_id, lat, lon, reason, valid_share
    units: pd.DataFrame  # every survey unit: arm, outcome, status, exclusion reason, propensity, CATE, cluster
    cate: pd.DataFrame  # marts.cate_predictions (held-out CATE per unit x feature set)
    cate_evaluation: pd.DataFrame  # marts.cate_evaluation (RATE AUTOC / Qini, PEHE where known)
    clusters: pd.DataFrame  # marts.effect_clusters (per unit)
    cluster_summary: dict  # the effect-cluster model: k, effects, shares, ...
    transport: pd.DataFrame  # marts.transport_predictions (per grid cell)
    transport_raster: Path | None  # the transport COG
    report_path: Path | None  # the latest HTML report
    truth_ate: float | None = None  # simulated studies only
    truth_dml: float | None = None
    pca_explained_variance: list | None = None
    run: Any = None  # the run's outcome when run_study made these results
    _scene: Any = field(default=None, repr=False)
    _example_chips: Any = field(default=None, repr=False)
    _truth_tau: Any = field(default=None, repr=False)

    @property
    def estimate_version(self) -> str | None:
        return str(self.estimates["estimate_version"].iloc[0]) if len(self.estimates) else None

    @cached_property
    def headline(self) -> "Headline | None":
        from eocausal.report import headline

        return headline(self.estimates)

    @cached_property
    def matrix(self) -> pd.DataFrame:
        from eocausal.report import estimates_matrix

        return estimates_matrix(self.estimates)

    def diagnostics_of(self, estimator: str, feature_set: str, estimand: str = "ATE") -> dict:
        """The full diagnostics of one estimate (measured outcomes), as stored."""
        est = self.estimates
        rows = est[(est["estimator"] == estimator) & (est["feature_set"] == feature_set)
                   & (est["estimand"] == estimand)]
        if "outcome_source" in rows.columns:
            rows = rows[rows["outcome_source"].fillna("measured") == "measured"]
        if rows.empty:
            raise KeyError(f"no {estimand} estimate by {estimator} with feature set {feature_set}")
        return json.loads(rows.iloc[0]["diagnostics"] or "{}")

    @cached_property
    def diagnostics(self) -> pd.DataFrame:
        """One row per estimate: the learner, propensity AUC and clipping, effective sample sizes,
        balance before/after weighting, outcome-model R², and the overlap verdict."""
        from eocausal.estimate.diagnostics import overlap_ok

        rows = []
        for r in self.estimates.itertuples():
            d = json.loads(r.diagnostics or "{}")
            p, ess = d.get("propensity") or {}, d.get("ess") or {}
            bal, r2 = d.get("balance") or {}, d.get("outcome_r2") or {}
            ok, message = overlap_ok(d)
            rows.append({
                "estimand": r.estimand, "estimator": r.estimator, "feature_set": r.feature_set,
                "outcome_source": getattr(r, "outcome_source", None), "learner": d.get("learner"),
                "propensity_auc": p.get("auc"), "share_clipped": p.get("share_clipped"),
                "ess_treated_share": ess.get("treated_share"), "ess_control_share": ess.get("control_share"),
                "max_abs_smd_before": bal.get("max_abs_smd_before"), "max_abs_smd_after": bal.get("max_abs_smd_after"),
                "outcome_r2_treated": r2.get("treated"), "outcome_r2_control": r2.get("control"),
                "overlap_ok": bool(ok) if p else None, "overlap": message,
            })
        return pd.DataFrame(rows)

    @cached_property
    def figures(self) -> dict:
        """name -> matplotlib Figure, for every figure the results have (see FIGURE_NAMES)."""
        return {name: fig for name in FIGURE_NAMES if (fig := self.figure(name)) is not None}

    def figure(self, name: str):
        """One figure by name (None when the results have nothing to draw for it)."""
        from eocausal import report as r

        if name == "forest":
            return r.forest_figure(self.estimates, self.truth_ate) if len(self.estimates) else None
        if name == "unit_map":
            return r.unit_map_figure(self.units, self._scene, title=f"{self.name}: units by arm and exclusion reason")
        if name == "example_chips":
            return r.example_chips_figure(self._example_chips, self.units) if self._example_chips else None
        if name == "overlap":
            return r.overlap_figure(self.estimates)
        if name == "balance":
            return r.love_figure(self.estimates)
        if name == "pca_variance":
            return r.pca_variance_figure(self.pca_explained_variance, r.image_components_used(self.estimates))
        if name == "cate_distribution":
            tau = self._truth_tau
            if tau is not None and len(self.cate):
                tau = tau[tau["unit_id"].isin(set(self.cate["unit_id"].astype(str)))]
            return r.cate_distribution_figure(self.cate if len(self.cate) else None, tau)
        if name == "rate":
            return r.rate_figure(self.cate_evaluation if len(self.cate_evaluation) else None)
        if name == "clusters":
            return r.cluster_figure(self.cluster_summary)
        if name == "transport":
            return self._transport_figure()
        raise KeyError(f"no figure {name!r}; the figures are {list(FIGURE_NAMES)}")

    def _transport_figure(self):
        if self.transport_raster is None or self.transport.empty:
            return None
        import rasterio

        from eocausal.estimate.transport import TransportGrid, transport_figure

        with rasterio.open(self.transport_raster) as src:
            grid = TransportGrid(src.crs.to_wkt(), src.transform, src.width, src.height, self.transport)
        analysed = self.units[self.units["status"] == "analysed"] if len(self.units) else self.units
        lonlat = analysed[["lon", "lat"]].to_numpy(dtype=float) if len(analysed) else []
        return transport_figure(grid, self.transport, lonlat, title=f"{self.name}: CATE predicted from imagery")

    def save_figures(self, folder: str | Path, dpi: float = 90) -> dict[str, Path]:
        """Every figure as a PNG in ``folder``; returns name -> path."""
        from eocausal.figures import save_figure

        return {name: save_figure(fig, Path(folder) / f"{name}.png", dpi=dpi) for name, fig in self.figures.items()}

    def __repr__(self) -> str:
        h = self.headline
        answer = ("no estimates" if h is None
                  else f"{h.estimand} {h.estimate:.3f} [{h.ci_low:.3f}, {h.ci_high:.3f}] ({h.label})")
        return f"<StudyResults {self.name} · estimate version {self.estimate_version} · {answer}>"

    def _repr_html_(self) -> str:
        h = self.headline
        parts = [f"<h3>{html.escape(self.name)} <small>estimate version {html.escape(str(self.estimate_version))}"
                 "</small></h3>"]
        if h is not None:
            parts.append("<p>" + " ".join(html.escape(s) for s in h.sentences()) + "</p><ul>")
            parts += [f"<li><b>{html.escape(v.name)}</b> ({v.status}): {html.escape(v.text)}</li>" for v in h.verdicts]
            parts.append("</ul>")
        parts.append(self.matrix.to_html())
        if self.report_path is not None:
            parts.append(f"<p>Report: <code>{html.escape(str(self.report_path))}</code></p>")
        return "".join(parts)
