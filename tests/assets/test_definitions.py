import dagster as dg

from assets.definitions import STUDY_JOB, defs


def test_definitions_load_and_graph_is_wired():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for key in ["survey", "image_chips", "image_embeddings", "effect_estimates", "published_warehouse",
                "staging/stg_survey", "intermediate/int_units_imaged", "marts/analysis_units",
                "marts/unit_exclusions", "marts/effect_estimates", "marts/effect_estimates_latest"]:
        assert key in keys, key
    parents = lambda k: {p.to_user_string() for p in graph.get(dg.AssetKey.from_user_string(k)).parent_keys}
    assert parents("staging/stg_survey") == {"survey"}
    assert parents("staging/stg_image_embeddings") == {"image_embeddings"}
    assert parents("effect_estimates") == {"marts/analysis_units", "imputed_outcomes"}
    assert parents("imputed_outcomes") == {"marts/analysis_units"}
    assert parents("effect_sensitivity") == {"effect_estimates"}
    assert parents("staging/stg_effect_estimates") == {"effect_estimates"}
    assert defs.resolve_job_def(STUDY_JOB) is not None


def test_blocking_checks_and_pools():
    graph = defs.resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name): graph.get_check_spec(k) for k in graph.asset_check_keys}
    for asset, name in [("survey", "survey_suite"), ("image_chips", "chip_usability"),
                        ("image_embeddings", "embeddings_valid"), ("effect_estimates", "propensity_overlap")]:
        assert checks[(asset, name)].blocking, name
    # dbt tests are asset checks too
    assert ("marts/analysis_units", "unique_analysis_units_unit_id") in checks
    # Every warehouse writer or reader shares one pool.
    for key in ["effect_estimates", "published_warehouse", "marts/analysis_units", "marts/effect_estimates"]:
        node = graph.get(dg.AssetKey.from_user_string(key))
        assert node.pools == {"duckdb_warehouse"}, key
