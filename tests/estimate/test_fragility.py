"""Fragility checks (eocausal.estimate.fragility) on designs built to trigger them and not to."""

from dataclasses import replace

import numpy as np

from eocausal.estimate.ate import estimate_effects
from eocausal.estimate.components import choose_components
from eocausal.estimate.fragility import (
    PRODUCTS_THRESHOLD,
    THRESHOLD,
    chip_scale_check,
    products_comparison,
    specification_check,
)


def _design(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    inside = rng.standard_normal(n)  # a confounder the chip shows
    outside = rng.standard_normal(n)  # one only a wider window shows
    chip = np.column_stack([inside + 0.1 * rng.standard_normal(n), rng.standard_normal((n, 7))])
    context = np.column_stack([outside + 0.1 * rng.standard_normal(n), rng.standard_normal((n, 7))])
    return rng, inside, outside, chip, context


def _draw(rng, confounder, n):
    d = (rng.random(n) < 1 / (1 + np.exp(-1.2 * confounder))).astype(int)
    y = 1.5 * confounder + d + rng.standard_normal(n)
    return y, d


def test_chip_scale_warns_when_the_confounder_lies_beyond_the_chip():
    rng, inside, outside, chip, context = _design()
    y, d = _draw(rng, inside + outside, inside.size)
    headline = estimate_effects(y, d, chip, estimators=("aipw",), folds=5, seed=0)["aipw"]
    check = chip_scale_check(y, d, chip, context, folds=5, seed=0, headline=headline)
    assert check.warning is not None and "beyond the chip" in check.warning
    assert check.to_dict()["comparisons"][0]["name"] == "chip + context"


def test_chip_scale_is_quiet_when_the_chip_holds_the_confounder():
    rng, inside, _, chip, context = _design(seed=1)
    y, d = _draw(rng, inside, inside.size)
    headline = estimate_effects(y, d, chip, estimators=("aipw",), folds=5, seed=0)["aipw"]
    check = chip_scale_check(y, d, chip, context, folds=5, seed=0, headline=headline)
    assert check.warning is None and check.max_abs_z < THRESHOLD


def test_specification_check_compares_image_only_and_another_component_count():
    rng, inside, _, chip, _ = _design(seed=2)
    y, d = _draw(rng, inside, inside.size)
    tabular = rng.standard_normal((inside.size, 2))
    X = np.hstack([tabular, chip[:, :4]])
    headline = estimate_effects(y, d, X, estimators=("aipw",), folds=5, seed=0)["aipw"]
    check = specification_check(y, d, tabular, chip, 4, folds=5, seed=0, headline=headline)
    assert [c.name for c in check.comparisons] == ["image only", "8 components",
                                                   "products of the 4 leading components"]
    assert check.warning is None


def test_specification_check_warns_when_the_confounder_is_a_product_of_image_quantities():
    # Two land covers and their product (the zoo's mix): a linear adjustment on the components
    # misses the product, the squares and products of the leading components do not.
    rng = np.random.default_rng(4)
    n = 2000
    chip = rng.standard_normal((n, 8))
    a, b = chip[:, 0], chip[:, 1]
    confounder = (a + b + 1.5 * a * b) / 2
    y, d = _draw(rng, confounder, n)
    tabular = rng.standard_normal((n, 2))
    headline = estimate_effects(y, d, np.hstack([tabular, chip]), estimators=("aipw",), folds=5, seed=0)["aipw"]
    check = specification_check(y, d, tabular, chip, 8, folds=5, seed=0, headline=headline)
    products = check.comparisons[-1]
    assert products.name == "products of the 4 leading components"
    assert abs(products.z) > THRESHOLD and "products of the 4 leading components" in check.warning
    assert abs(products.estimate - 1.0) < abs(headline.estimate - 1.0)


def test_products_comparison_keeps_the_headlines_propensity():
    # The comparison changes only the outcome models: it takes the headline's cross-fitted
    # propensity, and refitting it on the same folds (a headline that carries none) gives the same.
    rng = np.random.default_rng(5)
    n = 1000
    chip = rng.standard_normal((n, 8))
    y, d = _draw(rng, chip[:, 0] + 0.5 * chip[:, 0] * chip[:, 1], n)
    tabular = rng.standard_normal((n, 2))
    headline = estimate_effects(y, d, np.hstack([tabular, chip]), estimators=("aipw",), folds=5, seed=3)["aipw"]
    assert headline.propensity is not None and headline.propensity.shape == (n,)
    kept = products_comparison(y, d, tabular, chip, folds=5, seed=3, headline=headline)
    refit = products_comparison(y, d, tabular, chip, folds=5, seed=3, headline=replace(headline, propensity=None))
    assert np.isclose(kept.estimate, refit.estimate, rtol=0, atol=1e-9) and np.isclose(kept.z, refit.z, atol=1e-6)
    assert kept.name == "products of the 4 leading components" and kept.threshold == PRODUCTS_THRESHOLD


def test_component_choice_reaches_the_component_that_carries_the_confounder():
    rng = np.random.default_rng(3)
    n = 1500
    components = rng.standard_normal((n, 64))
    confounder = components[:, 40]
    d = (rng.random(n) < 1 / (1 + np.exp(-confounder))).astype(int)
    y = 2 * confounder + d + rng.standard_normal(n)
    choice = choose_components(y, d, None, components)
    assert choice.n_components == 64
    assert choice.losses[64] < choice.losses[32]


def test_study_checks_reuse_the_headline_fit_and_equal_a_fresh_one():
    import pandas as pd

    from eocausal.estimate.effects import estimate_study, feature_sets, fragility_checks
    from eocausal.study import AnalysisSpec

    rng = np.random.default_rng(3)
    n = 400
    emb = rng.standard_normal((n, 16))
    d = (rng.random(n) < 1 / (1 + np.exp(-emb[:, 0]))).astype(int)
    units = pd.DataFrame({"unit_id": [f"u{i}" for i in range(n)], "treatment": d,
                          "outcome": 2 * emb[:, 0] + d + rng.standard_normal(n), "cov_a": rng.standard_normal(n)})
    units["embedding"] = list(emb)
    analysis = AnalysisSpec(folds=3, image_components=6, estimators=["aipw"], feature_sets=["tabular+image"],
                            chip_scale_check=False)
    table = estimate_study(units, ["cov_a"], analysis, study_name="s", survey_version="a", embeddings_version="b").table
    fresh = fragility_checks(units, ["cov_a"], analysis, feature_sets(units, ["cov_a"], analysis, None), None, None,
                             np.ones(n, dtype=bool))
    assert table["fragility"].iloc[0] == fresh["fragility"]


def _study_units(rng, n, chip, confounder, d_slope=1.2):
    import pandas as pd

    d = (rng.random(n) < 1 / (1 + np.exp(-d_slope * confounder))).astype(int)
    units = pd.DataFrame({"unit_id": [f"u{i}" for i in range(n)], "treatment": d,
                          "outcome": 1.5 * confounder + d + rng.standard_normal(n), "cov_a": rng.standard_normal(n)})
    units["image_components"] = list(chip)
    return units


def test_context_columns_fill_unusable_windows_with_the_mean_and_flag_them():
    from eocausal.estimate.effects import context_columns
    from eocausal.study import AnalysisSpec

    context = np.random.default_rng(0).standard_normal((50, 8))
    context[[3, 7]] = np.nan
    cols, names = context_columns(context, AnalysisSpec(context_components=4))
    assert cols.shape == (50, 5) and names == ["context_pc1", "context_pc2", "context_pc3", "context_pc4",
                                               "context_missing"]
    assert (cols[[3, 7], :4] == 0).all() and cols[:, 4].tolist() == [float(i in (3, 7)) for i in range(50)]
    assert context_columns(context[~np.isnan(context).any(axis=1)], AnalysisSpec(context_components=4))[0].shape == (48, 4)
    assert context_columns(context, AnalysisSpec(context_components=0)) is None
    assert context_columns(None, AnalysisSpec()) is None


def test_the_headline_adjusts_for_the_context_and_the_chip_scale_check_compares_the_chip_alone():
    """A confounder only the context window shows: the headline (chip + context, the default)
    covers the truth, and the check warns that the chip alone moves it."""
    import json

    import pandas as pd

    from eocausal.estimate.effects import estimate_study
    from eocausal.study import AnalysisSpec

    rng, inside, outside, chip, context = _design(seed=4)
    units = _study_units(rng, inside.size, chip, inside + outside)
    analysis = AnalysisSpec(image_components=8, estimators=["aipw"], feature_sets=["tabular+image"],
                            context_components=8)
    table = estimate_study(units, ["cov_a"], analysis, study_name="s", survey_version="a", embeddings_version="b",
                           context=context).table
    row = table.iloc[0]
    assert row["n_features"] == 1 + 8 + 8
    assert row["ci_low"] <= 1.0 <= row["ci_high"]
    assert row["chip_scale_warning"] is not None and "adjusts for" in row["chip_scale_warning"]
    detail = json.loads(row["fragility"])
    assert detail["headline"]["context_columns"] == 8
    assert [c["name"] for c in detail["chip_scale"]["comparisons"]] == ["chip only"]
    # The specification check's alternatives keep the context: they agree with the headline.
    assert pd.isna(row["specification_warning"])

    without = estimate_study(units, ["cov_a"], analysis.model_copy(update={"context_components": 0}),
                             study_name="s", survey_version="a", embeddings_version="b", context=context).table.iloc[0]
    assert without["n_features"] == 1 + 8 and not without["ci_low"] <= 1.0 <= without["ci_high"]
    assert json.loads(without["fragility"])["chip_scale"]["comparisons"][0]["name"] == "chip + context"
    assert without["chip_scale_warning"] is not None and "analysis.context_components" in without["chip_scale_warning"]
    assert without["estimate_version"] != row["estimate_version"]


def test_the_chip_scale_check_is_quiet_when_the_chip_holds_the_confounder_and_the_headline_sees_the_context():
    import pandas as pd

    from eocausal.estimate.effects import estimate_study
    from eocausal.study import AnalysisSpec

    rng, inside, _, chip, context = _design(seed=5)
    units = _study_units(rng, inside.size, chip, inside)
    analysis = AnalysisSpec(image_components=8, estimators=["aipw"], feature_sets=["tabular+image"],
                            context_components=8)
    row = estimate_study(units, ["cov_a"], analysis, study_name="s", survey_version="a", embeddings_version="b",
                         context=context).table.iloc[0]
    assert row["ci_low"] <= 1.0 <= row["ci_high"] and pd.isna(row["chip_scale_warning"])
