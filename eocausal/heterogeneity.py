"""The heterogeneity stages of a study (DESIGN §6): CATE -> effect clusters -> transport and
saliency -> the study report. Each stage is a function of a study, its working folders and its
upstream versions; the Dagster assets (assets/heterogeneity.py) only call these and report.

Every stage output is versioned by content like the ATE stage's (DESIGN §9): the version hashes
the stage's code version, its inputs' versions and the relevant part of the study spec. An output
whose version exists is reused, so a warm re-run costs a few file reads.

Layout under the study's working folder:

- ``lake/cate_predictions/<study>-<version>.parquet`` (one row per unit x feature set),
  ``lake/cate_evaluation/...`` (RATE, PEHE, ... per feature set), ``lake/effect_clusters/...``,
  ``lake/transport_predictions/...``: the tables dbt loads into ``marts.*``;
- ``models/``: fitted state other stages reuse (the CATE stage's PCA and final stages, the cluster
  model, the refitted embedder), as JSON (pickle only for the embedder, a local cache);
- ``figures/``: transport GeoTIFF + map, saliency panels; ``reports/``: the HTML reports.

Known truth: a simulated study (eocausal.simulate) writes ``truth.json`` and ``truth_units.csv``
beside ``study.yaml``; when they are there, PEHE, the bias of each ATE estimate and the effect
clusters' adjusted Rand index are reported. Real studies have no such files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from eocausal import atomic, interpret
from eocausal.embed import EmbeddingError
from eocausal.estimate import cate as cate_mod
from eocausal.estimate import clusters as clusters_mod
from eocausal.estimate import transport as transport_mod
from eocausal.lake import embedder_path, period_path, read_vectors, stored_pca, write_table_atomic
from eocausal.layout import Layout
from eocausal.study import Study
from eocausal.versioning import estimate_version, frame_version, json_version

log = logging.getLogger(__name__)

CLUSTERS_CODE_VERSION = "clusters-1"

# Arrow schemas: every version's file has the same column types, so dbt can read them as one.
_TS = pa.timestamp("us", tz="UTC")
CATE_PREDICTIONS_SCHEMA = pa.schema([
    ("study", pa.string()), ("cate_version", pa.string()), ("unit_id", pa.string()), ("lat", pa.float64()),
    ("lon", pa.float64()), ("feature_set", pa.string()), ("fold", pa.int64()), ("treatment", pa.int64()),
    ("outcome", pa.float64()), ("propensity", pa.float64()), ("outcome_if_control", pa.float64()),
    ("outcome_if_treated", pa.float64()), ("pseudo_outcome", pa.float64()), ("cate", pa.float64()),
    ("cate_std_error", pa.float64()), ("cate_ci_low", pa.float64()), ("cate_ci_high", pa.float64()),
    ("computed_at", _TS),
])
CATE_EVALUATION_SCHEMA = pa.schema([
    ("study", pa.string()), ("cate_version", pa.string()), ("feature_set", pa.string()), ("metric", pa.string()),
    ("estimate", pa.float64()), ("std_error", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("n", pa.int64()), ("details", pa.string()), ("computed_at", _TS),
])
EFFECT_CLUSTERS_SCHEMA = pa.schema([
    ("study", pa.string()), ("cluster_version", pa.string()), ("cate_version", pa.string()), ("unit_id", pa.string()),
    ("lat", pa.float64()), ("lon", pa.float64()), ("k", pa.int64()), ("cluster", pa.int64()),
    ("cluster_probability", pa.float64()), ("cluster_posterior", pa.list_(pa.float64())),
    ("cluster_from_image", pa.int64()), ("cluster_membership", pa.list_(pa.float64())),
    ("cluster_effect", pa.float64()), ("cluster_effect_std_error", pa.float64()), ("computed_at", _TS),
])
TRANSPORT_SCHEMA = pa.schema([
    ("study", pa.string()), ("transport_version", pa.string()), ("cell_id", pa.string()), ("row", pa.int64()),
    ("col", pa.int64()), ("x", pa.float64()), ("y", pa.float64()), ("lon", pa.float64()), ("lat", pa.float64()),
    ("status", pa.string()), ("reason", pa.string()), ("cate", pa.float64()), ("cate_std_error", pa.float64()),
    ("cate_ci_low", pa.float64()), ("cate_ci_high", pa.float64()), ("cluster", pa.int64()),
    ("cluster_membership", pa.list_(pa.float64())), ("distance_to_unit_km", pa.float64()),
    ("inside_study_hull", pa.bool_()), ("computed_at", _TS),
])


# A study's working folder (eocausal.layout owns its folders and file names).
Workspace = Layout


def _write(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> Path:
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    return write_table_atomic(table, path)


def _write_json(obj, path: Path) -> Path:
    return atomic.write_json(path, obj, default=_json_default, sort_keys=True)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value)}")


def _now():
    return pd.Timestamp.now(tz="UTC").floor("s")


# --- inputs and versions ----------------------------------------------------------------------


@dataclass
class Truth:
    """What a simulated study knows (None parts are unknown)."""

    ate: float | None = None  # over the imageable units (the analysis units) when the simulator says
    variance_weighted_effect: float | None = None  # what dml (the partially linear model) targets
    units: pd.DataFrame | None = None  # unit_id, tau[, effect_cluster]
    effect_clusters: dict | None = None

    @property
    def version(self) -> str:
        if self.units is None:
            return ""
        return frame_version(self.units)


def load_truth(study: Study) -> Truth:
    """truth.json / truth_units.csv beside the study file, if a simulator wrote them."""
    root = Path(study.root)
    truth = Truth()
    meta = root / "truth.json"
    units = root / "truth_units.csv"
    if meta.is_file():
        doc = json.loads(meta.read_text(encoding="utf-8"))
        analysed = doc.get("imageable") or doc  # the units that can be analysed, if the simulator says
        truth.ate = analysed.get("ate", doc.get("ate"))
        truth.variance_weighted_effect = analysed.get("variance_weighted_effect")
        truth.effect_clusters = doc.get("effect_clusters")
    if units.is_file():
        table = pd.read_csv(units, dtype={"unit_id": str})
        keep = [c for c in ("unit_id", "tau", "effect_cluster") if c in table.columns]
        if {"unit_id", "tau"} <= set(keep):
            truth.units = table[keep]
    return truth


def analysis_imagery(lake: Path, study: Study, table: str) -> Path:
    """The lake file of ``image_chips`` or ``image_embeddings`` for the study's analysis period."""
    return period_path(lake, table, study.imagery.analysis_period_name())


def input_versions(lake: Path, study: Study) -> dict[str, str]:
    """The survey's and the (analysis period's) embeddings' data versions, as the ATE stage computes them."""
    survey_version = frame_version(pd.read_parquet(lake / "survey.parquet"))
    return {"survey": survey_version, "embeddings": embeddings_version(lake, study)}


def embeddings_version(lake: Path, study: Study) -> str:
    """The analysis period's embeddings' version ("" when there are none)."""
    emb = pd.read_parquet(analysis_imagery(lake, study, "image_embeddings"), columns=["embedding_version"])
    return str(emb["embedding_version"].iloc[0]) if len(emb) else ""


def _analysis_part(study: Study) -> dict:
    a = study.analysis.model_dump(mode="json")
    part = {k: a.get(k) for k in ("folds", "seed", "propensity_clip", "image_components", "spatial_block_km",
                                  "context_components")}
    # The nuisance options, where set (their defaults are left out of the dump: versions unchanged).
    return part | {k: a[k] for k in ("learners", "outcome_arms", "propensity_fit") if k in a}


def cate_version(study: Study, inputs: dict[str, str], truth: Truth) -> str:
    het = study.heterogeneity
    return estimate_version(
        cate_mod.CODE_VERSION,
        {**inputs, "truth": truth.version},
        {"analysis": _analysis_part(study), "heterogeneity": {
            "enabled": het.enabled, "feature_sets": het.feature_sets, "learner": het.learner,
            "rate_bootstrap": het.rate_bootstrap,
        }},
    )


def cluster_version(study: Study, cate_v: str) -> str:
    het = study.heterogeneity
    return json_version({"code": CLUSTERS_CODE_VERSION, "cate": cate_v, "clusters": het.clusters,
                         "max_clusters": het.max_clusters, "penalty": het.cluster_penalty})


def _paths(ws: Workspace, study: Study, kind: str, version: str) -> Path:
    return ws.lake / kind / f"{study.name}-{version}.parquet"


# --- stage: CATE ------------------------------------------------------------------------------


@dataclass
class CateStage:
    version: str
    predictions: pd.DataFrame
    evaluation: pd.DataFrame
    from_cache: bool
    enabled: bool
    note: str = ""
    paths: dict = field(default_factory=dict)


def _cate_paths(study: Study, ws: Workspace, version: str) -> dict[str, Path]:
    return {
        "predictions": _paths(ws, study, "cate_predictions", version),
        "evaluation": _paths(ws, study, "cate_evaluation", version),
        "model": ws.models / "cate" / f"{study.name}-{version}.json",
    }


def load_cate(study: Study, ws: Workspace) -> CateStage | None:
    """The CATE stage's stored output for the study's current inputs, or None if not computed."""
    version = cate_version(study, input_versions(ws.lake, study), load_truth(study))
    paths = _cate_paths(study, ws, version)
    if not all(p.exists() for p in paths.values()):
        return None
    state = _read_model(paths["model"])
    return CateStage(version, pd.read_parquet(paths["predictions"]), pd.read_parquet(paths["evaluation"]),
                     True, "disabled" not in state, state.get("disabled", ""), paths=paths)


def run_cate(study: Study, ws: Workspace, units: pd.DataFrame, covariates: list[str]) -> CateStage:
    """DR-learner CATE for the study's heterogeneity feature sets; reuses an existing version.

    ``units``: marts.analysis_units (canonical columns + embedding)."""
    cached = load_cate(study, ws)
    if cached is not None:
        return cached
    truth = load_truth(study)
    inputs = input_versions(ws.lake, study)
    version = cate_version(study, inputs, truth)
    paths = _cate_paths(study, ws, version)
    het = study.heterogeneity
    note = ""
    labelled = units[units["outcome"].notna()] if "outcome" in units.columns else units
    if not het.enabled:
        note = "heterogeneity is off in the study file"
    elif len(labelled) < 4 * study.analysis.folds:
        note = f"too few units with an outcome ({len(labelled)}) for a cross-fitted CATE"
    if note:
        predictions = pd.DataFrame(columns=CATE_PREDICTIONS_SCHEMA.names)
        evaluation = pd.DataFrame(columns=CATE_EVALUATION_SCHEMA.names)
        _write(predictions, CATE_PREDICTIONS_SCHEMA, paths["predictions"])
        _write(evaluation, CATE_EVALUATION_SCHEMA, paths["evaluation"])
        _write_json({"format": "eocausal.cate/1", "version": version, "disabled": note}, paths["model"])
        return CateStage(version, predictions, evaluation, False, False, note, paths)

    groups = None
    if study.analysis.spatial_block_km:
        from eocausal.estimate.folds import spatial_blocks

        groups = spatial_blocks(labelled["lat"].to_numpy(), labelled["lon"].to_numpy(), study.analysis.spatial_block_km)
    truth_tau = None
    if truth.units is not None:
        lookup = truth.units.set_index("unit_id")["tau"]
        if labelled["unit_id"].astype(str).isin(lookup.index).all():
            truth_tau = lookup.loc[labelled["unit_id"].astype(str)].to_numpy(dtype=float)
    context = None
    if study.analysis.context_components:
        # The context window's columns the headline ATE adjusts for (the image_context asset's).
        from eocausal.embed.context import study_context
        from eocausal.estimate.effects import context_columns

        components, _ = study_context(units, study, ws.lake, ws.chip_cache, inputs["survey"], inputs["embeddings"])
        columns = context_columns(components, study.analysis)
        if columns is not None:
            context = columns[0][np.flatnonzero(units.index.isin(labelled.index))]
    result = cate_mod.estimate_cate(
        labelled.reset_index(drop=True), covariates, context=context, feature_sets=tuple(het.feature_sets),
        folds=study.analysis.folds, seed=study.analysis.seed, clip=study.analysis.propensity_clip,
        image_components=study.analysis.fixed_image_components,
        stored_pca=stored_pca(ws.lake, study.imagery.analysis_period_name(), inputs["embeddings"]),
        learner=het.learner, nuisance_options=study.analysis.nuisance_options(), groups=groups,
        n_bootstrap=het.rate_bootstrap, truth_tau=truth_tau, study_name=study.name, version=version,
        computed_at=_now(),
    )
    predictions = result.predictions.copy()
    n_sets = len(result.fits)
    predictions["outcome_if_control"] = np.tile(result.pseudo.mu0, n_sets)
    predictions["outcome_if_treated"] = np.tile(result.pseudo.mu1, n_sets)
    _write(predictions, CATE_PREDICTIONS_SCHEMA, paths["predictions"])
    _write(result.evaluation, CATE_EVALUATION_SCHEMA, paths["evaluation"])
    state = result.model_state()
    state["pseudo_outcome_diagnostics"] = result.pseudo.diagnostics
    _write_json(state, paths["model"])
    return CateStage(version, predictions, result.evaluation, False, True, paths=paths)


def cate_markdown(evaluation: pd.DataFrame) -> str:
    lines = ["| feature set | AUTOC [95% CI] | Qini [95% CI] | PEHE |", "|---|---|---|---:|"]
    for fs in dict.fromkeys(evaluation["feature_set"]):
        rows = evaluation[evaluation["feature_set"] == fs].set_index("metric")
        cells = []
        for m in ("rate_autoc", "rate_qini"):
            if m in rows.index:
                r = rows.loc[m]
                cells.append(f"{r['estimate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            else:
                cells.append("–")
        pehe = f"{rows.loc['pehe', 'estimate']:.3f}" if "pehe" in rows.index else "–"
        lines.append(f"| {fs} | {cells[0]} | {cells[1]} | {pehe} |")
    return "\n".join(lines)


# --- shared: the image pipeline of the study ----------------------------------------------------


def _unit_components(study: Study, ws: Workspace, model_state: dict, unit_ids: list[str]) -> np.ndarray:
    """Image principal components of the given units (the CATE stage's PCA on their embeddings)."""
    from eocausal.embed.reduce import PCAReduction

    ids, features = read_vectors(analysis_imagery(ws.lake, study, "image_embeddings"))
    rows = pd.Index(ids).get_indexer(unit_ids)
    if (rows < 0).any():
        missing = [u for u, r in zip(unit_ids, rows) if r < 0]
        raise KeyError(f"{len(missing)} unit(s) have no embedding: {missing[:10]}")
    pca = PCAReduction.from_dict(model_state["pca"])
    out = np.empty((len(rows), pca.n_components_))
    for start in range(0, len(rows), 4096):  # float64 temporaries for a block of rows, not every unit
        out[start : start + 4096] = pca.transform(features[rows[start : start + 4096]])
    return out


def _read_model(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def study_embedder(study: Study, ws: Workspace):
    """The study's embedder: the one the analysis period's ``image_embedder`` fitted and stored
    (every tile's embeddings came from it), under the embeddings' version. A working folder from
    before that stage (no record or no stored embedder) refits it on the chips the embedding stage
    fitted it on, checked against the stored embeddings."""
    from eocausal.embed import embeddings as embed_stage

    version = embeddings_version(ws.lake, study)
    index = pd.read_parquet(analysis_imagery(ws.lake, study, "image_chips"))
    usable = index[index["status"] == "ok"]
    # the first units' stored embeddings, to check the embedder against
    reference = read_vectors(analysis_imagery(ws.lake, study, "image_embeddings"), rows=8)
    try:
        stored = json.loads(embedder_path(ws.lake, study.imagery.analysis_period_name()).read_text(encoding="utf-8"))
        embedder = embed_stage.load_embedder(ws.embedding_cache, stored["embedder_version"])
        transport_mod.check_embedder(embedder, usable, ws.chip_cache, reference)
        return embedder, version
    except (OSError, ValueError, KeyError, EmbeddingError, transport_mod.TransportError):
        pass  # no record, no readable stored embedder, or not the one of these embeddings: refit below
    # The embedding stage fits on the usable chips of a seeded sample of the units when there are many.
    fit_rows = embed_stage.fit_sample(index, study.embedding.seed)
    fit_rows = fit_rows[fit_rows["status"] == "ok"]
    weights = study.resolve(study.embedding.weights) if getattr(study.embedding, "weights", None) else None
    embedder = transport_mod.fitted_embedder(
        fit_rows, ws.chip_cache, lambda: embed_stage.make_embedder(study.embedding, weights), version,
        ws.models / "embedder", reference=reference, check_index=usable,
    )
    return embedder, version


# --- stage: effect clusters -------------------------------------------------------------------


@dataclass
class ClusterStage:
    version: str
    table: pd.DataFrame
    summary: dict
    from_cache: bool


def _cluster_paths(study: Study, ws: Workspace, version: str) -> tuple[Path, Path]:
    return _paths(ws, study, "effect_clusters", version), ws.models / "clusters" / f"{study.name}-{version}.json"


def load_clusters(study: Study, ws: Workspace, cate: CateStage) -> ClusterStage | None:
    """The cluster stage's stored output for this CATE version, or None if not computed."""
    version = cluster_version(study, cate.version)
    table_path, model_path = _cluster_paths(study, ws, version)
    if table_path.exists() and model_path.exists():
        return ClusterStage(version, pd.read_parquet(table_path), _read_model(model_path), True)
    return None


def run_clusters(study: Study, ws: Workspace, cate: CateStage) -> ClusterStage:
    """The image effect-cluster model on the CATE stage's pseudo-outcomes; reuses a stored version."""
    cached = load_clusters(study, ws, cate)
    if cached is not None:
        return cached
    version = cluster_version(study, cate.version)
    table_path, model_path = _cluster_paths(study, ws, version)
    het = study.heterogeneity
    preds = cate.predictions
    state = _read_model(cate.paths["model"])
    if not cate.enabled or preds.empty or not state.get("pca"):
        summary = {"k": 0, "note": cate.note or "no image features for the cluster model"}
        _write(pd.DataFrame(columns=EFFECT_CLUSTERS_SCHEMA.names), EFFECT_CLUSTERS_SCHEMA, table_path)
        _write_json(summary, model_path)
        return ClusterStage(version, pd.DataFrame(columns=EFFECT_CLUSTERS_SCHEMA.names), summary, False)

    # One row per unit: the pseudo-outcome columns are the same for every feature set.
    fs_init = "image" if (preds["feature_set"] == "image").any() else preds["feature_set"].iloc[0]
    units = preds[preds["feature_set"] == fs_init].reset_index(drop=True)
    unit_ids = units["unit_id"].astype(str).tolist()
    components = _unit_components(study, ws, state, unit_ids)
    score = units["pseudo_outcome"].to_numpy(dtype=float)
    nu = clusters_mod.noise_variance(
        units["outcome"], units["treatment"], units["outcome_if_control"], units["outcome_if_treated"],
        units["propensity"],
    )
    init = units["cate"].to_numpy(dtype=float)
    selection = None
    if het.clusters == "auto":
        selection = clusters_mod.choose_k(
            components, score, nu, units["fold"].to_numpy(), candidates=tuple(range(1, het.max_clusters + 1)),
            init_effect=init, penalty=het.cluster_penalty, seed=study.analysis.seed,
        )
        k = selection.chosen
    else:
        k = int(het.clusters)
    fit = clusters_mod.fit_effect_clusters(
        components, score, nu, k, init_effect=init, penalty=het.cluster_penalty, seed=study.analysis.seed
    )
    posterior = fit.posterior(components, score, nu)
    membership = fit.membership(components)
    assigned = posterior.argmax(axis=1)
    table = pd.DataFrame({
        "study": study.name, "cluster_version": version, "cate_version": cate.version, "unit_id": unit_ids,
        "lat": units["lat"].to_numpy(dtype=float), "lon": units["lon"].to_numpy(dtype=float), "k": k,
        "cluster": assigned, "cluster_probability": posterior.max(axis=1),
        "cluster_posterior": [list(map(float, p)) for p in posterior],
        "cluster_from_image": membership.argmax(axis=1),
        "cluster_membership": [list(map(float, p)) for p in membership],
        "cluster_effect": fit.mu[assigned], "cluster_effect_std_error": fit.mu_std_error[assigned],
        "computed_at": _now(),
    })
    summary = {
        **fit.to_dict(),
        "shares": np.bincount(assigned, minlength=k).astype(float) / len(assigned),
        "chosen_by_held_out_fit": selection is not None,
        "held_out_log_likelihood": None if selection is None else selection.held_out,
        "held_out_log_likelihood_se": None if selection is None else selection.held_out_se,
        "feature_set_for_init": fs_init,
    }
    truth = load_truth(study)
    if truth.units is not None and "effect_cluster" in truth.units.columns:
        from sklearn.metrics import adjusted_rand_score

        true = truth.units.set_index("unit_id").loc[unit_ids, "effect_cluster"].to_numpy()
        summary["ari_posterior"] = float(adjusted_rand_score(true, assigned))
        summary["ari_membership"] = float(adjusted_rand_score(true, membership.argmax(axis=1)))
        if truth.effect_clusters:
            summary["true_effects"] = truth.effect_clusters.get("effects")
    _write(table, EFFECT_CLUSTERS_SCHEMA, table_path)
    _write_json(summary, model_path)
    return ClusterStage(version, table, json.loads(json.dumps(summary, default=_json_default)), False)


def clusters_markdown(summary: dict) -> str:
    if not summary.get("k"):
        return f"(no cluster model: {summary.get('note', '')})"
    lines = ["| cluster | effect | SE | effect sd | share |", "|---|---:|---:|---:|---:|"]
    for j in range(int(summary["k"])):
        lines.append(f"| {j} | {summary['mu'][j]:.3f} | {summary['mu_std_error'][j]:.3f} | "
                     f"{summary['omega'][j]:.3f} | {summary['shares'][j]:.1%} |")
    if summary.get("ari_posterior") is not None:
        lines.append(f"\nAdjusted Rand index vs the simulated clusters: posterior {summary['ari_posterior']:.3f}, "
                     f"image-predicted {summary['ari_membership']:.3f}")
    return "\n".join(lines)


# --- stage: transport -------------------------------------------------------------------------


@dataclass
class TransportStage:
    version: str
    table: pd.DataFrame
    summary: dict
    from_cache: bool


def _transport_paths(study: Study, ws: Workspace, cate: CateStage, clusters: ClusterStage,
                     source) -> tuple[str, Path, Path]:
    version = json_version({
        "code": transport_mod.CODE_VERSION, "cate": cate.version, "clusters": clusters.version,
        "transport": study.heterogeneity.transport.model_dump(mode="json"), "imagery": source.fingerprint(),
        "chip": [study.imagery.chip_size_px, study.imagery.max_nodata_share],
    })
    out_dir = ws.figures / "transport" / f"{study.name}-{version}"
    return version, _paths(ws, study, "transport_predictions", version), out_dir


def load_transport(study: Study, ws: Workspace, cate: CateStage, clusters: ClusterStage,
                   source) -> TransportStage | None:
    """The transport stage's stored output for these inputs, or None if not computed."""
    version, table_path, out_dir = _transport_paths(study, ws, cate, clusters, source)
    if table_path.exists() and (out_dir / "summary.json").exists():
        return TransportStage(version, pd.read_parquet(table_path), _read_model(out_dir / "summary.json"), True)
    return None


def run_transport(study: Study, ws: Workspace, cate: CateStage, clusters: ClusterStage, source) -> TransportStage:
    """The image CATE model (and cluster membership) on a grid of cells over the transport region."""
    cached = load_transport(study, ws, cate, clusters, source)
    if cached is not None:
        return cached
    spec = study.heterogeneity.transport
    version, table_path, out_dir = _transport_paths(study, ws, cate, clusters, source)
    summary_path = out_dir / "summary.json"

    state = _read_model(cate.paths["model"])
    note = ""
    if not (cate.enabled and spec.enabled):
        note = cate.note or "transport is off in the study file"
    elif "image" not in state.get("final_stages", {}):
        note = "no linear image-only CATE model (heterogeneity.feature_sets lacks 'image', or learner is not linear)"
    bounds = crs_wkt = None
    if not note:
        if spec.bbox is not None:
            bounds = tuple(spec.bbox)
            if study.imagery.source == "geotiff":
                _, crs_wkt = transport_mod.imagery_footprint(_tiffs(study))
        elif study.imagery.source == "geotiff":
            bounds, crs_wkt = transport_mod.imagery_footprint(_tiffs(study))
        else:
            note = "heterogeneity.transport.bbox is required for imagery other than local GeoTIFFs"
    if note:
        empty = pd.DataFrame(columns=TRANSPORT_SCHEMA.names)
        _write(empty, TRANSPORT_SCHEMA, table_path)
        summary = {"note": note, "n_cells": 0, "n_predicted": 0}
        _write_json(summary, summary_path)
        return TransportStage(version, empty, summary, False)

    from eocausal.embed.reduce import PCAReduction

    grid = transport_mod.make_grid(bounds, spec.cells, crs_wkt)
    embedder, embeddings_version = study_embedder(study, ws)
    cluster_fit = None
    cluster_state = clusters.summary
    if cluster_state.get("k"):
        cluster_fit = clusters_mod.ClusterFit.from_dict(cluster_state)
    units = cate.predictions.drop_duplicates("unit_id")
    table = transport_mod.predict_grid(
        grid, source, chip_size_px=study.imagery.chip_size_px, max_nodata_share=study.imagery.max_nodata_share,
        chip_cache=ws.chip_cache, embedder=embedder, embedder_key=embeddings_version,
        embedding_cache=ws.cache / "transport_embeddings", pca=PCAReduction.from_dict(state["pca"]),
        final_stage=cate_mod.FinalStage.from_dict(state["final_stages"]["image"]), cluster_fit=cluster_fit,
        unit_lonlat=units[["lon", "lat"]].to_numpy(dtype=float), study_name=study.name, version=version,
        computed_at=_now(),
    )
    tif = transport_mod.write_geotiff(grid, table, out_dir / "transport_cate.tif")
    png = transport_mod.plot_transport_map(
        grid, table, units[["lon", "lat"]].to_numpy(dtype=float), out_dir / "transport_map.png",
        title=f"{study.name}: CATE predicted from imagery",
    )
    ok = table["status"] == "ok"
    summary = {
        "n_cells": int(len(table)), "n_predicted": int(ok.sum()),
        "n_outside_hull": int((ok & ~table["inside_study_hull"]).sum()),
        "cell_size_km": grid.cell_size / 1000.0, "width": grid.width, "height": grid.height,
        "bounds_wgs84": list(bounds), "geotiff": str(tif), "png": str(png),
        "excluded_by_reason": table.loc[~ok, "reason"].value_counts().to_dict(),
        "cate_mean": float(table.loc[ok, "cate"].mean()) if ok.any() else None,
        "cate_range": [float(table.loc[ok, "cate"].min()), float(table.loc[ok, "cate"].max())] if ok.any() else None,
    }
    _write(table, TRANSPORT_SCHEMA, table_path)
    _write_json(summary, summary_path)
    return TransportStage(version, table, summary, False)


def _tiffs(study: Study) -> list[Path]:
    """The study's GeoTIFF files (one file, or a folder's top-level *.tif/*.tiff; per-band products
    share their scene's footprint, so the union of all files is the imagery's footprint)."""
    from eocausal.imagery.geotiff import find_imagery_files

    return find_imagery_files(study.imagery_location)  # remote files open through GDAL's /vsicurl/


# --- stage: saliency --------------------------------------------------------------------------


@dataclass
class SaliencyStage:
    version: str
    summary: dict
    from_cache: bool


def _saliency_dir(study: Study, ws: Workspace, cate: CateStage, clusters: ClusterStage) -> tuple[str, Path]:
    version = json_version({"code": interpret.CODE_VERSION, "cate": cate.version, "clusters": clusters.version,
                            "units": study.heterogeneity.saliency_units})
    return version, ws.figures / "saliency" / f"{study.name}-{version}"


def load_saliency(study: Study, ws: Workspace, cate: CateStage, clusters: ClusterStage) -> SaliencyStage | None:
    """The saliency stage's stored output for these inputs, or None if not computed."""
    version, out_dir = _saliency_dir(study, ws, cate, clusters)
    if (out_dir / "summary.json").exists():
        return SaliencyStage(version, _read_model(out_dir / "summary.json"), True)
    return None


def run_saliency(study: Study, ws: Workspace, cate: CateStage, clusters: ClusterStage) -> SaliencyStage:
    """Saliency panels for the most and least likely treated units (image-only treatment model)."""
    cached = load_saliency(study, ws, cate, clusters)
    if cached is not None:
        return cached
    n_units = study.heterogeneity.saliency_units
    version, out_dir = _saliency_dir(study, ws, cate, clusters)
    summary_path = out_dir / "summary.json"
    state = _read_model(cate.paths["model"])
    note = ""
    if not cate.enabled or not state.get("pca"):
        note = cate.note or "no image features"
    elif study.embedding.method != "rcf":
        note = f"saliency needs the differentiable RCF embedding; embedding.method is {study.embedding.method!r}"
    if note:
        summary = {"note": note, "panels": []}
        _write_json(summary, summary_path)
        return SaliencyStage(version, summary, False)

    from eocausal.embed.reduce import PCAReduction
    from eocausal.imagery.chips import load_chips

    units = cate.predictions.drop_duplicates("unit_id").reset_index(drop=True)
    unit_ids = units["unit_id"].astype(str).tolist()
    components = _unit_components(study, ws, state, unit_ids)
    head = interpret.fit_propensity_head(components, units["treatment"].to_numpy(), seed=study.analysis.seed)
    propensity = 1.0 / (1.0 + np.exp(-head.numpy_logits(components)))
    order = np.argsort(-propensity, kind="stable")
    n = min(n_units, len(order) // 2)
    groups = {"most_likely_treated": order[:n], "least_likely_treated": order[::-1][:n]}

    embedder, _ = study_embedder(study, ws)
    model = interpret.DifferentiableImageFeatures(embedder, PCAReduction.from_dict(state["pca"]))
    cluster_fit = clusters_mod.ClusterFit.from_dict(clusters.summary) if clusters.summary.get("k", 0) > 1 else None
    index = pd.read_parquet(analysis_imagery(ws.lake, study, "image_chips"))
    index["unit_id"] = index["unit_id"].astype(str)
    panels, chosen = [], {}
    import torch

    for name, rows in groups.items():
        ids = [unit_ids[i] for i in rows]
        sub = index.set_index("unit_id").loc[ids].reset_index()
        chips, valid = load_chips(sub, ws.chip_cache)
        treat_maps, logits = interpret.saliency(model, chips, valid, lambda c: head.logits(c))
        cluster_maps, top = None, None
        if cluster_fit is not None:
            W, b, mean, scale = cluster_fit.torch_gate()
            top = cluster_fit.membership(components[rows]).argmax(axis=1)
            top_t = torch.as_tensor(top)

            def cluster_target(c, W=W, b=b, mean=mean, scale=scale, top_t=top_t):
                logp = torch.log_softmax(((c - mean) / scale) @ W + b, dim=1)
                return logp[torch.arange(len(c)), top_t]

            cluster_maps, _ = interpret.saliency(model, chips, valid, cluster_target)
        labels = [
            f"{u}\ne={1 / (1 + np.exp(-lg)):.2f}, D={int(units.loc[i, 'treatment'])}"
            + (f"\ncluster {int(t)}" if top is not None else "")
            for u, lg, i, t in zip(ids, logits, rows, top if top is not None else [None] * len(rows))
        ]
        title = f"{study.name}: {name.replace('_', ' ')} units (image-only treatment model)"
        panels.append(str(interpret.plot_saliency_panel(chips, valid, treat_maps, cluster_maps, labels, title,
                                                        out_dir / f"{name}.png")))
        chosen[name] = [{"unit_id": u, "propensity": float(propensity[i])} for u, i in zip(ids, rows)]
    summary = {"panels": panels, "units": chosen, "propensity_auc_in_sample": _auc(units["treatment"], propensity)}
    _write_json(summary, summary_path)
    return SaliencyStage(version, summary, False)


def _auc(d, score) -> float | None:
    from sklearn.metrics import roc_auc_score

    d = np.asarray(d).astype(int)
    return float(roc_auc_score(d, score)) if 0 < d.sum() < len(d) else None


# --- stage: the study report ------------------------------------------------------------------


def run_report(study: Study, ws: Workspace, published_db: Path, estimate_version: str, cate: CateStage,
               clusters: ClusterStage, transport: TransportStage, saliency: SaliencyStage):
    """Build the HTML report of this state of the study; returns (Report, version, from_cache)."""
    from eocausal import report as report_mod
    from eocausal.warehouse import query

    inputs = input_versions(ws.lake, study)
    chips_version = frame_version(pd.read_parquet(analysis_imagery(ws.lake, study, "image_chips")))
    version = json_version({
        "code": report_mod.CODE_VERSION, "estimates": estimate_version, "cate": cate.version,
        "clusters": clusters.version, "transport": transport.version, "saliency": saliency.version,
        "survey": inputs["survey"], "chips": chips_version,
    })
    out_dir = ws.reports / f"{study.name}-{version}"
    if (out_dir / "report.html").is_file():
        figures = {png.stem: png for png in sorted(out_dir.glob("*.png"))}
        if transport.summary.get("png"):
            figures["transport"] = Path(transport.summary["png"])
        downloads = {name: out_dir / f"{name}.parquet" for name in ("units", "estimates")
                     if (out_dir / f"{name}.parquet").is_file()}
        if transport.summary.get("geotiff"):
            downloads["transport_raster"] = Path(transport.summary["geotiff"])
        report = report_mod.Report(out_dir / "report.html", figures,
                                   [n for n in ("forest", "rate", "transport") if n in figures], downloads)
        _point_latest(ws, study, report.html_path)
        return report, version
    estimates = query(
        published_db,
        "select * from marts.effect_estimates where study = ? and estimate_version = ? "
        "order by estimand, estimator, feature_set",
        [study.name, estimate_version],
    )
    exclusions = query(published_db, "select unit_id, reason from marts.unit_exclusions")
    n_survey = len(pd.read_parquet(ws.lake / "survey.parquet", columns=["unit_id"]))
    truth = load_truth(study)
    notes = []
    if cate.note:
        notes.append(f"Heterogeneity: {cate.note}.")
    if transport.summary.get("note"):
        notes.append(f"Transport: {transport.summary['note']}.")
    if saliency.summary.get("note"):
        notes.append(f"Saliency: {saliency.summary['note']}.")
    truth_tau = None
    if truth.units is not None and len(cate.predictions):
        ids = set(cate.predictions["unit_id"].astype(str))
        truth_tau = truth.units[truth.units["unit_id"].isin(ids)]
    extras = report_extras(study, ws, exclusions, cate.predictions, clusters.table, inputs["embeddings"])
    report = report_mod.build_report(
        report_mod.ReportInputs(
            study=study.name, version=version, estimates=estimates, n_survey_units=n_survey,
            exclusions=exclusions, truth_ate=truth.ate, truth_dml=truth.variance_weighted_effect,
            cate_predictions=cate.predictions,
            cate_evaluation=cate.evaluation, clusters=clusters.summary,
            transport_png=Path(transport.summary["png"]) if transport.summary.get("png") else None,
            transport_summary=transport.summary,
            saliency_pngs=[Path(p) for p in saliency.summary.get("panels", [])],
            saliency_summary=saliency.summary, truth_tau=truth_tau, notes=notes,
            transport_raster=Path(transport.summary["geotiff"]) if transport.summary.get("geotiff") else None,
            **extras,
        ),
        out_dir,
    )
    _point_latest(ws, study, report.html_path)
    return report, version


def report_extras(study: Study | None, ws: Workspace, exclusions: pd.DataFrame, cate_predictions: pd.DataFrame | None,
                  clusters: pd.DataFrame | None, embeddings_version: str | None, period: str | None = None,
                  n_examples: int = 4) -> dict:
    """What the report shows about the units, read from the lake and the chip cache: the unit table,
    the imagery under the unit map, example chips of the most and least likely treated units, and
    the embedding PCA's explained variance (each None where it cannot be had)."""
    from eocausal import report as report_mod
    from eocausal.imagery.chips import load_chips
    from eocausal.imagery.preview import study_preview

    survey = pd.read_parquet(ws.lake / "survey.parquet")
    units = report_mod.unit_table(survey, exclusions, cate_predictions, clusters)
    period = period or (study.imagery.analysis_period_name() if study is not None else None)
    out: dict = {"units": units, "scene": None, "example_chips": None, "pca_explained_variance": None}
    if study is not None and len(units):
        lon, lat = units["lon"].astype(float), units["lat"].astype(float)
        out["scene"] = study_preview(study, around=(lon.min(), lat.min(), lon.max(), lat.max()))
    if period is None:
        return out
    chips_path = period_path(ws.lake, "image_chips", period)
    groups = report_mod.example_units(units, n_examples)
    if groups and chips_path.exists():
        index = pd.read_parquet(chips_path)
        index["unit_id"] = index["unit_id"].astype(str)
        index = index.drop_duplicates("unit_id").set_index("unit_id")
        chosen = {}
        try:
            for name, ids in groups.items():
                ids = [u for u in ids if u in index.index]
                data, valid = load_chips(index.loc[ids].reset_index(), ws.chip_cache)
                chosen[name] = (ids, data, valid)
            out["example_chips"] = chosen
        except Exception as exc:  # noqa: BLE001 - a missing picture never fails the report
            log.info("no example chips in the report: %s", exc)
    if embeddings_version:
        pca = stored_pca(ws.lake, period, embeddings_version)
        if pca is not None:
            out["pca_explained_variance"] = pca.explained_variance_ratio_.tolist()
    return out


def _point_latest(ws: Workspace, study: Study, html_path: Path) -> None:
    """reports/<study>.latest names the newest report (what `eocausal report` prints)."""
    atomic.write_text(ws.latest_report_pointer(study.name), str(html_path) + "\n")


def latest_report(workdir: Path, study_name: str) -> Path | None:
    """The newest report of a study in a working folder, or None."""
    pointer = Layout(workdir).latest_report_pointer(study_name)
    if not pointer.is_file():
        return None
    path = Path(pointer.read_text(encoding="utf-8").strip())
    return path if path.is_file() else None
