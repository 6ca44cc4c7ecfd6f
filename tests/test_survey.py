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
    assert list(df.columns) == ["unit_id", "lat", "lon", "treatment", "outcome", "cov_market_access", "cov_hh_size",
                                "tile"]
    assert df["tile"].nunique() == 1 and df["tile"].str.fullmatch("[0-3]+").all()  # a small study: one tile
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


# -- issue 16: ambiguous columns, ids as text, degenerate designs --------------------------------

def test_repeated_csv_column_is_rejected_naming_it(tmp_path):
    df = good_frame()
    text = df.to_csv(index=False).replace("extra", "assets", 1)  # a second 'assets' column
    p = tmp_path / "s.csv"
    p.write_text(text)
    with pytest.raises(SurveyError) as exc:
        load_survey(p, SPEC)
    msg = str(exc.value)
    assert "rule 'column names unique' failed" in msg and "'assets' at columns 5, 8" in msg


def test_repeated_unmapped_column_is_rejected_too_and_blank_names_are_not(tmp_path):
    df = good_frame()
    p = tmp_path / "s.tsv"
    df.rename(columns={"extra": "note"}).assign(**{"note ": "x"}).to_csv(p, sep="\t", index=False)
    load_survey(p, SPEC)  # 'note' and 'note ' are different names
    p.write_text(p.read_text().replace("note ", "note", 1))
    with pytest.raises(SurveyError, match=r"'note' at columns 8, 9"):
        load_survey(p, SPEC)
    # Trailing separators (blank header cells) are not repeats.
    csv_path = tmp_path / "trailing.csv"
    csv_path.write_text("\n".join(line + ",," for line in df.to_csv(index=False).splitlines()) + "\n")
    assert len(load_survey(csv_path, SPEC)[0]) == 12


def test_repeated_parquet_column_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(good_frame(), preserve_index=False)
    table = table.append_column("aid", pa.array([1] * 12))
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(SurveyError) as exc:
        load_survey(tmp_path / "s.parquet", SPEC)
    assert "rule 'column names unique' failed" in str(exc.value) and "'aid' at columns 4, 9" in str(exc.value)


@pytest.mark.parametrize("other", ["Assets", "ASSETS", " assets", "assets ", "\tAssets "])
def test_column_differing_from_a_mapped_one_by_case_or_space_is_rejected(tmp_path, other):
    df = good_frame().rename(columns={"extra": other})
    with pytest.raises(SurveyError) as exc:
        load_survey(write_csv(tmp_path, df), SPEC)
    msg = str(exc.value)
    assert "rule 'mapped column names unambiguous' failed" in msg
    assert f"survey.outcome 'assets' and column(s) {other!r} differ only by case or surrounding whitespace" in msg


def test_mapped_column_present_only_with_other_case_is_named(tmp_path):
    df = good_frame().rename(columns={"Market Access": "market access "})
    with pytest.raises(SurveyError) as exc:
        load_survey(write_csv(tmp_path, df), SPEC)
    assert ("survey.covariates[0] 'Market Access' is not a column; column(s) 'market access ' differ from it only"
            in str(exc.value))


def test_columns_mapped_exactly_are_not_ambiguous(tmp_path):
    # 'code' (the id) and 'Code' (a covariate) are both mapped by their exact names: no guess.
    spec = SPEC.model_copy(update={"covariates": ["Market Access", "Code"]})
    df = good_frame().assign(Code=np.arange(12) % 5)
    out, report = load_survey(write_csv(tmp_path, df), spec)
    assert report.success and "cov_code" in out.columns


@pytest.mark.parametrize("ids", [["NA", "NULL", "None", "nan", "N/A", "null", "#N/A", "<NA>", "-nan", "n/a", "NaN", "1.#IND"]])
def test_na_like_ids_are_text(tmp_path, ids):
    df = good_frame()
    df["code"] = ids
    out, report = load_survey(write_csv(tmp_path, df), SPEC)
    assert report.success and out["unit_id"].tolist() == ids


def test_na_like_ids_in_parquet_are_text(tmp_path):
    df = good_frame()
    df["code"] = ["NA", "NULL", "None"] + [f"v{i}" for i in range(9)]
    df.to_parquet(tmp_path / "s.parquet")
    out, _ = load_survey(tmp_path / "s.parquet", SPEC)
    assert out["unit_id"].tolist()[:3] == ["NA", "NULL", "None"]


@pytest.mark.parametrize("missing", ["", "   "])
def test_empty_id_is_still_missing(tmp_path, missing):
    df = good_frame()
    df["code"] = df["code"].astype(object)
    df.loc[4, "code"] = missing
    msg = rejected(tmp_path, df)
    assert "rule 'unit_id not null' failed" in msg and "rows 4" in msg


def test_na_text_outside_the_id_is_still_missing(tmp_path):
    df = good_frame().astype({"assets": object, "Market Access": object})
    df.loc[2, "assets"] = "NA"
    df.loc[3, "Market Access"] = "NULL"
    df.loc[5, "code"] = "NA"
    msg = rejected(tmp_path, df)
    assert "rule 'outcome not null' failed; on 1 row(s): rows 2;" in msg
    assert "rule 'cov_market_access not null' failed; on 1 row(s): rows 3;" in msg
    assert "numeric" not in msg


def designed(tmp_path, df, folds=None, spec=SPEC) -> str:
    with pytest.raises(DataQualityError) as exc:
        load_survey(write_csv(tmp_path, df), spec, folds=folds)
    return str(exc.value)


@pytest.mark.parametrize("n_treated, arm", [(1, "treated"), (3, "treated"), (9, "control")])
def test_too_few_units_per_arm_for_the_folds(tmp_path, n_treated, arm):
    df = good_frame()
    df["aid"] = [1] * n_treated + [0] * (12 - n_treated)
    msg = designed(tmp_path, df, folds=4)
    n = n_treated if arm == "treated" else 12 - n_treated
    assert f"rule 'at least 4 {arm} units (analysis.folds = 4: each fold needs one of each arm)' failed" in msg
    assert f"{n} {arm} units" in msg
    if n >= 2:  # as many folds as the smaller arm has units is enough
        assert load_survey(write_csv(tmp_path, df), SPEC, folds=n)[1].success
    else:
        assert "too few for any cross-fitting" in msg


def test_folds_rule_counts_measured_outcomes_with_imputation(tmp_path):
    df = good_frame().astype({"assets": object})
    df.loc[[1, 3, 5], "assets"] = ""  # treated units 1, 3, 5 unlabelled: 3 treated measured
    with pytest.raises(DataQualityError) as exc:
        load_survey(write_csv(tmp_path, df), SPEC, outcome_may_be_missing=True, folds=4)
    assert "at least 4 treated units with a measured outcome" in str(exc.value)
    assert "3 treated units with a measured outcome" in str(exc.value)
    load_survey(write_csv(tmp_path, df), SPEC, outcome_may_be_missing=True, folds=3)


def test_constant_outcome(tmp_path):
    df = good_frame()
    df["assets"] = 2.5
    msg = designed(tmp_path, df)
    assert "rule 'outcome not constant' failed" in msg and "every unit has outcome = 2.5" in msg


def test_constant_treatment_says_so(tmp_path):
    df = good_frame()
    df["aid"] = 0
    msg = designed(tmp_path, df, folds=2)
    assert "rule 'treatment arm 1 present' failed" in msg and "treatment is constant: all 12 units have treatment 0" in msg


def test_constant_covariate(tmp_path):
    df = good_frame()
    df["hh size"] = 4
    msg = designed(tmp_path, df)
    assert "rule 'cov_hh_size not constant' failed" in msg and "every unit has cov_hh_size = 4.0" in msg
    assert "cov_market_access" not in msg


def test_design_rules_pass_on_a_good_survey(tmp_path):
    _, report = load_survey(write_csv(tmp_path, good_frame()), SPEC, folds=6)
    assert report.success


# -- issue 16 item 6: file kinds, disguised formats, types that are not numbers ----------------------

def test_a_folder_or_a_fifo_is_not_a_survey_file(tmp_path):
    import os

    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(SurveyError, match="folder.csv is a folder, not a file"):
        load_survey(tmp_path / "folder.csv", SPEC)
    os.mkfifo(tmp_path / "pipe.csv")  # reading it would block for ever
    with pytest.raises(SurveyError, match=r"pipe.csv is a named pipe \(FIFO\), not a file"):
        load_survey(tmp_path / "pipe.csv", SPEC)


def _zip_with_a_sheet(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")


@pytest.mark.parametrize("name, data, words", [
    ("s.csv", lambda df, p: df.to_parquet(p), "is a Parquet file, not .csv text: name it .parquet"),
    ("s.csv.gz", lambda df, p: df.to_csv(p, index=False, compression="gzip"), "is gzip-compressed"),
    ("s.xlsx", lambda df, p: _zip_with_a_sheet(p), "zip archive (an Excel workbook?)"),
])
def test_a_file_in_another_format_than_its_name_is_named(tmp_path, name, data, words):
    data(good_frame(), tmp_path / name)
    with pytest.raises(SurveyError, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_survey(tmp_path / name, SPEC)


def test_a_timestamp_is_not_a_number(tmp_path):
    df = good_frame()
    df["assets"] = pd.Timestamp("1970-01-01") + pd.to_timedelta(np.arange(len(df)), "s")
    df.to_parquet(tmp_path / "s.parquet")
    with pytest.raises(DataQualityError, match=r"rule 'outcome numeric' failed.*datetime64"):
        load_survey(tmp_path / "s.parquet", SPEC)


def test_boolean_treatment_and_padded_numbers_work(tmp_path):
    df = good_frame()
    df["aid"] = df["aid"].astype(bool)
    df.to_parquet(tmp_path / "s.parquet")
    assert load_survey(tmp_path / "s.parquet", SPEC)[0]["treatment"].tolist() == [i % 2 for i in range(12)]
    text = good_frame().astype(str).apply(lambda c: " " + c + " ")
    text.to_csv(tmp_path / "p.csv", index=False)
    assert load_survey(tmp_path / "p.csv", SPEC)[0]["outcome"].notna().all()


def test_a_long_header_cell_is_read(tmp_path):
    df = good_frame()
    df["n" * 200_000] = 1
    assert len(load_survey(write_csv(tmp_path, df), SPEC)[0]) == 12


def test_a_header_without_any_mapped_column_says_what_it_read(tmp_path):
    p = write_csv(tmp_path, good_frame())
    p.write_text("# exported by SurveyTool\n" + p.read_text())
    with pytest.raises(DataQualityError) as exc:
        load_survey(p, SPEC)
    assert "none of the study's columns is in the header, which reads ['# exported by SurveyTool']" in str(exc.value)


def test_a_value_that_is_not_a_number_is_named_once(tmp_path):
    df = good_frame().astype({"assets": object})
    df.loc[5, "assets"] = "1,5"
    df.loc[7, "assets"] = np.nan
    msg = rejected(tmp_path, df)
    assert "rule 'outcome numeric' failed; on 1 row(s): rows 5; units v005; values ['1,5']" in msg
    assert "rule 'outcome not null' failed; on 1 row(s): rows 7; units v007; values [nan]" in msg
