import numpy as np
import pandas as pd
import pytest

from eocausal.quality import DataQualityError
from eocausal.study import SurveySpec
from eocausal.survey import SurveyError, covariate_column, load_survey

SPEC = SurveySpec(path="s.csv", unit_id="code", lat="latitude", lon="longitude", treatment="aid",
                  outcome="assets", covariates=["Market Access", "hh size"])


def good_frame(n=12):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "code": [f"v{i:03d}" for i in range(n)],
        "latitude": rng.uniform(-25, -24, n), "longitude": rng.uniform(-54, -53, n),
        "aid": [i % 2 for i in range(n)], "assets": rng.normal(size=n),
        "Market Access": rng.normal(size=n), "hh size": rng.integers(1, 9, n), "extra": "ignored",
    })


def write_csv(tmp_path, df, name="s.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def test_canonical_table(tmp_path):
    df, report = load_survey(write_csv(tmp_path, good_frame()), SPEC)
    assert list(df.columns) == ["unit_id", "lat", "lon", "treatment", "outcome", "cov_market_access", "cov_hh_size"]
    assert df["unit_id"].iloc[0] == "v000" and df["treatment"].dtype == "int8"
    assert report.success and report.n_rows == 12


def test_parquet_input(tmp_path):
    p = tmp_path / "s.parquet"
    good_frame().to_parquet(p)
    df, _ = load_survey(p, SPEC)
    assert len(df) == 12


def test_covariate_column_names():
    assert covariate_column("Market Access") == "cov_market_access"
    with pytest.raises(SurveyError):
        covariate_column("%%")


def rejected(tmp_path, df) -> str:
    with pytest.raises(DataQualityError) as exc:
        load_survey(write_csv(tmp_path, df), SPEC)
    return str(exc.value)


def test_missing_column_named(tmp_path):
    msg = rejected(tmp_path, good_frame().drop(columns=["aid"]))
    assert "required column 'aid' present" in msg


def test_lat_out_of_range_names_rows_and_units(tmp_path):
    df = good_frame()
    df.loc[3, "latitude"] = 95.0
    msg = rejected(tmp_path, df)
    assert "lat within [-90, 90]" in msg and "rows 3" in msg and "v003" in msg


def test_duplicate_ids(tmp_path):
    df = good_frame()
    df.loc[5, "code"] = "v004"
    msg = rejected(tmp_path, df)
    assert "unique unit_id" in msg and "v004" in msg and "4, 5" in msg


def test_non_binary_treatment(tmp_path):
    df = good_frame()
    df["aid"] = df["aid"].astype(object)
    df.loc[2, "aid"] = 2
    df.loc[7, "aid"] = "yes"
    msg = rejected(tmp_path, df)
    assert "treatment binary (0/1)" in msg and "v002" in msg
    assert "treatment numeric" in msg and "v007" in msg


def test_non_finite_outcome_and_covariate(tmp_path):
    df = good_frame()
    df["assets"] = df["assets"].astype(object)
    df.loc[1, "assets"] = "inf"
    df.loc[9, "Market Access"] = np.nan
    msg = rejected(tmp_path, df)
    assert "outcome finite" in msg and "v001" in msg
    assert "cov_market_access not null" in msg and "v009" in msg


def test_single_arm_rejected(tmp_path):
    df = good_frame()
    df["aid"] = 1
    assert "treatment arm 0 present" in rejected(tmp_path, df)


def test_unreadable_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(SurveyError, match="empty"):
        load_survey(empty, SPEC)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("code,latitude\nS\xe3o,1\n".encode("latin-1"))
    with pytest.raises(SurveyError, match="not UTF-8"):
        load_survey(latin, SPEC)
    header_only = tmp_path / "header.csv"
    header_only.write_text("code,latitude,longitude,aid,assets\n")
    with pytest.raises(SurveyError, match="no rows"):
        load_survey(header_only, SPEC)
    with pytest.raises(SurveyError, match="unsupported format"):
        (tmp_path / "s.xlsx").write_text("x")
        load_survey(tmp_path / "s.xlsx", SPEC)
