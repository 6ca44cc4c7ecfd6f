"""Asset `effect_sensitivity`: how strong an unobserved confounder would have to be to explain each
AIPW/DML estimate away — robustness values (stored with the estimates), bounds, contour plots."""

import base64
import json
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.resources import StudyResource, WarehouseResource
from eocausal.estimate.effects import CODE_VERSION
from eocausal.estimate.sensitivity import MISMATCH_NOTE, SensitivityStats, benchmark_strengths, contour_plot

# Benchmarks: a feature set and the smaller one that leaves out a group, named by the group.
BENCHMARKS = {
    "tabular+image": {"image": "tabular", "covariates": "image"},
    "image": {"image": "none"},
    "tabular": {"covariates": "none"},
}
# The estimate whose contour plot the metadata shows inline (the first one present).
HEADLINE = [("tabular+image", "aipw"), ("image", "aipw"), ("tabular+image", "dml"), ("image", "dml")]


def _stats(row) -> SensitivityStats:
    return SensitivityStats.from_dict(json.loads(row["sensitivity"])["stats"])


def sensitivity_rows(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[table["robustness_value"].notna()] if "robustness_value" in table else table.iloc[0:0]
    return rows.assign(outcome_source=rows["outcome_source"].fillna("measured")) if len(rows) else rows


def benchmarks_for(rows: pd.DataFrame, row) -> dict[str, tuple[float, float]]:
    """Strengths of the observed feature groups, from the estimates that leave each one out."""
    out = {}
    for group, short_fs in BENCHMARKS.get(row["feature_set"], {}).items():
        short = rows[(rows["feature_set"] == short_fs) & (rows["estimator"] == row["estimator"])
                     & (rows["outcome_source"] == row["outcome_source"]) & (rows["estimand"] == row["estimand"])]
        if len(short):
            out[f"as strong as the {group}"] = benchmark_strengths(_stats(row), _stats(short.iloc[0]))
    return out


@dg.asset(
    group_name="estimates",
    kinds={"python", "matplotlib"},
    code_version=CODE_VERSION,
    deps=[dg.AssetKey("effect_estimates")],
    check_specs=[
        dg.AssetCheckSpec(
            "robustness_values",
            asset="effect_sensitivity",
            blocking=False,
            description="Every AIPW/DML ATE estimate (measured or corrected outcomes) has robustness values, "
                        "computed around the reported estimate.",
        )
    ],
)
def effect_sensitivity(
    context: AssetExecutionContext, study: StudyResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    spec = study.load()
    # The estimates this run materialised (the same version, whether computed or reused).
    # (the study's: [study, "effect_estimates"] in a deployment, beside this asset's own key)
    estimates_key = dg.AssetKey([*context.asset_key.path[:-1], "effect_estimates"])
    event = context.instance.get_latest_materialization_event(estimates_key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(description="effect_estimates has not been materialised")
    meta = event.asset_materialization.metadata
    version = str(meta["estimate_version"].value)
    table = pd.read_parquet(meta["path"].value)

    expected = table[table["estimator"].isin(["aipw", "dml"]) & (table["estimand"] == "ATE")]
    if "outcome_source" in expected:
        expected = expected[expected["outcome_source"].fillna("measured") != "imputed_plugin"]
    rows = sensitivity_rows(table)
    figures = warehouse.layout.figures / "sensitivity" / f"{spec.name}-{version}"
    lines = ["| outcome | feature set | estimator | estimate | RV | RV_alpha | bound at r²=0.05 "
             "| benchmarks (r_d, r_y) |",
             "|---|---|---|---:|---:|---:|---|---|"]
    paths, notes, by_key = {}, [], {}
    for _, row in rows.iterrows():
        stats = _stats(row)
        summary = json.loads(row["sensitivity"])
        bench = benchmarks_for(rows, row)
        name = f"{row['outcome_source']}-{row['estimator']}-{row['feature_set'].replace('+', '_')}"
        title = (f"{row['estimator']} | {row['feature_set']} | {row['outcome_source']}: "
                 f"{stats.theta:.3f} (SE {stats.std_error:.3f})")
        path = contour_plot(stats, figures / f"{name}.png", title=title, benchmarks=bench)
        paths[name] = str(path)
        at05 = next((b for b in summary["bounds_at_equal_strengths"] if abs(b["r2"] - 0.05) < 1e-9), None)
        bound = f"[{at05['theta_lower']:.3f}, {at05['theta_upper']:.3f}]" if at05 else "–"
        bench_text = "; ".join(f"{k}: ({v[0]:.2f}, {v[1]:.2f})" for k, v in bench.items()) or "–"
        lines.append(f"| {row['outcome_source']} | {row['feature_set']} | {row['estimator']} | {row['estimate']:.3f} | "
                     f"{row['robustness_value']:.3f} | {row['robustness_value_alpha']:.3f} | {bound} | {bench_text} |")
        notes += [f"{name}: {n}" for n in stats.notes]
        by_key[(row["outcome_source"], row["feature_set"], row["estimator"])] = path
    headline = next((by_key[(source, fs, est)] for fs, est in HEADLINE
                     for source in ("imputed_corrected", "measured") if (source, fs, est) in by_key), None)

    missing = len(expected) - len(rows)
    mismatched = [n for n in notes if MISMATCH_NOTE in n]
    passed = missing == 0 and not mismatched
    description = (f"{len(rows)} estimate(s) with robustness values"
                   + (f"; {missing} AIPW/DML ATE estimate(s) without" if missing else "")
                   + (f"; {'; '.join(notes)}" if notes else ""))
    metadata = {
        "estimate_version": version,
        "n_estimates": len(rows),
        "robustness": dg.MetadataValue.md("\n".join(lines)),
        "figures": dg.MetadataValue.json(paths),
        "how_to_read": dg.MetadataValue.md(
            "RV: the partial R² an unobserved confounder needs with both treatment and outcome (beyond the "
            "adjustment set) to move the estimate to zero; RV_alpha: to make it insignificant. Compare with "
            "the benchmarks: the strength the observed covariates / image had. Omitted-variable-bias bounds "
            "for debiased ML (Chernozhukov, Cinelli, Newey, Sharma & Syrgkanis 2022)."
        ),
    }
    if headline is not None:
        png = base64.b64encode(Path(headline).read_bytes()).decode()
        metadata["contour"] = dg.MetadataValue.md(f"![contour](data:image/png;base64,{png})")
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[dg.AssetCheckResult(check_name="robustness_values", passed=passed, description=description)],
    )
