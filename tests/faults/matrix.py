"""The fault matrix: bad and unusual inputs a user with real files may hand eocausal, in one list.

Each :class:`Case` changes a copy of the baseline study folder (tests/faults/support.py) the way a
user's files might differ, says what must happen — ``works``, or ``rejects`` with an exit code
(eocausal.failures) and the words, the rule and where, that the message must contain — and how it
is checked, as cheaply as the question allows:

``run``       ``eocausal run STUDY --workdir W`` in-process, on the matrix's copy of the baseline
              working folder: the real exit code and message. A rejection before the graph (study
              file, survey contract, imagery that does not open, working folder) costs well under a
              second; one inside the graph a second or two.
``validate``  ``eocausal validate STUDY`` (the checks ``run`` makes before any work), for study-file
              and survey variants that must work. With ``same_survey`` the canonical survey must be
              the baseline's too, so the run would be the baseline's run (its chips, embeddings and
              estimates); otherwise passing the contract is the claim.
``inputs``    the input stages through Dagster (``run_study(inputs_only=True)``: survey, chips,
              embeddings and their blocking checks), for imagery and coordinate variants that must
              work: the later stages never see the file format.
``graph``     ``run_study`` on the whole graph, as the UI, schedules and sensors run it
              (tests/faults/test_bad_input.py).
``refresh``   the uninterrupted wave-2 refresh the read-loop test runs anyway (``eocausal run --json``
              as a subprocess): new units appended to the survey.

After every case the published warehouse is byte-for-byte what it was. ``note`` records an input
whose result is still unclear or arguably wrong; MATRIX.md (``write_markdown``) shows it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import yaml
from rasterio.warp import calculate_default_transform, reproject

from tests.conftest import write_geotiff

SURVEY = "villages.csv"
INPUT, FAILED, WORKDIR, BUSY, CREDENTIALS = 2, 1, 3, 4, 5


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    what: str  # the input, in a user's words
    build: Callable[[Path], None]  # changes the study folder (a copy of the baseline's)
    expected: str  # "works" | "rejects"
    code: int = 0  # the exit code expected
    words: tuple[str, ...] = ()  # what the message must say: the rule and the rows, units, keys or file
    via: str = "run"
    env: dict = field(default_factory=dict)  # environment of the run (fault injection)
    workdir: str = "shared"  # "shared" | "file" | "under_file" | "read_only"
    same_survey: bool = False  # with via "validate": the canonical survey equals the baseline's
    note: str = ""  # a result that is still unclear or arguably wrong
    served: "Served | None" = None  # imagery served over HTTP while the case runs


@dataclass(frozen=True)
class Served:
    """Imagery on the local HTTP server (tests/imagery/http_server.FileServer) for the case's run:
    ``setup(study, served folder, server url)`` writes the files and points study.yaml at them;
    ``faults`` are the server's (http_server.Faults keyword arguments)."""

    setup: Callable[[Path, Path, str], None]
    faults: dict = field(default_factory=dict)


# -- study-folder helpers ---------------------------------------------------------------------------


def survey(study: Path) -> pd.DataFrame:
    return pd.read_csv(study / SURVEY, dtype=str, keep_default_na=False)


def rewrite(study: Path, change) -> None:
    df = survey(study)
    change(df)
    df.to_csv(study / SURVEY, index=False)


def set_cell(column: str, rows: list[int], value: str):
    def change(df):
        df.loc[rows, column] = value
    return change


def text_edit(transform):
    def build(study: Path) -> None:
        (study / SURVEY).write_text(transform((study / SURVEY).read_text()), newline="")
    return build


def study_doc(study: Path) -> dict:
    return yaml.safe_load((study / "study.yaml").read_text())


def write_doc(study: Path, doc: dict) -> None:
    (study / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def edit_study(section: str, **values):
    def build(study: Path) -> None:
        doc = study_doc(study)
        doc.setdefault(section, {}).update(values)
        write_doc(study, doc)
    return build


def study_text(transform):
    def build(study: Path) -> None:
        (study / "study.yaml").write_text(transform((study / "study.yaml").read_text()))
    return build


def point_survey_to(name: str):
    return edit_study("survey", path=name)


def swap_lat_lon(df):
    df["latitude"], df["longitude"] = df["longitude"].copy(), df["latitude"].copy()


def _dup_id(df):
    df.loc[7, "village_code"] = df.loc[3, "village_code"]


def _one_arm(df):
    df["aid_received"] = "1"


def _yes_no(df):
    df["aid_received"] = df["aid_received"].map({"0": "no", "1": "yes"})


def typed_survey(study: Path) -> pd.DataFrame:
    df = survey(study)
    for column in ("latitude", "longitude", "asset_index", "market_access", "household_size"):
        df[column] = df[column].astype(float)
    df["aid_received"] = df["aid_received"].astype(int)
    return df


def parquet(change=None, table=None):
    """The survey as a Parquet file with natural types (``change`` edits the frame, ``table`` the Arrow table)."""
    def build(study: Path) -> None:
        df = typed_survey(study)
        if change:
            change(df)
        t = pa.Table.from_pandas(df, preserve_index=False)
        if table:
            t = table(t, df)
        pq.write_table(t, study / "villages.parquet")
        point_survey_to("villages.parquet")(study)
    return build


def _decimal_outcome(t: pa.Table, df: pd.DataFrame) -> pa.Table:
    from decimal import Decimal

    values = pa.array([Decimal(f"{v:.4f}") for v in df["asset_index"]], pa.decimal128(12, 4))
    return t.set_column(t.schema.get_field_index("asset_index"), "asset_index", values)


def _all_strings(t: pa.Table, df: pd.DataFrame) -> pa.Table:
    return pa.table({name: pa.array([str(v) for v in t.column(name).to_pylist()]) for name in t.column_names})


def scene(study: Path) -> Path:
    [tif] = (study / "imagery").glob("*.tif")
    return tif


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_imagery(study: Path, imagery: dict) -> None:
    doc = study_doc(study)
    doc["imagery"] = {"chip_size_px": doc["imagery"]["chip_size_px"], **imagery}
    write_doc(study, doc)


def remote_scene(study: Path, root: Path, url: str) -> None:
    """The scene as a remote COG: imagery.path its URL on the server."""
    shutil.copyfile(scene(study), root / "scene.tif")
    _set_imagery(study, {"source": "geotiff", "path": f"{url}/scene.tif"})


def stac_served(drop: str | None = None):
    """The scene cut into a static STAC catalog (one item, May 2020) on the server; ``drop``: an
    asset file removed from every item (its URL answers 404)."""
    def setup(study: Path, root: Path, url: str) -> None:
        from tests.imagery.stac_catalog import COLLECTION, cut_catalog

        cut_catalog(scene(study), root / "catalog", tiles=(1, 1))
        if drop:
            for f in (root / "catalog").rglob(drop):
                f.unlink()
        _set_imagery(study, {"source": "stac", "catalog": f"{url}/catalog/catalog.json", "collection": COLLECTION,
                             "periods": [2020], "max_attempts": 2})
    return setup


def stac_refusing(study: Path, root: Path, url: str) -> None:
    """A STAC catalog URL on a port where nothing listens (connection refused)."""
    from tests.imagery.stac_catalog import COLLECTION

    _set_imagery(study, {"source": "stac", "catalog": f"http://127.0.0.1:{_free_port()}/stac/catalog.json",
                         "collection": COLLECTION, "periods": [2020], "max_attempts": 2})


def rewrite_scene(data=None, crs="keep", dtype=None, nodata=None, **profile_changes):
    """Re-write the scene: its pixels (``data``), CRS, dtype, nodata or GeoTIFF layout."""
    def build(study: Path) -> None:
        path = scene(study)
        with rasterio.open(path) as src:
            array, profile = src.read(), src.profile
        array = array if data is None else data(array)
        path.unlink()
        if not profile_changes:
            write_geotiff(path, array.astype(dtype or array.dtype), profile["crs"] if crs == "keep" else crs,
                          profile["transform"], nodata=nodata)
            return
        profile.update(count=array.shape[0], height=array.shape[1], width=array.shape[2],
                       dtype=dtype or array.dtype.name, nodata=nodata)
        for key in ("blockxsize", "blockysize", "tiled", "compress"):
            profile.pop(key, None)
        profile.update({k: v for k, v in profile_changes.items() if v is not None})
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(array.astype(profile["dtype"]))
    return build


def warp_scene(dst_crs: str):
    """The scene re-projected to another CRS (nearest neighbour, zero outside)."""
    def build(study: Path) -> None:
        path = scene(study)
        with rasterio.open(path) as src:
            transform, width, height = calculate_default_transform(src.crs, dst_crs, src.width, src.height, *src.bounds)
            out = np.zeros((src.count, height, width), dtype=src.dtypes[0])
            for band in range(src.count):
                reproject(rasterio.band(src, band + 1), out[band], dst_transform=transform, dst_crs=dst_crs)
        path.unlink()
        write_geotiff(path, out, dst_crs, transform)
    return build


def shift_scene(dx_m: float):
    """The scene moved east by ``dx_m`` metres (its pixels unchanged)."""
    def build(study: Path) -> None:
        path = scene(study)
        with rasterio.open(path) as src:
            array, profile = src.read(), src.profile
        t = profile["transform"]
        path.unlink()
        write_geotiff(path, array, profile["crs"], t * t.__class__.translation(dx_m / t.a, 0))
    return build


def cog_with_overviews(study: Path) -> None:
    path = scene(study)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4, 8])


def png_named_tif(study: Path) -> None:
    path = scene(study)
    with rasterio.open(path) as src:
        array = src.read()
    path.unlink()
    png = study / "imagery" / "scene.png"
    with rasterio.open(png, "w", driver="PNG", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype="uint16") as dst:
        dst.write(array)
    png.rename(path)
    for aux in (study / "imagery").glob("*.aux.xml"):
        aux.unlink()


def second_scene_other_bands(study: Path) -> None:
    path = scene(study)
    with rasterio.open(path) as src:
        array, profile = src.read(), src.profile
    write_geotiff(study / "imagery" / "scene_b.tif", array[:1], profile["crs"], profile["transform"])


def other_files_in_imagery(study: Path) -> None:
    (study / "imagery" / "README.txt").write_text("scene delivered 2024-03-01\n")
    (study / "imagery" / "scene.tif.aux.xml").write_text("<PAMDataset></PAMDataset>\n")


def one_coordinate(df):
    df["latitude"], df["longitude"] = df.loc[0, "latitude"], df.loc[0, "longitude"]


def _no_treated_but_one(df):
    df["aid_received"] = ["1"] + ["0"] * (len(df) - 1)


def _keep_rows(n):
    def change(df):
        df.drop(index=df.index[n:], inplace=True)
        df["aid_received"] = [str(i % 2) for i in range(n)]
    return change


def _ids(values):
    def change(df):
        df.loc[:len(values) - 1, "village_code"] = values
    return change


def _rename(old, new):
    def change(df):
        df.rename(columns={old: new}, inplace=True)
    return change


def rename_column(old: str, new: str, study_too: tuple[str, str] | None = None):
    def build(study: Path) -> None:
        rewrite(study, _rename(old, new))
        if study_too:
            section_key, value = study_too
            doc = study_doc(study)
            section, key = section_key.split(".")
            if key == "covariates":
                doc[section][key] = [value if c == old else c for c in doc[section][key]]
            else:
                doc[section][key] = value
            write_doc(study, doc)
    return build


def fifo_survey(study: Path) -> None:
    (study / SURVEY).unlink()
    os.mkfifo(study / SURVEY)


def folder_survey(study: Path) -> None:
    (study / SURVEY).unlink()
    (study / SURVEY).mkdir()


def symlink_survey(outside: bool):
    def build(study: Path) -> None:
        target = study.parent / "elsewhere.csv" if outside else study / "data" / "units.csv"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(study / SURVEY, target)
        (study / "linked.csv").symlink_to(target)
        point_survey_to("linked.csv")(study)
    return build


def absolute_survey_path(inside: bool):
    def build(study: Path) -> None:
        target = study / SURVEY if inside else study.parent / "elsewhere.csv"
        if not inside:
            shutil.copyfile(study / SURVEY, target)
        point_survey_to(str(target.resolve()))(study)
    return build


def symlink_imagery(study: Path) -> None:
    path = scene(study)
    (study / "scenes").mkdir()
    path.rename(study / "scenes" / "scene.tif")
    path.symlink_to(study / "scenes" / "scene.tif")


def write_survey_bytes(name: str, data: Callable[[bytes], bytes], point: bool = True):
    def build(study: Path) -> None:
        (study / name).write_bytes(data((study / SURVEY).read_bytes()))
        if point:
            point_survey_to(name)(study)
    return build


def _xlsx_like(raw: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    return buf.getvalue()


def truncated_parquet(study: Path) -> None:
    parquet()(study)
    path = study / "villages.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _many_columns(df):
    extra = pd.DataFrame({f"extra_{i}": "x" for i in range(500)}, index=df.index)
    df[list(extra.columns)] = extra


def _huge_header_name(df):
    df["n" * 200_000] = "1"


def _reordered_with_notes(df):
    df["notes"] = 'said "yes, twice", then left'
    df.insert(0, "notes", df.pop("notes"))
    df.insert(1, "asset_index", df.pop("asset_index"))


def _leading_plus(df):
    positive = ~df["asset_index"].str.startswith("-")
    df.loc[positive, "asset_index"] = "+" + df.loc[positive, "asset_index"]


def _scientific(df):
    df["asset_index"] = [f"{float(v):.4e}" for v in df["asset_index"]]


def _duplicate_column(study: Path) -> None:
    lines = (study / SURVEY).read_text().splitlines()
    out = [lines[0] + ",asset_index"] + [line + "," + line.split(",")[4] for line in lines[1:]]
    (study / SURVEY).write_text("\n".join(out) + "\n")


def _header_again(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[:61] + [lines[0]] + lines[61:])


def _alias_bomb(text: str) -> str:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    return bomb + text.replace("name: eocausal_demo", "name: *i")


def _two_units(df):
    _keep_rows(2)(df)


def _ids_differ_by_space(df):
    df.loc[5, "village_code"] = " " + df.loc[4, "village_code"]


def _ids_case(df):
    df.loc[5, "village_code"] = df.loc[4, "village_code"].lower()


# -- the cases -------------------------------------------------------------------------------------

ENC, NUM, PQ, PATHS, STUDY, NAMES, DESIGN, IMG, WORK = (
    "survey encoding & header", "numbers & booleans", "Parquet types", "paths & file kinds",
    "study file syntax & limits", "names & ids", "degenerate designs", "imagery", "working folder")
REMOTE = "remote imagery & access"


def _c(name, kind, what, build, expected, code=0, words=(), **kw) -> Case:
    if isinstance(words, str):
        words = (words,)
    return Case(name, kind, what, build, expected, code, tuple(words), **kw)


CASES: list[Case] = [
    # ---- survey: encodings and headers ---------------------------------------------------------------
    _c("bom_crlf_quoted", ENC, "UTF-8 BOM, CRLF line ends, every field quoted", text_edit(
        lambda t: "\ufeff" + "".join('"' + '","'.join(line.split(",")) + '"\r\n' for line in t.splitlines())),
       "works", via="validate", same_survey=True),
    _c("old_mac_line_ends", ENC, "CR-only line ends (classic Mac export)", text_edit(lambda t: t.replace("\n", "\r")),
       "works", via="validate", same_survey=True),
    _c("blank_lines_between_rows", ENC, "blank lines between rows", text_edit(lambda t: t.replace("\n", "\n\n")),
       "works", via="validate", same_survey=True),
    _c("trailing_comma", ENC, "every line ends with a comma (an unnamed empty column)",
       text_edit(lambda t: t.replace("\n", ",\n")), "works", via="validate", same_survey=True),
    _c("reordered_extra_columns", ENC, "columns reordered, a free-text column with quotes and commas",
       lambda s: rewrite(s, _reordered_with_notes), "works", via="validate", same_survey=True),
    _c("tab_separated", ENC, "tab-separated .tsv file",
       lambda s: (survey(s).to_csv(s / "villages.tsv", sep="\t", index=False), point_survey_to("villages.tsv")(s)),
       "works", via="validate", same_survey=True),
    _c("accented_utf8_ids", ENC, "UTF-8 ids with accents and spaces ('São Tomé 1')",
       lambda s: rewrite(s, _ids(["São Tomé 1", "Ñuñoa 2", "Łódź 3"])), "works", via="validate"),
    _c("huge_header_cell", ENC, "an unmapped column whose name is 200,000 characters",
       lambda s: rewrite(s, _huge_header_name), "works", via="validate", same_survey=True),
    _c("five_hundred_columns", ENC, "500 unmapped extra columns", lambda s: rewrite(s, _many_columns),
       "works", via="validate", same_survey=True),
    _c("mapped_header_with_space", ENC, "header ' latitude' (leading space) for the mapped 'latitude'",
       lambda s: rewrite(s, _rename("latitude", " latitude")), "rejects", INPUT,
       ("rule 'mapped column names unambiguous' failed", "survey.lat 'latitude'", "' latitude'")),
    _c("mapped_header_other_case", ENC, "header 'Latitude' for the mapped 'latitude'",
       lambda s: rewrite(s, _rename("latitude", "Latitude")), "rejects", INPUT,
       ("rule 'mapped column names unambiguous' failed", "'Latitude'")),
    _c("duplicate_column_name", ENC, "the outcome column twice in the header", _duplicate_column, "rejects", INPUT,
       ("rule 'column names unique' failed", "'asset_index' at columns 5, 8")),
    _c("comment_line_before_header", ENC, "a '# exported by ...' line above the header",
       text_edit(lambda t: "# exported by SurveyTool 3.2\n" + t), "rejects", INPUT,
       ("rule 'required column 'village_code' present' failed",
        "none of the study's columns is in the header, which reads ['# exported by SurveyTool 3.2']",
        "a line above the header")),
    _c("header_repeated_midway", ENC, "the header repeated after row 60 (two exports concatenated)",
       text_edit(_header_again), "rejects", INPUT, ("rule 'lat numeric' failed", "rows 60", "latitude")),
    _c("gzip_named_csv_gz", ENC, "a gzip-compressed CSV (villages.csv.gz)",
       write_survey_bytes("villages.csv.gz", gzip.compress), "rejects", INPUT,
       ("villages.csv.gz is gzip-compressed", "decompress it")),
    _c("excel_workbook", ENC, "an Excel workbook (.xlsx) as the survey", write_survey_bytes("villages.xlsx", _xlsx_like),
       "rejects", INPUT, ("villages.xlsx is a zip archive (an Excel workbook?)", "export the sheet as CSV")),
    _c("parquet_saved_as_csv", ENC, "a Parquet file named villages.csv",
       lambda s: typed_survey(s).to_parquet(s / SURVEY), "rejects", INPUT,
       ("villages.csv is a Parquet file", "name it .parquet")),
    # ---- numbers and booleans ------------------------------------------------------------------------
    _c("decimal_comma", NUM, "outcome '1,5' (decimal comma)", lambda s: rewrite(s, set_cell("asset_index", [5], "1,5")),
       "rejects", INPUT, ("rule 'outcome numeric' failed", "rows 5", "'1,5'")),
    _c("thousands_separator", NUM, "outcome '1,234.5' (thousands separator)",
       lambda s: rewrite(s, set_cell("asset_index", [3], "1,234.5")), "rejects", INPUT,
       ("rule 'outcome numeric' failed", "rows 3", "'1,234.5'")),
    _c("unicode_minus", NUM, "outcome '−1.5' (U+2212 minus from a word processor)",
       lambda s: rewrite(s, set_cell("asset_index", [8], "\u22121.5")), "rejects", INPUT,
       ("rule 'outcome numeric' failed", "rows 8")),
    _c("percent_sign", NUM, "covariate '45%'", lambda s: rewrite(s, set_cell("market_access", [2], "45%")),
       "rejects", INPUT, ("rule 'cov_market_access numeric' failed", "rows 2", "'45%'")),
    _c("true_false_treatment", NUM, "treatment TRUE/FALSE (as R writes logicals)",
       lambda s: rewrite(s, lambda df: df.__setitem__("aid_received", df["aid_received"].map({"0": "FALSE", "1": "TRUE"}))),
       "rejects", INPUT, ("rule 'treatment numeric' failed", "'FALSE'"),
       note="TRUE/FALSE are not read as 1/0 (the contract says 0/1); the message names the rule and shows the values"),
    _c("padded_numbers", NUM, "numbers padded with spaces (' 1 ', ' -1.5 ')",
       lambda s: rewrite(s, lambda df: [df.__setitem__(c, " " + df[c] + " ") for c in ("aid_received", "asset_index")]),
       "works", via="validate", same_survey=True),
    _c("float_treatment", NUM, "treatment written 1.0 / 0.0",
       lambda s: rewrite(s, lambda df: df.__setitem__("aid_received", df["aid_received"] + ".0")),
       "works", via="validate", same_survey=True),
    _c("negative_zero_treatment", NUM, "treatment '-0' for control",
       lambda s: rewrite(s, lambda df: df.__setitem__("aid_received", df["aid_received"].replace("0", "-0"))),
       "works", via="validate", same_survey=True),
    _c("scientific_notation", NUM, "outcome in scientific notation (-1.5166e+00)", lambda s: rewrite(s, _scientific),
       "works", via="validate", same_survey=True),
    _c("leading_plus", NUM, "positive outcomes written with '+'", lambda s: rewrite(s, _leading_plus),
       "works", via="validate", same_survey=True),
    _c("infinite_latitude", NUM, "latitude 'inf'", lambda s: rewrite(s, set_cell("latitude", [2], "inf")),
       "rejects", INPUT, ("lat", "rows 2")),
    # ---- Parquet types -------------------------------------------------------------------------------
    _c("parquet_typed", PQ, "Parquet survey, natural types (int treatment, float outcome)", parquet(),
       "works", via="validate", same_survey=True),
    _c("parquet_int_ids", PQ, "Parquet with int64 unit ids", parquet(lambda df: df.__setitem__("village_code", np.arange(len(df)))),
       "works", via="validate"),
    _c("parquet_bool_treatment", PQ, "Parquet with a boolean treatment column",
       parquet(lambda df: df.__setitem__("aid_received", df["aid_received"].astype(bool))),
       "works", via="validate", same_survey=True),
    _c("parquet_decimal_outcome", PQ, "Parquet with a decimal(12,4) outcome", parquet(table=_decimal_outcome),
       "works", via="validate", same_survey=True),
    _c("parquet_dictionary_treatment", PQ, "Parquet with a dictionary-encoded (categorical) treatment",
       parquet(lambda df: df.__setitem__("aid_received", df["aid_received"].astype("category"))),
       "works", via="validate", same_survey=True),
    _c("parquet_all_strings", PQ, "Parquet whose every column is a string", parquet(table=_all_strings),
       "works", via="validate", same_survey=True),
    _c("parquet_timestamp_outcome", PQ, "Parquet with a timestamp as the outcome",
       parquet(lambda df: df.__setitem__("asset_index", pd.Timestamp("1970-01-01") + pd.to_timedelta(np.arange(len(df)), "s"))),
       "rejects", INPUT, ("rule 'outcome numeric' failed", "datetime64")),
    _c("parquet_list_covariate", PQ, "Parquet with a list<double> covariate",
       parquet(lambda df: df.__setitem__("market_access", [[1.0, 2.0]] * len(df))), "rejects", INPUT,
       ("rule 'cov_market_access numeric' failed", "rows 0, 1, 2")),
    _c("parquet_null_covariate", PQ, "Parquet with a null in a nullable Int64 covariate",
       parquet(lambda df: df.__setitem__("household_size", pd.array([None] + [3] * (len(df) - 1), dtype="Int64"))),
       "rejects", INPUT, ("rule 'cov_household_size not null' failed", "rows 0")),
    _c("parquet_truncated", PQ, "a Parquet file cut off half-way", truncated_parquet, "rejects", INPUT,
       ("survey file villages.parquet could not be parsed",)),
    # ---- paths and file kinds ------------------------------------------------------------------------
    _c("survey_is_a_folder", PATHS, "survey.path names a folder", folder_survey, "rejects", INPUT,
       ("villages.csv is a folder, not a file",)),
    _c("survey_is_a_fifo", PATHS, "survey.path names a named pipe (FIFO)", fifo_survey, "rejects", INPUT,
       ("villages.csv is a named pipe (FIFO), not a file",)),
    _c("survey_missing", PATHS, "survey.path names no file (a typo)", point_survey_to("vilages.csv"), "rejects", INPUT,
       ("survey file not found", "vilages.csv")),
    _c("survey_symlink_inside", PATHS, "survey is a symlink to a file inside the study folder", symlink_survey(False),
       "works", via="validate", same_survey=True),
    _c("survey_symlink_outside", PATHS, "survey is a symlink leading outside the study folder", symlink_survey(True),
       "rejects", INPUT, ("'linked.csv' escapes the study folder",)),
    _c("survey_absolute_path_outside", PATHS, "survey.path an absolute path outside the study folder",
       absolute_survey_path(False), "rejects", INPUT, ("escapes the study folder",)),
    _c("survey_absolute_path_inside", PATHS, "survey.path an absolute path to the file inside the study folder",
       absolute_survey_path(True), "works", via="validate", same_survey=True),
    _c("study_file_missing", PATHS, "the study file is not there", lambda s: (s / "study.yaml").unlink(),
       "rejects", INPUT, ("study file not found", "study.yaml")),
    _c("imagery_path_is_the_survey", PATHS, "imagery.path names the CSV", edit_study("imagery", path=SURVEY),
       "rejects", INPUT, ("imagery rejected", "villages.csv")),
    _c("imagery_folder_with_other_files", PATHS, "imagery folder also holds README.txt and .aux.xml files",
       other_files_in_imagery, "works", via="validate"),
    _c("imagery_symlink_inside", PATHS, "the scene is a symlink to a file inside the study folder", symlink_imagery,
       "works", via="validate"),
    _c("zero_byte_scene", PATHS, "a zero-byte scene.tif", lambda s: scene(s).write_bytes(b""), "rejects", INPUT,
       ("imagery rejected", "scene.tif")),
    # ---- study file: syntax and limits ---------------------------------------------------------------
    _c("yaml_syntax_error", STUDY, "an unclosed bracket in the study file",
       study_text(lambda t: t.replace("covariates:", "covariates: [oops")), "rejects", INPUT,
       ("not valid YAML", "line")),
    _c("yaml_tab_indent", STUDY, "a tab used for indentation", study_text(lambda t: t.replace("\n  path: villages", "\n\tpath: villages")),
       "rejects", INPUT, ("not valid YAML",)),
    _c("top_level_list", STUDY, "the study file is a YAML list", study_text(lambda t: "- " + t.replace("\n", "\n  ")),
       "rejects", INPUT, ("expected a mapping at the top level",)),
    _c("empty_study_file", STUDY, "an empty study file", study_text(lambda t: ""), "rejects", INPUT,
       ("expected a mapping at the top level",)),
    _c("misspelt_section", STUDY, "a misspelt section ('anaylsis:')", study_text(lambda t: t.replace("analysis:", "anaylsis:")),
       "rejects", INPUT, ("anaylsis", "Extra inputs are not permitted")),
    _c("key_given_twice", STUDY, "chip_size_px given twice", study_text(lambda t: t.replace("chip_size_px: 32", "chip_size_px: 32\n  chip_size_px: 64")),
       "rejects", INPUT, ("rule 'study file keys unique' failed", "'chip_size_px'")),
    _c("chip_too_small", STUDY, "chip_size_px: 4", edit_study("imagery", chip_size_px=4), "rejects", INPUT,
       ("imagery.chip_size_px", "greater than or equal to 8")),
    _c("chip_too_large", STUDY, "chip_size_px: 4096", edit_study("imagery", chip_size_px=4096), "rejects", INPUT,
       ("imagery.chip_size_px", "less than or equal to 1024")),
    _c("chip_size_with_unit", STUDY, "chip_size_px: '64px'", edit_study("imagery", chip_size_px="64px"), "rejects", INPUT,
       ("imagery.chip_size_px",)),
    _c("one_fold", STUDY, "analysis.folds: 1", edit_study("analysis", folds=1), "rejects", INPUT, ("analysis.folds",)),
    _c("unknown_estimator", STUDY, "estimators: [ols]", edit_study("analysis", estimators=["ols"]), "rejects", INPUT,
       ("analysis.estimators",)),
    _c("no_estimators", STUDY, "estimators: []", edit_study("analysis", estimators=[]), "rejects", INPUT,
       ("analysis.estimators", "must name at least one")),
    _c("tabular_without_covariates", STUDY, "tabular features asked for, no covariates", edit_study("survey", covariates=[]),
       "rejects", INPUT, ("survey.covariates is empty",)),
    _c("seed_too_large", STUDY, "embedding.seed: 2**32", edit_study("embedding", seed=2**32), "rejects", INPUT,
       ("embedding.seed", "less than or equal to 4294967295")),
    _c("nodata_share_above_one", STUDY, "max_nodata_share: 1.5", edit_study("imagery", max_nodata_share=1.5),
       "rejects", INPUT, ("imagery.max_nodata_share",)),
    _c("yaml_alias_bomb", STUDY, "a 'billion laughs' alias bomb as the name", study_text(_alias_bomb), "rejects", INPUT,
       ("name: Input should be a valid string",)),
    _c("python_object_tag", STUDY, "a !!python/object tag in the study file",
       study_text(lambda t: t.replace("name: eocausal_demo", "name: !!python/object/apply:os.system ['true']")),
       "rejects", INPUT, ("not valid YAML", "python/object")),
    _c("study_file_latin1", STUDY, "the study file saved as Latin-1 (a comment with 'é')",
       lambda s: (s / "study.yaml").write_bytes(((s / "study.yaml").read_text() + "# résumé\n").encode("latin-1")),
       "rejects", INPUT, ("not UTF-8 text", "save it as UTF-8")),
    _c("study_file_bom", STUDY, "the study file starts with a UTF-8 BOM",
       lambda s: (s / "study.yaml").write_bytes(b"\xef\xbb\xbf" + (s / "study.yaml").read_bytes()),
       "works", via="validate", same_survey=True),
    _c("same_column_twice", STUDY, "treatment and outcome map the same column", edit_study("survey", outcome="aid_received"),
       "rejects", INPUT, ("survey columns must be distinct", "aid_received")),
    _c("covariate_not_in_file", STUDY, "a covariate the file does not have",
       edit_study("survey", covariates=["market_access", "rainfall"]), "rejects", INPUT,
       ("required column 'rainfall' present",)),
    # ---- names and ids -------------------------------------------------------------------------------
    _c("name_with_space", NAMES, "study name 'my study'", lambda s: write_doc(s, {**study_doc(s), "name": "my study"}),
       "rejects", INPUT, ("name: Value error, name must be 1-64 characters",)),
    _c("name_65_characters", NAMES, "a 65-character study name", lambda s: write_doc(s, {**study_doc(s), "name": "n" * 65}),
       "rejects", INPUT, ("name must be 1-64 characters",)),
    _c("name_with_accent", NAMES, "study name 'étude'", lambda s: write_doc(s, {**study_doc(s), "name": "étude"}),
       "rejects", INPUT, ("name must be 1-64 characters",)),
    _c("ids_NA_and_NULL", NAMES, "unit ids 'NA', 'NULL', 'None' (Namibia's code, ...)",
       lambda s: rewrite(s, _ids(["NA", "NULL", "None"])), "works", via="validate"),
    _c("ids_leading_zeros", NAMES, "ids '007' and '7' (distinct as text)", lambda s: rewrite(s, _ids(["007", "7"])),
       "works", via="validate"),
    _c("ids_long_numbers", NAMES, "20-digit numeric ids", lambda s: rewrite(s, _ids(["12345678901234567890", "12345678901234567891"])),
       "works", via="validate"),
    _c("ids_differ_only_by_case", NAMES, "ids 'V0005' and 'v0005' (distinct)", lambda s: rewrite(s, _ids_case),
       "works", via="validate"),
    _c("ids_differ_only_by_space", NAMES, "ids 'V0005' and ' V0005' (the same id once trimmed)",
       lambda s: rewrite(s, _ids_differ_by_space), "rejects", INPUT, ("rule 'unique unit_id' failed", "rows 4, 5")),
    _c("covariate_name_with_punctuation", NAMES, "covariate 'market access (km)'",
       rename_column("market_access", "market access (km)", ("survey.covariates", "market access (km)")),
       "works", via="validate"),
    _c("covariates_same_canonical_name", NAMES, "covariates 'market-access' and 'market_access'",
       lambda s: (rewrite(s, lambda df: df.__setitem__("market-access", df["market_access"])),
                  edit_study("survey", covariates=["market_access", "market-access"])(s)),
       "rejects", INPUT, ("covariates map to the same canonical column", "cov_market_access")),
    # ---- degenerate designs --------------------------------------------------------------------------
    _c("more_folds_than_treated", DESIGN, "analysis.folds 50 with fewer treated units",
       edit_study("analysis", folds=50), "rejects", INPUT, ("at least 50 treated units (analysis.folds = 50",)),
    _c("single_treated_unit", DESIGN, "one treated unit", lambda s: rewrite(s, _no_treated_but_one), "rejects", INPUT,
       ("1 treated units: too few for any cross-fitting",)),
    _c("two_units", DESIGN, "a survey of two units", lambda s: rewrite(s, _two_units), "rejects", INPUT,
       ("too few for any cross-fitting",)),
    _c("constant_outcome", DESIGN, "every unit has the same outcome",
       lambda s: rewrite(s, lambda df: df.__setitem__("asset_index", "3.0")), "rejects", INPUT,
       ("rule 'outcome not constant' failed", "every unit has outcome = 3.0")),
    _c("constant_covariate", DESIGN, "a covariate with one value",
       lambda s: rewrite(s, lambda df: df.__setitem__("household_size", "4")), "rejects", INPUT,
       ("rule 'cov_household_size not constant' failed",)),
    _c("all_units_one_coordinate", DESIGN, "every unit at the same coordinate (one shared chip)",
       lambda s: rewrite(s, one_coordinate), "rejects", INPUT, "embedding not constant across units", via="inputs",
       note="one shared chip makes every embedding feature constant: the embeddings check names the rule"),
    _c("chip_larger_than_scene", DESIGN, "chip_size_px 700 on a 640 x 560 px scene",
       edit_study("imagery", chip_size_px=700), "rejects", INPUT,
       ("chip_usability", "nodata_share_above_max")),
    # ---- imagery -------------------------------------------------------------------------------------
    _c("crs_geographic", IMG, "the scene re-projected to EPSG:4326", warp_scene("EPSG:4326"), "works", via="inputs"),
    _c("crs_web_mercator", IMG, "the scene re-projected to EPSG:3857", warp_scene("EPSG:3857"), "works", via="inputs"),
    _c("dtype_int16", IMG, "int16 pixels", rewrite_scene(dtype="int16"), "works", via="inputs"),
    _c("dtype_float64", IMG, "float64 pixels", rewrite_scene(dtype="float64"), "works", via="inputs"),
    _c("dtype_uint8", IMG, "uint8 pixels (scaled down)", rewrite_scene(data=lambda a: a // 256 + 1, dtype="uint8"),
       "works", via="inputs"),
    _c("untiled_striped", IMG, "an untiled (striped) GeoTIFF, no compression",
       rewrite_scene(tiled=False, compress=None), "works", via="inputs"),
    _c("lzw_compressed", IMG, "LZW compression, 512 px tiles", rewrite_scene(tiled=True, blockxsize=512, blockysize=512,
                                                                          compress="lzw"), "works", via="inputs"),
    _c("cog_with_overviews", IMG, "internal overviews (a COG-like file)", cog_with_overviews, "works", via="inputs"),
    _c("nodata_declared", IMG, "nodata = 0 declared, a zero border", rewrite_scene(
        data=lambda a: np.pad(a[:, 10:-10, 10:-10], ((0, 0), (10, 10), (10, 10))), nodata=0), "works", via="inputs"),
    _c("single_band", IMG, "one band", rewrite_scene(data=lambda a: a[:1]), "works", via="inputs"),
    _c("twelve_bands", IMG, "twelve bands", rewrite_scene(data=lambda a: np.concatenate([a] * 4)), "works", via="inputs"),
    _c("scene_elsewhere", IMG, "a scene that does not overlap the units (moved 500 km east)", shift_scene(500_000),
       "rejects", INPUT, ("chip_usability", "outside_coverage", "rows 0, 1, 2")),
    _c("scene_covers_most_units", IMG, "a scene covering about three quarters of the units (moved 5 km east)",
       shift_scene(5_000), "works", via="inputs", note="units off the scene are excluded with a record and a count"),
    _c("png_named_tif", IMG, "a PNG file named scene.tif", png_named_tif, "rejects", INPUT,
       ("imagery rejected", "scene.tif", "PNG")),
    _c("scenes_with_different_bands", IMG, "two scenes, 3 bands and 1 band", second_scene_other_bands, "rejects", INPUT,
       ("imagery rejected", "different numbers of bands")),
    # ---- the working folder --------------------------------------------------------------------------
    _c("workdir_is_a_file", WORK, "--workdir names a file", lambda s: None, "rejects", WORKDIR,
       ("is a file, not a folder",), workdir="file"),
    _c("workdir_under_a_file", WORK, "--workdir names a path below a file", lambda s: None, "rejects", WORKDIR,
       ("cannot be created", "is a file, not a folder"), workdir="under_file"),
    _c("workdir_read_only", WORK, "a read-only working folder (chmod, or chattr +i as root)", lambda s: None,
       "rejects", WORKDIR, ("is read-only",), workdir="read_only"),
    _c("workdir_read_only_fs", WORK, "a working folder on a read-only file system (EROFS, injected)", lambda s: None,
       "rejects", WORKDIR, ("is read-only (a read-only file system)",), env={"EOCAUSAL_FS_FAULT": "EROFS"}),
    _c("disk_full_before_the_run", WORK, "disk full when the run starts (ENOSPC, injected)", lambda s: None,
       "rejects", WORKDIR, ("is out of space", "--workdir"), env={"EOCAUSAL_FS_FAULT": "ENOSPC"}),
    _c("disk_full_writing_the_lake", WORK, "disk fills while the survey is written to the lake (ENOSPC, injected)",
       lambda s: None, "rejects", WORKDIR, ("survey: working folder", "is out of space", "lake/survey.parquet"),
       env={"EOCAUSAL_FS_FAULT": "ENOSPC", "EOCAUSAL_FS_FAULT_PATH": "/lake/"}),
    _c("disk_full_caching_chips", WORK, "disk fills while new chips are cached (ENOSPC at the first part of chips, injected)",
       "wave2", "rejects", WORKDIR, ("image_embedder: working folder", "is out of space", "cache/chips/parts/"),
       env={"EOCAUSAL_FS_FAULT": "ENOSPC", "EOCAUSAL_FS_FAULT_PATH": "cache/chips"}),
    _c("workdir_busy", WORK, "another run holds the working folder", lambda s: None, "rejects", BUSY,
       ("is using the working folder",), workdir="locked"),
    _c("earth_engine_key_missing", WORK, "Earth Engine study, the key file named in the environment is missing",
       "earthengine", "rejects", CREDENTIALS, ("EOCAUSAL_EE_SERVICE_ACCOUNT_KEY names a file that does not exist",),
       env={"EOCAUSAL_EE_SERVICE_ACCOUNT_KEY": "/nonexistent/key.json"}),
    # ---- remote imagery and Earth Engine access (the local HTTP server, the fake EE client) ----------
    _c("stac_catalog_refuses_connections", REMOTE, "a STAC catalog URL where nothing listens (connection refused)",
       lambda s: None, "rejects", INPUT, ("imagery rejected: STAC catalog http://127.0.0.1:", "gave up"),
       via="validate", served=Served(stac_refusing)),
    _c("stac_asset_404", REMOTE, "a STAC item whose 'green' asset answers 404", lambda s: None, "rejects", INPUT,
       ("chip_usability", "fetch_failed"), served=Served(stac_served(drop="green.tif"))),
    _c("cog_server_5xx_every_request", REMOTE, "a remote COG whose server answers 503 to every request (retries "
       "exhausted)", lambda s: None, "rejects", INPUT, ("scene.tif", "503"),
       served=Served(remote_scene, {"only": "scene.tif", "status_every": 1, "status": 503}),
       note="the header read gives up when the chip stage opens the file: a clear stage failure (exit 2), not "
            "per-unit fetch_failed; the first line is the headline, the error line below names image_embedder (the first stage to open the imagery), the "
            "URL and the 503"),
    _c("remote_cog_403", REMOTE, "a remote COG URL answering 403 Forbidden", lambda s: None, "rejects", INPUT,
       ("imagery rejected", "scene.tif", "403"), via="validate",
       served=Served(remote_scene, {"only": "scene.tif", "status_every": 1, "status": 403})),
    _c("earth_engine_401_at_init", REMOTE, "Earth Engine answers 401 (credentials refused) at initialisation",
       "earthengine", "rejects", CREDENTIALS, ("401",),
       env={"EOCAUSAL_EE_CLIENT": "tests.imagery.fake_earthengine:refusing_401"}),
    _c("earth_engine_403_at_init", REMOTE, "Earth Engine answers 403 (permission denied) at initialisation",
       "earthengine", "rejects", CREDENTIALS, ("403",),
       env={"EOCAUSAL_EE_CLIENT": "tests.imagery.fake_earthengine:refusing_403"}),
    _c("earth_engine_401_validate", REMOTE, "Earth Engine answers 401 at initialisation (eocausal validate)",
       "earthengine", "rejects", CREDENTIALS, ("rule 'Earth Engine credentials accepted' failed", "HTTP 401",
                                               "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY"),
       via="validate", env={"EOCAUSAL_EE_CLIENT": "tests.imagery.fake_earthengine:refusing_401"}),
    _c("second_wave_appended", ENC, "a second survey wave: 40 new units appended (the read-loop refresh)", "wave2",
       "works", via="refresh"),
    # ---- the whole graph, as the UI and the sensors run it (tests/faults/test_bad_input.py) ------------
    # survey: structure and encoding
    _c("missing_column", ENC, "the treatment column missing",
       lambda s: rewrite(s, lambda df: df.drop(columns=["aid_received"], inplace=True)), "rejects", INPUT,
       ["required column 'aid_received' present"], via="graph"),
    _c("empty_file", ENC, "a zero-byte survey", lambda s: (s / SURVEY).write_bytes(b""), "rejects", INPUT,
       ["survey file is empty"], via="graph"),
    _c("header_only", ENC, "a header and no rows",
       lambda s: (s / SURVEY).write_text((s / SURVEY).read_text().splitlines()[0] + "\n"), "rejects", INPUT,
       ["header but no rows"], via="graph"),
    _c("latin1_encoding", ENC, "a Latin-1 survey", lambda s: (s / SURVEY).write_bytes(
        (s / SURVEY).read_text().replace("V0005", "São-5").encode("latin-1")), "rejects", INPUT, ["not UTF-8"], via="graph"),
    _c("utf16_encoding", ENC, "a UTF-16 survey", lambda s: (s / SURVEY).write_bytes((s / SURVEY).read_text().encode("utf-16")),
       "rejects", INPUT, ["not UTF-8"], via="graph"),
    _c("semicolon_delimited", ENC, "semicolon-delimited CSV",
       lambda s: (s / SURVEY).write_text((s / SURVEY).read_text().replace(",", ";")), "rejects", INPUT,
       ["required column 'village_code' present", "required column 'aid_received' present",
        "none of the study's columns is in the header"], via="graph"),
    _c("ragged_rows", ENC, "a row with extra fields", lambda s: (s / SURVEY).write_text(
        (s / SURVEY).read_text().replace("\nV0004,", "\nV0004,extra,fields,", 1)), "rejects", INPUT,
       ["could not be parsed", "line"], via="graph"),
    _c("binary_garbage", ENC, "4 KiB of random bytes as the survey",
       lambda s: (s / SURVEY).write_bytes(np.random.default_rng(0).bytes(4096)), "rejects", INPUT, ["survey file"],
       via="graph"),
    # survey: types and values
    _c("text_in_outcome", NUM, "outcome 'high'", lambda s: rewrite(s, set_cell("asset_index", [5], "high")),
       "rejects", INPUT, ["rule 'outcome numeric' failed", "rows 5", "high"], via="graph"),
    _c("dms_latitude", NUM, "latitude 41°58'N", lambda s: rewrite(s, set_cell("latitude", [8], "41°58'N")),
       "rejects", INPUT, ["rule 'lat numeric' failed", "rows 8"], via="graph"),
    _c("treatment_yes_no", NUM, "treatment yes/no", lambda s: rewrite(s, _yes_no), "rejects", INPUT,
       ["rule 'treatment numeric' failed", "rows 0, 1, 2"], via="graph"),
    _c("empty_outcome", NUM, "empty outcome cells", lambda s: rewrite(s, set_cell("asset_index", [3, 4], "")),
       "rejects", INPUT, ["rule 'outcome not null' failed", "rows 3, 4"], via="graph"),
    _c("nan_outcome", NUM, "outcome 'NaN'", lambda s: rewrite(s, set_cell("asset_index", [6], "NaN")),
       "rejects", INPUT, ["rule 'outcome not null' failed", "rows 6"], via="graph"),
    _c("inf_outcome", NUM, "outcome 'inf'", lambda s: rewrite(s, set_cell("asset_index", [7], "inf")),
       "rejects", INPUT, ["rule 'outcome finite (|value| <= 1e15)' failed", "rows 7"], via="graph"),
    _c("huge_outcome", NUM, "outcome 9.96921e36 (a netCDF fill value)",
       lambda s: rewrite(s, set_cell("asset_index", [9], "9.96921e36")), "rejects", INPUT,
       ["rule 'outcome finite (|value| <= 1e15)' failed", "rows 9"], via="graph"),
    _c("huge_covariate", NUM, "covariate 1e200", lambda s: rewrite(s, set_cell("market_access", [10], "1e200")),
       "rejects", INPUT, ["rule 'cov_market_access finite (|value| <= 1e15)' failed", "rows 10"], via="graph"),
    _c("missing_covariate", NUM, "an empty covariate cell", lambda s: rewrite(s, set_cell("household_size", [11], "")),
       "rejects", INPUT, ["rule 'cov_household_size not null' failed", "rows 11"], via="graph"),
    _c("missing_unit_id", NAMES, "an empty unit id", lambda s: rewrite(s, set_cell("village_code", [0], "")),
       "rejects", INPUT, ["rule 'unit_id not null' failed", "rows 0"], via="graph"),
    _c("duplicated_ids", NAMES, "a unit id given twice", lambda s: rewrite(s, _dup_id), "rejects", INPUT,
       ["rule 'unique unit_id' failed", "rows 3, 7"], via="graph"),
    _c("lat_out_of_range", NUM, "latitude 123", lambda s: rewrite(s, set_cell("latitude", [4], "123.0")),
       "rejects", INPUT, ["rule 'lat within [-90, 90]' failed", "rows 4"], via="graph"),
    _c("lon_out_of_range", NUM, "longitude -200", lambda s: rewrite(s, set_cell("longitude", [2], "-200")),
       "rejects", INPUT, ["rule 'lon within [-180, 180]' failed", "rows 2"], via="graph"),
    _c("treatment_not_binary", NUM, "treatment 2", lambda s: rewrite(s, set_cell("aid_received", [2], "2")),
       "rejects", INPUT, ["rule 'treatment binary (0/1)' failed", "rows 2"], via="graph"),
    _c("one_arm_only", DESIGN, "every unit treated", lambda s: rewrite(s, _one_arm), "rejects", INPUT,
       ["rule 'treatment arm 0 present' failed"], via="graph"),
    _c("swapped_lat_lon", DESIGN, "latitude and longitude swapped", lambda s: rewrite(s, swap_lat_lon), "rejects", INPUT,
       ["chip_usability", "outside_coverage", "are lat and lon swapped", "rows 0, 1, 2"], via="graph"),
    # imagery
    _c("corrupt_tiff", IMG, "a scene cut off at a third",
       lambda s: scene(s).write_bytes(scene(s).read_bytes()[: scene(s).stat().st_size // 3]), "rejects", INPUT,
       ["image_embedder", "scene.tif", "corrupt"], via="graph"),
    _c("not_a_tiff", IMG, "a text file named scene.tif", lambda s: scene(s).write_text("this is not an image\n"),
       "rejects", INPUT, ["scene.tif", "not a TIFF"], via="graph"),
    _c("crs_missing", IMG, "a scene without a CRS", rewrite_scene(crs=None), "rejects", INPUT, ["scene.tif", "no CRS"],
       via="graph"),
    _c("empty_band_list", IMG, "imagery.bands: []", edit_study("imagery", bands=[]), "rejects", INPUT,
       ["'bands' is empty"], via="graph"),
    _c("band_out_of_range", IMG, "imagery.bands: [1, 7] on a 3-band scene", edit_study("imagery", bands=[1, 7]),
       "rejects", INPUT, ["band indexes [7] out of range"], via="graph"),
    _c("one_pixel_raster", IMG, "a 1 x 1 pixel scene", rewrite_scene(data=lambda a: a[:, :1, :1]), "rejects", INPUT,
       ["chip_usability", "have a usable chip", "rows 0, 1, 2"], via="graph",
       note="the hint asks whether lat and lon are swapped; here the scene is one pixel (the rule and units are right)"),
    _c("all_nodata_imagery", IMG, "a scene of zeros (undeclared nodata)", rewrite_scene(data=lambda a: np.zeros_like(a)),
       "rejects", INPUT, ["chip_usability", "nodata_share_above_max", "rows 0, 1, 2"], via="graph"),
    _c("nan_imagery", IMG, "a float scene of NaN", rewrite_scene(data=lambda a: np.full(a.shape, np.nan), dtype="float32"),
       "rejects", INPUT, ["chip_usability", "nodata_share_above_max"], via="graph"),
    _c("inf_pixels", IMG, "a block of +inf pixels", rewrite_scene(data=lambda a: _inf_block(a), dtype="float32"),
       "rejects", INPUT, ["image_embeddings", "rule 'embedding values finite' failed", "units V0"], via="graph"),
    _c("no_imagery_files", IMG, "an empty imagery folder", lambda s: scene(s).unlink(), "rejects", INPUT,
       ["no GeoTIFF"], via="graph"),
]


def _inf_block(a):
    a = a.astype("float32")
    a[:, 100:300, 100:300] = np.inf  # +inf pixels: a float check passes them, sums overflow
    return a


GRAPH_CASES = [c for c in CASES if c.via == "graph"]
CHEAP_CASES = [c for c in CASES if c.via in ("run", "validate", "inputs")]

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


# -- the table ----------------------------------------------------------------------------------------

HOW = {"run": "eocausal run (in-process)", "validate": "eocausal validate", "inputs": "run_study(inputs_only)",
       "graph": "run_study (whole graph)", "refresh": "eocausal run --json (subprocess)"}


def write_markdown(observed: dict[str, dict], path: Path, command: str) -> Path:
    """The matrix as a markdown table: kind, case, expected, outcome, exit code (observed where the
    case ran in this session; 'not run' otherwise)."""
    rows = []
    counts = {"works": 0, "rejects": 0}
    for c in CASES:
        seen = observed.get(c.name)
        expected = "works" if c.expected == "works" else f"rejects ({c.code})"
        counts[c.expected] += 1
        if seen is None:
            outcome, code, message = "not run", "", ""
        else:
            outcome = seen["outcome"]
            code = str(seen["code"])
            message = seen.get("message", "")
        note = f" *{c.note}*" if c.note else ""
        message = message.replace("|", "\\|").replace("\n", " ")
        if len(message) > 160:
            message = message[:157] + "..."
        rows.append(f"| {c.kind} | `{c.name}` | {c.what} | {expected} | {outcome} | {code} | {HOW[c.via]} | "
                    f"{message}{note} |")
    ran = [o for o in observed.values()]
    summary = (f"{len(CASES)} kinds of input: {counts['works']} expected to work, {counts['rejects']} to be rejected; "
               f"{len(ran)} ran in this session, {sum(o['as_expected'] for o in ran)} as expected.")
    text = "\n".join([
        "# Fault matrix: bad and unusual inputs",
        "",
        "Generated by the fault suite (tests/faults/matrix.py, one list of cases) with:",
        "",
        f"    {command}",
        "",
        summary,
        "Every rejected case also left the published warehouse byte-for-byte unchanged, printed no",
        "traceback, and (via `eocausal run`) printed the path of a log with the full trace.",
        "Exit codes: 0 works, 1 run failed, 2 input rejected, 3 working folder unusable, 4 busy,",
        "5 Earth Engine access refused. *Italics*: results that are still unclear or arguably wrong.",
        "",
        "| kind | case | input | expected | outcome | exit code | checked with | message (first line) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def _short(text: str) -> str:
    """Temporary paths shortened for the table: <study>/..., <workdir>, <tmp>/..."""
    text = re.sub(r"/\S*?/study/", "<study>/", text)
    text = re.sub(r"/\S*/scenarios/\w+/work", "<workdir>", text)
    return re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+/", "<tmp>/", text)


def observation(case: Case, code: int, message: str) -> dict:
    outcome = "works" if code == 0 else f"rejected ({code})"
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.startswith("eocausal: exit code")]
    # the line that says the rule (a rule, a failed check), else the first; a study file's field
    # errors are listed below their heading: the heading and the first of them
    first = next((line for line in lines if "rule '" in line or "failed check" in line), lines[0] if lines else "")
    if first.endswith("invalid study file") and lines.index(first) + 1 < len(lines):
        first += ": " + lines[lines.index(first) + 1]
    first = _short(first.removeprefix("eocausal: ").removeprefix("- ").strip())
    as_expected = (code == 0) if case.expected == "works" else (code == case.code)
    return {"outcome": outcome, "code": code, "message": first, "as_expected": as_expected}


def save_observation(folder: Path, case: Case, obs: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{case.name}.json").write_text(json.dumps(obs))


def load_observations(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}
