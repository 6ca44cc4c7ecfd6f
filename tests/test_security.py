"""Security: loopback-only UI, credentials never written, study paths confined, SQL identifiers safe."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml

from eocausal.imagery import chipstore
from eocausal.study import StudyError, load_study
from eocausal.survey import SurveyError, covariate_column
from eocausal.warehouse import WarehousePathError

REPO = Path(__file__).resolve().parent.parent


# -- the webserver --------------------------------------------------------------------------

def test_dev_server_binds_to_loopback():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ndev:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"dagster dev .*-h 127\.0\.0\.1", recipe), recipe
    for doc in ("Makefile", "README.md", "dagster.yaml", "workspace.yaml"):
        assert "0.0.0.0" not in (REPO / doc).read_text(), doc


# -- study paths ----------------------------------------------------------------------------

@pytest.fixture
def study_copy(tiny_study, tmp_path) -> Path:
    target = tmp_path / "study"
    shutil.copytree(tiny_study.parent, target, ignore=shutil.ignore_patterns("eocausal_work"))
    return target


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.csv").write_text("village_code,latitude\nX,1\n")
    return folder


def _set(study: Path, section: str, key: str, value: str) -> None:
    doc = yaml.safe_load((study / "study.yaml").read_text())
    doc[section][key] = value
    (study / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "survey_symlink", "imagery_dir_symlink", "tif_symlink"])
def test_study_paths_cannot_escape_the_study_folder(study_copy, outside, escape):
    if escape == "dotdot":
        _set(study_copy, "survey", "path", "../outside/secret.csv")
    elif escape == "absolute":
        _set(study_copy, "survey", "path", str(outside / "secret.csv"))
    elif escape == "survey_symlink":
        (study_copy / "villages.csv").unlink()
        (study_copy / "villages.csv").symlink_to(outside / "secret.csv")
    elif escape == "imagery_dir_symlink":
        shutil.copytree(study_copy / "imagery", outside / "imagery")
        shutil.rmtree(study_copy / "imagery")
        (study_copy / "imagery").symlink_to(outside / "imagery")
    else:
        [tif] = (study_copy / "imagery").glob("*.tif")
        shutil.move(tif, outside / tif.name)
        tif.symlink_to(outside / tif.name)
    with pytest.raises(StudyError, match="escapes the study folder"):
        load_study(study_copy / "study.yaml")


def test_links_that_stay_inside_are_allowed(study_copy):
    [tif] = (study_copy / "imagery").glob("*.tif")
    shutil.move(tif, study_copy / tif.name)
    tif.symlink_to(study_copy / tif.name)
    study = load_study(study_copy / "study.yaml")
    assert study.imagery_path == (study_copy / "imagery").resolve()


# -- identifiers and paths that reach SQL ---------------------------------------------------

@pytest.mark.parametrize("name", ['x"; drop table marts.effect_estimates; --', "Market Access (km)",
                                  "ÉLEVATION", "select", "a'b", "1st"])
def test_covariate_names_become_plain_identifiers(name):
    column = covariate_column(name)
    assert re.fullmatch(r"cov_[0-9a-z_]+", column), column
    # usable unquoted in DuckDB, and no keyword: the prefix keeps it an ordinary name
    with duckdb.connect() as con:
        con.execute(f"create table t ({column} double)")
        assert con.execute(f"select {column} from t").fetchall() == []


def test_covariate_name_without_letters_or_digits_is_refused():
    with pytest.raises(SurveyError):
        covariate_column("'; --")


@pytest.mark.parametrize("name", ["my study", "x';drop", "../up", ""])
def test_study_name_is_validated(study_copy, name):
    _set_name = yaml.safe_load((study_copy / "study.yaml").read_text())
    _set_name["name"] = name
    (study_copy / "study.yaml").write_text(yaml.safe_dump(_set_name))
    with pytest.raises(StudyError, match="name"):
        load_study(study_copy / "study.yaml")


@pytest.mark.parametrize("bad", ["o'brien", 'say "hi"', "semi;colon", "new\nline"])
def test_working_folder_that_would_break_sql_is_refused_before_any_work(study_copy, tmp_path, bad):
    from assets.runner import run_study
    from eocausal.cli import main

    workdir = tmp_path / bad / "work"
    with pytest.raises(WarehousePathError, match="not allowed"):
        run_study(study_copy / "study.yaml", workdir)
    assert not (tmp_path / bad).exists()
    assert main(["run", str(study_copy / "study.yaml"), "--workdir", str(workdir)]) == 2


# -- credentials are never written ----------------------------------------------------------

def _strings_in(path: Path) -> str:
    """The text a file holds, decoded from the formats the pipeline writes."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
        # binary columns (GeoParquet's WKB geometry) read as bytes: their text, byte for byte
        return df.map(lambda v: v.decode("latin-1") if isinstance(v, bytes) else v).astype(str).to_csv()
    if suffix == ".duckdb":
        parts = []
        with duckdb.connect(str(path), read_only=True) as con:
            tables = con.execute("select schema_name, table_name from duckdb_tables()").fetchall()
            for schema, table in tables:
                parts.append(con.execute(f'select * from "{schema}"."{table}"').df().astype(str).to_csv())
            parts.append(str(con.execute("select sql from duckdb_views() where not internal").fetchall()))
        return "\n".join(parts)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return "\n".join(str(z[k]) for k in z.files if z[k].dtype.kind in "USO")
    return path.read_bytes().decode("latin-1")


def find_secrets(paths: list[Path], secrets: list[str]) -> list[str]:
    found = []
    for path in paths:
        if path.is_file() and not path.name.endswith(".wal"):
            text = _strings_in(path)
            found += [f"{path}: {s[:6]}..." for s in secrets if s in text]
    return found


def test_the_secret_finder_finds_secrets(tmp_path):
    """The check below is only worth something if it would see a leak in each format."""
    secret = "sk-test-1234567890abcdef"
    pd.DataFrame({"a": [secret]}).to_parquet(tmp_path / "x.parquet")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("create schema marts; create table marts.t as select ? as s from range(5000)", [secret])
    np.savez_compressed(tmp_path / "c.npz", source_file=np.array(secret))
    (tmp_path / "log.txt").write_text(f"token={secret}\n")
    pd.DataFrame({"geometry": [secret.encode()]}).to_parquet(tmp_path / "geo.parquet")  # a binary column
    writer = chipstore.PartWriter(tmp_path / "chips")  # a chip store part: pixels as binary columns
    writer.add("ab" * 32, np.ones((1, 2, 2), np.uint16), np.ones((2, 2), bool), secret, None)
    writer.close()
    files = sorted(tmp_path.iterdir()) + chipstore.part_paths(tmp_path / "chips")
    assert len(find_secrets(files, [secret])) == 6


@pytest.mark.slow
def test_credentials_in_the_environment_are_never_written(tmp_path_factory):
    """Fake credentials sat in the environment of every run of the operations suites (in-process
    on a persistent Dagster instance, and `eocausal run` subprocesses). None may appear in the
    lake, the cache, the warehouses, the Dagster event log (metadata and logs), dbt's logs and
    artifacts, or the runs' output."""
    from tests.faults import support

    base = support.baseline(tmp_path_factory)
    support.reference_refresh(tmp_path_factory)
    secrets = [support.FAKE_EE_KEY, support.FAKE_PRIVATE_KEY_MARK]
    key_folder = Path(base.secrets["GOOGLE_APPLICATION_CREDENTIALS"]).parent
    files = [p for p in base.root.rglob("*") if key_folder not in p.parents]
    files += list((REPO / "dbt_project" / "logs").glob("*")) + list((REPO / "dbt_project" / "target").glob("*.json"))
    checked = {p.suffix for p in files if p.is_file()}
    assert {".parquet", ".duckdb", ".npz", ".err", ".out", ".db"} <= checked, checked
    assert find_secrets(files, secrets) == []
