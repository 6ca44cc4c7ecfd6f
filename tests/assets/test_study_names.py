"""Study names at the edges of the allowed alphabet, through the whole graph and the CLI (issue 16).

A study renamed in its folder keeps its working folder, data and spec, so its estimate, CATE,
cluster and transport versions (which hash inputs and spec, not the name) are the first name's:
the warehouse's append-only marts must still add its rows, and `eocausal run` must print them.
Before the marts were keyed by study and version, the second run exited 0 and printed `[]`.
"""

from __future__ import annotations

import json

import pytest
import yaml

from eocausal.cli import main as cli_main
from eocausal.warehouse import query
from tests.assets.conftest import small_study

pytestmark = pytest.mark.slow  # two runs of the graph

ANALYSIS = {"estimators": ["difference_in_means", "ipw"], "feature_sets": ["none", "tabular"], "folds": 2}
HETEROGENEITY = {"feature_sets": ["image"], "rate_bootstrap": 20, "saliency_units": 1,
                 "transport": {"cells": 16}}  # transport needs the image CATE model
FIRST = "A" + "-." * 31 + "9"  # 64 characters, the most allowed, every separator doubled
SECOND = "my--study.v2"
MARTS = {"effect_estimates": "estimate_version", "cate_predictions": "cate_version",
         "cate_evaluation": "cate_version", "effect_clusters": "cluster_version",
         "transport_predictions": "transport_version"}


def rename(study_path, name):
    doc = yaml.safe_load(study_path.read_text())
    doc["name"] = name
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_a_renamed_study_in_the_same_working_folder_gets_its_rows(tmp_path, capsys):
    assert len(FIRST) == 64
    # n_features 96: a multiple of every RCF filter layout (branches x pooling regions x filter groups).
    study = small_study(tmp_path, n_units=80, analysis=ANALYSIS, heterogeneity=HETEROGENEITY,
                        embedding={"n_features": 96})
    printed = {}
    for name in (FIRST, SECOND):
        rename(study, name)
        assert cli_main(["run", str(study), "--json"]) == 0, capsys.readouterr().err[-3000:]
        printed[name] = json.loads(capsys.readouterr().out)
    for name, records in printed.items():
        assert {r["study"] for r in records} == {name}
        assert {(r["estimator"], r["feature_set"]) for r in records} == {
            (e, f) for e in ANALYSIS["estimators"] for f in ANALYSIS["feature_sets"]}
    # Same inputs and spec: the same version under both names, and both names' rows published.
    assert {r["estimate_version"] for r in printed[FIRST]} == {r["estimate_version"] for r in printed[SECOND]}
    db = study.parent / "eocausal_work" / "published" / "warehouse.duckdb"
    for mart, version in MARTS.items():
        counts = query(db, f"select study, count(distinct {version}) as v, count(*) as n from marts.{mart} group by 1")
        by_study = dict(zip(counts["study"], zip(counts["v"], counts["n"])))
        assert set(by_study) == {FIRST, SECOND}, (mart, by_study)
        assert by_study[FIRST] == by_study[SECOND], (mart, by_study)
    latest = query(db, "select study, count(*) as n from marts.effect_estimates_latest group by 1")
    assert dict(zip(latest["study"], latest["n"])) == {FIRST: 4, SECOND: 4}
