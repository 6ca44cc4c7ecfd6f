"""The deployment's published catalog (eocausal.catalog): every study's marts in one DuckDB file."""

import duckdb
import pytest

from eocausal.catalog import build_catalog
from tests.catalog_support import published


def test_catalog_holds_every_study_with_study_column_and_comments(tmp_path):
    a = published(tmp_path / "a" / "published" / "warehouse.duckdb", "alpha", "v1", 3, "cov_rain")
    b = published(tmp_path / "b" / "published" / "warehouse.duckdb", "beta", "v9", 2, "cov_road")
    catalog = build_catalog({"alpha": a, "beta": b, "gamma": tmp_path / "c" / "missing.duckdb"},
                            tmp_path / "catalog" / "catalog.duckdb")
    with duckdb.connect(str(catalog), read_only=True) as con:
        counts = dict(con.execute("select study, count(*) from marts.effect_estimates group by 1").fetchall())
        assert counts == {"alpha": 3, "beta": 2}
        assert con.execute("select count(*) from marts.effect_estimates_latest").fetchone()[0] == 5
        units = con.execute("select study, cov_rain, cov_road from marts.analysis_units order by study").fetchall()
        assert units == [("alpha", 1.5, None), ("beta", None, 1.5)]
        studies = con.execute("select study, estimate_version, published_at is not null from marts.studies "
                              "order by study").fetchall()
        assert studies == [("alpha", "v1", True), ("beta", "v9", True), ("gamma", None, False)]
        comment = con.execute("select comment from duckdb_columns() where table_name = 'effect_estimates' "
                              "and column_name = 'estimate'").fetchone()[0]
        assert comment == "The effect estimate."
    assert sorted(p.name for p in catalog.parent.iterdir()) == ["catalog.duckdb", "catalog.duckdb.lock"]


def test_a_broken_study_is_named_and_the_old_catalog_stays(tmp_path):
    a = published(tmp_path / "a.duckdb", "alpha", "v1", 3, "cov_rain")
    catalog = build_catalog({"alpha": a}, tmp_path / "catalog.duckdb")
    before = catalog.read_bytes()
    bad = tmp_path / "bad.duckdb"
    bad.write_text("not a database")
    from eocausal.catalog import CatalogError

    with pytest.raises(CatalogError, match="study 'beta'.*bad.duckdb"):
        build_catalog({"alpha": a, "beta": bad}, catalog)
    assert catalog.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".catalog.")) == []
