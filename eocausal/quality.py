"""Great-expectations suites for every input that can reach the warehouse (DESIGN §8).

Each suite runs on a pandas DataFrame in an ephemeral GX 1.x context and comes back as a
:class:`QualityReport`: which rules failed, on which rows and units, in words a user can act on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Offline machines: no analytics calls.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

_MAX_LISTED = 10  # rows/units named per rule in messages


@dataclass
class RuleFailure:
    rule: str  # e.g. "unique unit_id"
    column: str | None
    rows: list[int]  # 0-based data row positions (file line = row + 2 for a CSV with header)
    unit_ids: list[str]
    examples: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        n = len(self.rows)
        parts = [f"rule '{self.rule}' failed"]
        if n:
            shown_rows = ", ".join(str(r) for r in self.rows[:_MAX_LISTED])
            more = f" (+{n - _MAX_LISTED} more)" if n > _MAX_LISTED else ""
            parts.append(f"on {n} row(s): rows {shown_rows}{more}")
            ids = [u for u in self.unit_ids[:_MAX_LISTED] if u is not None]
            if ids:
                parts.append(f"units {', '.join(map(str, ids))}")
            if self.examples:
                parts.append(f"values {self.examples[:5]}")
        elif self.examples:
            # A table-level rule (no rows to name): the examples say what was found.
            parts.append(", ".join(str(e) for e in self.examples[:5]))
        return "; ".join(parts)


@dataclass
class QualityReport:
    suite: str
    n_rows: int
    failures: list[RuleFailure]
    n_expectations: int
    # Facts worth reporting that break no rule (e.g. how many outcomes are missing, where allowed).
    observations: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return not self.failures

    def message(self) -> str:
        if self.success:
            text = f"{self.suite}: all {self.n_expectations} expectations passed on {self.n_rows} rows"
            notes = [str(v["note"]) for v in self.observations.values() if isinstance(v, dict) and "note" in v]
            return "; ".join([text, *notes])
        lines = [f"{self.suite}: {len(self.failures)} rule(s) failed on {self.n_rows} rows"]
        lines += [f"  - {f.describe()}" for f in self.failures]
        return "\n".join(lines)

    def to_metadata(self) -> dict:
        return {
            "suite": self.suite,
            "success": self.success,
            "n_rows": self.n_rows,
            "n_expectations": self.n_expectations,
            "failures": [
                {"rule": f.rule, "column": f.column, "n_rows": len(f.rows), "rows": f.rows[:50],
                 "unit_ids": [str(u) for u in f.unit_ids[:50]]}
                for f in self.failures
            ],
            **({"observations": self.observations} if self.observations else {}),
        }


class DataQualityError(ValueError):
    """Input rejected by a quality suite; the message names the rules, rows and units."""

    def __init__(self, report: QualityReport):
        self.report = report
        super().__init__(report.message())


def _run_suite(
    name: str, df: pd.DataFrame, expectations: list[tuple[str, Any]], id_column: str | None
) -> QualityReport:
    """Validate df against (rule label, GX expectation) pairs; collect failing rows."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        context.data_sources.add_pandas(f"{name}_source")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    # Results come back keyed by expectation type and column; each suite has one of each pair.
    labels = {}
    for label, expectation in expectations:
        suite.add_expectation(expectation)
        labels[(expectation.expectation_type, getattr(expectation, "column", None))] = label
    # GX reports positions in the frame's index: give it 0..n-1.
    frame = df.reset_index(drop=True)
    batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    failures = []
    for res in result.results:
        if res.success:
            continue
        config = res.expectation_config
        rows = sorted(int(i) for i in (res.result.get("unexpected_index_list") or []))
        ids = frame[id_column].iloc[rows].astype(str).tolist() if id_column and rows else []
        examples = list(res.result.get("partial_unexpected_list") or [])[:5]
        failures.append(
            RuleFailure(
                rule=labels.get((config.type, config.kwargs.get("column")), config.type),
                column=config.kwargs.get("column"),
                rows=rows,
                unit_ids=ids,
                examples=[_plain(v) for v in examples],
            )
        )
    return QualityReport(suite=name, n_rows=len(frame), failures=failures, n_expectations=len(expectations))


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


# Finite means between these; GX treats NaN as missing (caught by not-null) and inf as out of range.
# Beyond 1e15 a number is a fill code (9.97e36, 3.4e38) or a unit error, not a measurement: it
# passes a float check but overflows the squared sums the estimators form (NaN at 1e200) or
# swamps them (an AIPW estimate of 1e148 from one covariate at 1e150).
MAX_ABS_VALUE = 1e15
_FINITE = dict(min_value=-MAX_ABS_VALUE, max_value=MAX_ABS_VALUE)


# With outcome imputation on, each treatment arm needs at least this many measured outcomes.
MIN_MEASURED_OUTCOMES_PER_ARM = 3


def survey_expectations(covariates: list[str], outcome_may_be_missing: bool = False) -> list[tuple[str, Any]]:
    """The survey suite on the canonical table (see eocausal.survey).

    ``outcome_may_be_missing`` (the study's ``analysis.outcome_imputation``) drops the not-null
    rule for the outcome only; a present outcome must still be finite.
    """
    import great_expectations.expectations as gxe

    exp: list[tuple[str, Any]] = []
    for col in ("unit_id", "lat", "lon", "treatment", "outcome", *covariates):
        if col == "outcome" and outcome_may_be_missing:
            continue
        exp.append((f"{col} not null", gxe.ExpectColumnValuesToNotBeNull(column=col)))
    exp += [
        ("unique unit_id", gxe.ExpectColumnValuesToBeUnique(column="unit_id")),
        ("lat within [-90, 90]", gxe.ExpectColumnValuesToBeBetween(column="lat", min_value=-90, max_value=90)),
        ("lon within [-180, 180]", gxe.ExpectColumnValuesToBeBetween(column="lon", min_value=-180, max_value=180)),
        ("treatment binary (0/1)", gxe.ExpectColumnValuesToBeInSet(column="treatment", value_set=[0, 1])),
        ("outcome finite (|value| <= 1e15)", gxe.ExpectColumnValuesToBeBetween(column="outcome", **_FINITE)),
    ]
    for col in covariates:
        exp.append((f"{col} finite (|value| <= 1e15)", gxe.ExpectColumnValuesToBeBetween(column=col, **_FINITE)))
    return exp


def validate_survey(df: pd.DataFrame, covariates: list[str], outcome_may_be_missing: bool = False,
                    folds: int | None = None) -> QualityReport:
    """The survey suite, then the design rules (:func:`design_failures`) once the values are valid.

    ``folds`` (the study's ``analysis.folds``): each arm needs at least that many units; None
    skips that rule (a survey checked without its study's analysis settings).
    """
    report = _run_suite("survey", df, survey_expectations(covariates, outcome_may_be_missing), id_column="unit_id")
    # Both arms must be present for any contrast; a table-level rule GX has no row list for.
    if report.success:
        arms = set(pd.unique(df["treatment"]))
        for arm in (0, 1):
            if arm not in arms:
                report.failures.append(
                    RuleFailure(rule=f"treatment arm {arm} present", column="treatment", rows=[], unit_ids=[],
                                examples=[f"treatment is constant: all {len(df)} units have treatment {1 - arm}"])
                )
        if report.success:
            report.failures += design_failures(df, covariates, folds=folds,
                                               outcome_may_be_missing=outcome_may_be_missing)
    if outcome_may_be_missing:
        _check_missing_outcomes(df, report)
    return report


def design_failures(df: pd.DataFrame, covariates: list[str], folds: int | None = None,
                    outcome_may_be_missing: bool = False) -> list[RuleFailure]:
    """Designs no estimator can use, caught before any chip is cut (on a table with valid values).

    - each arm has at least ``folds`` units (cross-fitting stratifies folds by arm: one per fold);
      with missing outcomes allowed, at least ``folds`` with a measured outcome;
    - the outcome is not constant (nothing to contrast);
    - no covariate is constant (it cannot adjust for anything, and breaks the scaling of the rest).
    A constant treatment is the rule 'treatment arm N present' of :func:`validate_survey`.
    """
    failures: list[RuleFailure] = []
    measured = df["outcome"].notna().to_numpy() if outcome_may_be_missing else np.ones(len(df), dtype=bool)
    if folds is not None:
        for arm, name in ((1, "treated"), (0, "control")):
            in_arm = (df["treatment"] == arm).to_numpy()
            n = int((in_arm & measured).sum())
            if 0 < int(in_arm.sum()) and n < folds:
                what = f"{name} units with a measured outcome" if outcome_may_be_missing else f"{name} units"
                failures.append(RuleFailure(
                    rule=f"at least {folds} {what} (analysis.folds = {folds}: each fold needs one of each arm)",
                    column="treatment", rows=[], unit_ids=[],
                    examples=[f"{n} {what}: lower analysis.folds to at most {n}" if n >= 2
                              else f"{n} {what}: too few for any cross-fitting"],
                ))
    for column in ("outcome", *covariates):
        values = df[column].dropna() if column == "outcome" else df[column]
        distinct = pd.unique(values)
        if len(values) and len(distinct) == 1:
            failures.append(RuleFailure(
                rule=f"{column} not constant", column=column, rows=[], unit_ids=[],
                examples=[f"every {'measured ' if column == 'outcome' and outcome_may_be_missing else ''}"
                          f"unit has {column} = {_plain(distinct[0])}"],
            ))
    return failures


def _check_missing_outcomes(df: pd.DataFrame, report: QualityReport) -> None:
    """Count the missing outcomes (allowed with imputation) and require measured ones in each arm."""
    missing = df["outcome"].isna().to_numpy()
    by_arm = {}
    for arm, name in ((1, "treated"), (0, "control")):
        in_arm = (df["treatment"] == arm).to_numpy()
        measured = int((in_arm & ~missing).sum())
        by_arm[name] = {"n": int(in_arm.sum()), "n_missing": int((in_arm & missing).sum())}
        if in_arm.any() and measured < MIN_MEASURED_OUTCOMES_PER_ARM:
            report.failures.append(
                RuleFailure(
                    rule=f"outcome measured for at least {MIN_MEASURED_OUTCOMES_PER_ARM} {name} units "
                         "(outcome imputation learns from them)",
                    column="outcome", rows=[], unit_ids=[], examples=[f"{measured} measured"],
                )
            )
    rows = np.flatnonzero(missing).tolist()
    report.observations["outcome_missing"] = {
        "n_missing": len(rows),
        "share_missing": float(missing.mean()) if len(missing) else 0.0,
        "by_arm": by_arm,
        "unit_ids": df["unit_id"].iloc[rows[:50]].astype(str).tolist(),
        "note": f"outcome missing for {len(rows)} of {len(missing)} units (allowed: analysis.outcome_imputation)",
    }


def validate_chip_index(index: pd.DataFrame, max_nodata_share: float) -> QualityReport:
    """Chip records: every unit accounted for, usable chips within the nodata limit."""
    import great_expectations.expectations as gxe

    ok = index[index["status"] == "ok"]
    exp = [
        ("unit_id not null", gxe.ExpectColumnValuesToNotBeNull(column="unit_id")),
        ("unique unit_id", gxe.ExpectColumnValuesToBeUnique(column="unit_id")),
        ("status in {ok, excluded}", gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "excluded"])),
        ("valid_share within [0, 1]",
         gxe.ExpectColumnValuesToBeBetween(column="valid_share", min_value=0, max_value=1)),
    ]
    if "cloud_share" in index.columns:
        # NaN (unknown cloud share, e.g. a GeoTIFF without a QA band) counts as missing and passes.
        exp.append(("cloud_share within [0, 1]",
                    gxe.ExpectColumnValuesToBeBetween(column="cloud_share", min_value=0, max_value=1)))
    report = _run_suite("image_chips", index, exp, id_column="unit_id")
    # Excluded units carry a known reason; usable ones none (the warehouse groups exclusions by it).
    from eocausal.imagery.chips import REASONS

    excluded = index["status"] == "excluded"
    bad_reason = index.index[(excluded & ~index["reason"].isin(REASONS)) | (~excluded & index["reason"].notna())]
    if len(bad_reason):
        report.failures.append(
            RuleFailure(
                rule=f"excluded units have a reason in {list(REASONS)}; usable units none",
                column="reason",
                rows=[int(index.index.get_loc(i)) for i in bad_reason],
                unit_ids=index.loc[bad_reason, "unit_id"].astype(str).tolist(),
                examples=index.loc[bad_reason, "reason"].head(5).tolist(),
            )
        )
    # Usable chips must satisfy the nodata limit (checked on the 'ok' subset, rows mapped back).
    too_empty = ok.index[ok["valid_share"] < 1.0 - max_nodata_share - 1e-12].tolist()
    if too_empty:
        report.failures.append(
            RuleFailure(
                rule=f"usable chip nodata share <= {max_nodata_share}",
                column="valid_share",
                rows=[int(index.index.get_loc(i)) for i in too_empty],
                unit_ids=index.loc[too_empty, "unit_id"].astype(str).tolist(),
            )
        )
    return report


def too_few_usable_units(index: pd.DataFrame, min_usable_share: float, min_units: int = 10,
                         rows_of: np.ndarray | None = None) -> RuleFailure | None:
    """A failure naming the excluded units when too few units have a usable chip, else None.

    When every unit lies outside the imagery the cause is almost always the coordinates
    (latitude and longitude swapped, or not WGS84 degrees), so the rule says so. ``rows_of``: the
    survey row of each of ``index``'s rows (a sample's), when they are not the survey's rows.
    """
    usable = index["status"] == "ok"
    n_ok = int(usable.sum())
    if n_ok >= min_units and n_ok / max(len(index), 1) >= min_usable_share:
        return None
    rule = f"at least {min_usable_share:.0%} of units (and {min_units}) have a usable chip"
    reasons = index.loc[~usable, "reason"]
    if len(index) and (reasons == "outside_coverage").all() and not usable.any():
        rule += ": every unit is outside the imagery - are lat and lon swapped, or not WGS84 degrees?"
    at = np.flatnonzero(~usable.to_numpy())
    return RuleFailure(
        rule=rule, column="status", rows=(at if rows_of is None else np.asarray(rows_of)[at]).tolist(),
        unit_ids=index["unit_id"].iloc[at].astype(str).tolist(),
        examples=sorted(set(reasons.dropna().astype(str)))[:5],
    )


@dataclass
class ChipUsability:
    """The `chip_usability` check of a chip index: its records (:func:`validate_chip_index`) and,
    where asked, whether enough units are usable (:func:`too_few_usable_units`)."""

    passed: bool
    message: str
    report: QualityReport
    n_ok: int
    excluded: dict


def chip_usability(index: pd.DataFrame, max_nodata_share: float, min_usable_share: float, *,
                   require_enough: bool = True, rows_of: np.ndarray | None = None,
                   what: str = "units") -> ChipUsability:
    """Judge a chip index. ``require_enough`` False for one tile's (a tile may lie in the nodata
    border; the period's share is judged on the merged index); ``rows_of``: see too_few_usable_units."""
    report = validate_chip_index(index, max_nodata_share)
    n_ok = int((index["status"] == "ok").sum())
    excluded = {str(k): int(v) for k, v in index.loc[index["status"] != "ok", "reason"].value_counts().items()}
    usable_share = n_ok / max(len(index), 1)
    message = f"{n_ok} of {len(index)} {what} usable ({usable_share:.1%}); excluded by reason: {excluded or 'none'}"
    # The rule names the excluded units (and, if none is inside the imagery, the likely cause).
    shortfall = too_few_usable_units(index, min_usable_share, rows_of=rows_of) if require_enough else None
    if shortfall is not None:
        message += f"; below the minimum usable share {min_usable_share:.0%} (or under 10 units)"
        report.failures.append(shortfall)
    if not report.success:
        message += "\n" + report.message()
    return ChipUsability(bool(report.success and shortfall is None), message, report, n_ok, excluded)


def validate_embeddings(features: np.ndarray, unit_ids: list[str]) -> QualityReport:
    """Embeddings: finite everywhere, no constant-only columns set, rows not all identical."""
    import great_expectations.expectations as gxe

    # Row blocks, so the check holds a few MB beside the features, not several copies of them
    # (at 100,000 units x 1,536 floats each full-size temporary is 0.6 GB).
    n, p = features.shape
    finite_rows = np.empty(n, dtype=bool)
    norms = np.empty(n)
    low, high = np.full(p, np.inf), np.full(p, -np.inf)  # per column, over its finite values
    for start in range(0, n, 4096):
        block = features[start : start + 4096]
        finite = np.isfinite(block)
        finite_rows[start : start + 4096] = finite.all(axis=1)
        norms[start : start + 4096] = np.linalg.norm(np.where(finite, block, 0.0), axis=1)
        low = np.minimum(low, np.where(finite, block, np.inf).min(axis=0))
        high = np.maximum(high, np.where(finite, block, -np.inf).max(axis=0))
    frame = pd.DataFrame({"unit_id": list(unit_ids), "row_finite": finite_rows, "row_norm": norms})
    exp = [
        ("embedding values finite", gxe.ExpectColumnValuesToBeInSet(column="row_finite", value_set=[True])),
        ("unique unit_id", gxe.ExpectColumnValuesToBeUnique(column="unit_id")),
    ]
    report = _run_suite("image_embeddings", frame, exp, id_column="unit_id")
    n_constant = int(np.sum(~(high > low)))
    if p == 0 or n_constant == p:
        report.failures.append(
            RuleFailure(rule="embedding not constant across units", column=None, rows=[], unit_ids=[],
                        examples=[f"{n_constant} of {features.shape[1]} features constant"])
        )
    return report


class IncompleteEstimatesError(RuntimeError):
    """A run that produced fewer estimate rows than its study asks for."""


def requested_estimates(analysis, estimands: tuple[str, ...] = ("ATE",)) -> list[tuple[str, str, str, str]]:
    """The estimate rows a study's analysis asks for: (estimator, feature set, estimand, outcome source).

    ``estimands``: those the estimates stage computes (the ATE). With outcome imputation every row
    comes once per outcome source (measured, imputed_corrected, imputed_plugin).
    """
    from eocausal.estimate.imputation import MEASURED, OUTCOME_SOURCES

    sources = OUTCOME_SOURCES if analysis.outcome_imputation else (MEASURED,)
    return [(e, f, m, s) for s in sources for f in analysis.feature_sets for m in estimands
            for e in analysis.estimators]


def missing_estimates(table: pd.DataFrame, analysis, estimands: tuple[str, ...] = ("ATE",)
                      ) -> list[tuple[str, str, str, str]]:
    """The requested rows (:func:`requested_estimates`) that ``table`` lacks, in request order."""
    from eocausal.estimate.imputation import MEASURED

    present = set()
    if len(table):
        sources = table["outcome_source"] if "outcome_source" in table.columns else pd.Series(None, index=table.index)
        for e, f, m, s in zip(table["estimator"], table["feature_set"], table["estimand"], sources):
            present.add((e, f, m, MEASURED if s is None or (isinstance(s, float) and s != s) else s))
    return [row for row in requested_estimates(analysis, estimands) if row not in present]


def check_estimates_complete(table: pd.DataFrame, analysis, study_name: str,
                             estimands: tuple[str, ...] = ("ATE",)) -> None:
    """Raise IncompleteEstimatesError naming every requested row ``table`` lacks.

    A run that exits 0 must have printed (and published) every estimator x feature set x estimand
    x outcome source its study asks for.
    """
    missing = missing_estimates(table, analysis, estimands)
    if not missing:
        return
    n = len(requested_estimates(analysis, estimands))
    shown = "; ".join(f"{e} x {f} x {m} x {s}" for e, f, m, s in missing[:_MAX_LISTED])
    more = f" (+{len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
    raise IncompleteEstimatesError(
        f"rule 'every requested estimate present' failed for study {study_name!r}: {len(missing)} of {n} "
        f"requested rows (estimator x feature set x estimand x outcome source) are missing from the "
        f"estimates: {shown}{more}"
    )
