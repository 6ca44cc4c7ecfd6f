"""Test helpers for the deployment catalog: published warehouses as eocausal writes them."""

import duckdb


def published(path, study, version, n_rows, covariate):
    """A published warehouse as eocausal writes it (marts with and without a study column, comments)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        con.execute("create schema marts")
        con.execute("create table marts.effect_estimates (study varchar, estimate_version varchar, estimate double)")
        con.executemany("insert into marts.effect_estimates values (?, ?, ?)",
                        [(study, version, float(i)) for i in range(n_rows)])
        con.execute("comment on table marts.effect_estimates is 'Append-only history of effect estimates.'")
        con.execute("comment on column marts.effect_estimates.estimate is 'The effect estimate.'")
        con.execute(f"create table marts.analysis_units (unit_id varchar, {covariate} double)")
        con.execute("insert into marts.analysis_units values ('u1', 1.5)")
        con.execute("create table marts.current_estimate (study varchar, estimate_version varchar)")
        con.execute("insert into marts.current_estimate values (?, ?)", [study, version])
        con.execute("create view marts.effect_estimates_latest as select * from marts.effect_estimates")
    return path
