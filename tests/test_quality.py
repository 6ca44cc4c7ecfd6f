"""Rules of eocausal.quality that need no GX run: the design rules and the completeness of a run's estimates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eocausal.quality import (
    IncompleteEstimatesError,
    RuleFailure,
    check_estimates_complete,
    design_failures,
    missing_estimates,
    requested_estimates,
)
from eocausal.study import AnalysisSpec


def units(treatment, outcome=None, cov=None) -> pd.DataFrame:
    n = len(treatment)
    return pd.DataFrame({
        "unit_id": [f"u{i}" for i in range(n)], "treatment": treatment,
        "outcome": outcome if outcome is not None else [float(i) for i in range(n)],
        "cov_a": cov if cov is not None else [float(i % 3) for i in range(n)],
    })


def rules(failures: list[RuleFailure]) -> list[str]:
    return [f.rule for f in failures]


def test_design_rules_quiet_on_a_usable_design():
    assert design_failures(units([0, 1] * 5), ["cov_a"], folds=5) == []


def test_folds_per_arm():
    failures = design_failures(units([1, 1, 0, 0, 0, 0, 0]), ["cov_a"], folds=3)
    assert rules(failures) == ["at least 3 treated units (analysis.folds = 3: each fold needs one of each arm)"]
    assert failures[0].describe().endswith("2 treated units: lower analysis.folds to at most 2")
    assert design_failures(units([1, 1, 0, 0, 0, 0, 0]), ["cov_a"], folds=2) == []
    assert design_failures(units([1, 1, 0, 0, 0, 0, 0]), ["cov_a"], folds=None) == []


def test_constant_outcome_and_covariate():
    failures = design_failures(units([0, 1] * 3, outcome=[1.0] * 6, cov=[7.0] * 6), ["cov_a"], folds=2)
    assert rules(failures) == ["outcome not constant", "cov_a not constant"]
    assert "every unit has outcome = 1.0" in failures[0].describe()
    assert "every unit has cov_a = 7.0" in failures[1].describe()


def test_constant_measured_outcome_with_imputation():
    outcome = [1.0, 1.0, None, None, 1.0, 1.0]
    failures = design_failures(units([0, 1] * 3, outcome=outcome), ["cov_a"], outcome_may_be_missing=True)
    assert rules(failures) == ["outcome not constant"]
    assert "every measured unit has outcome = 1.0" in failures[0].describe()


def test_table_level_failures_say_what_was_found():
    f = RuleFailure(rule="r", column=None, rows=[], unit_ids=[], examples=["3 treated units"])
    assert f.describe() == "rule 'r' failed; 3 treated units"


ANALYSIS = AnalysisSpec(estimators=["difference_in_means", "dml"], feature_sets=["none", "image"])


def table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["estimator", "feature_set", "estimand", "outcome_source"])


def test_requested_estimates():
    assert requested_estimates(ANALYSIS) == [
        ("difference_in_means", "none", "ATE", "measured"), ("dml", "none", "ATE", "measured"),
        ("difference_in_means", "image", "ATE", "measured"), ("dml", "image", "ATE", "measured"),
    ]
    imputing = ANALYSIS.model_copy(update={"outcome_imputation": True})
    sources = {r[3] for r in requested_estimates(imputing)}
    assert sources == {"measured", "imputed_corrected", "imputed_plugin"} and len(requested_estimates(imputing)) == 12


def test_complete_estimates_pass():
    full = table(requested_estimates(ANALYSIS))
    check_estimates_complete(full, ANALYSIS, "s")
    # Files written before outcome_source existed read it as NULL: the measured outcome.
    check_estimates_complete(full.assign(outcome_source=None), ANALYSIS, "s")
    check_estimates_complete(full.drop(columns="outcome_source"), ANALYSIS, "s")


def test_missing_rows_are_named():
    partial = table(requested_estimates(ANALYSIS)[1:3])
    assert missing_estimates(partial, ANALYSIS) == [("difference_in_means", "none", "ATE", "measured"),
                                                    ("dml", "image", "ATE", "measured")]
    with pytest.raises(IncompleteEstimatesError) as exc:
        check_estimates_complete(partial, ANALYSIS, "my--study.v2")
    msg = str(exc.value)
    assert "rule 'every requested estimate present' failed for study 'my--study.v2'" in msg
    assert "2 of 4 requested rows" in msg
    assert "difference_in_means x none x ATE x measured; dml x image x ATE x measured" in msg


def test_an_empty_output_misses_everything():
    with pytest.raises(IncompleteEstimatesError, match="4 of 4 requested rows"):
        check_estimates_complete(pd.DataFrame(), ANALYSIS, "s")


def test_many_missing_rows_are_capped():
    big = AnalysisSpec(outcome_imputation=True)  # 4 x 4 x 1 x 3 = 48 rows
    with pytest.raises(IncompleteEstimatesError, match=r"48 of 48 requested rows .* \(\+38 more\)"):
        check_estimates_complete(table([]), big, "s")


def test_embeddings_check_in_row_blocks_names_non_finite_units_and_constant_features():
    from eocausal.quality import validate_embeddings

    rng = np.random.default_rng(0)
    features = rng.normal(size=(5000, 4)).astype(np.float32)  # more than one 4,096-row block
    ids = [f"u{i}" for i in range(5000)]
    assert validate_embeddings(features, ids).success
    features[4500, 2] = np.nan
    report = validate_embeddings(features, ids)
    assert not report.success and "u4500" in report.message()
    flat = np.full((5000, 4), 0.25, dtype=np.float32)
    flat[4999, 0] = np.inf  # a non-finite value does not make a constant column vary
    report = validate_embeddings(flat, ids)
    assert "embedding not constant across units" in report.message() and "u4999" in report.message()
