"""Reading and canonicalising survey tables (DESIGN §4 'survey').

The user's table (CSV or Parquet, their column names) becomes the canonical table:
``unit_id`` (str), ``lat``, ``lon`` (float, WGS84), ``treatment`` (int 0/1), ``outcome`` (float),
one ``cov_<name>`` float column per covariate, and the unit's spatial ``tile``
(:mod:`eocausal.tiles`, computed after validation). Every rule is checked by the GX survey suite
(:func:`eocausal.quality.validate_survey`) before anything is written.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.quality import DataQualityError, QualityReport, RuleFailure, validate_survey
from eocausal.study import Study, SurveySpec
from eocausal.tiles import MAX_UNITS_PER_TILE, assign_tiles

CANONICAL_COLUMNS = ("unit_id", "lat", "lon", "treatment", "outcome")
_NUMERIC = ("lat", "lon", "treatment", "outcome")


class SurveyError(ValueError):
    """A survey file that cannot be read as a table (missing, empty, wrong format or encoding), or
    whose columns are ambiguous (a name repeated, or one differing from a mapped name only by case
    or surrounding whitespace)."""


# The cells pandas reads as missing by default. They mean missing in every column but the unit id:
# an id is text, and `NA` (Namibia), `NULL` or `None` are ids like any other (an empty one is missing).
MISSING_TEXT = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def covariate_column(name: str) -> str:
    """Canonical column for a user covariate: ``cov_`` + lower-case identifier characters."""
    safe = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    if not safe:
        raise SurveyError(f"covariate name {name!r} has no letters or digits")
    return f"cov_{safe}"


def read_survey_table(path: Path, id_column: str | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet survey table as the user wrote it.

    Every CSV cell is read as text; the cells pandas would call missing (``NA``, ``NULL``, empty
    ...) are missing in every column except ``id_column``, whose values stay text as written (an
    empty id stays empty, and the survey suite rejects it). A column name given twice is an error
    (pandas would rename the second ``x.1`` and the first would be used unsaid).
    """
    path = Path(path)
    if not path.exists():
        raise SurveyError(f"survey file not found: {path}")
    if not path.is_file():  # a FIFO would block the read forever; a folder cannot be read as a table
        kind = "a folder" if path.is_dir() else "a named pipe (FIFO)" if path.is_fifo() else "a device or socket"
        raise SurveyError(f"survey path {path} is {kind}, not a file: survey.path must name a CSV or Parquet file")
    if path.stat().st_size == 0:
        raise SurveyError(f"survey file is empty: {path}")
    suffix = path.suffix.lower()
    _check_not_disguised(path, suffix)
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            _check_unique_names(path, pq.read_schema(path).names)
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            # utf-8-sig strips a BOM that spreadsheet exports add.
            table = pd.read_csv(path, sep=sep, encoding="utf-8-sig", dtype=str, keep_default_na=False)
            _check_unique_names(path, _csv_header(path, sep))
            for column in table.columns:
                if column != id_column:
                    table[column] = table[column].mask(table[column].isin(MISSING_TEXT))
            return table
    except UnicodeDecodeError as exc:
        raise SurveyError(f"survey file {path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise SurveyError(f"survey file has no columns: {path.name}") from None
    except SurveyError:
        raise
    except (pd.errors.ParserError, OSError, ValueError, csv.Error) as exc:
        raise SurveyError(f"survey file {path.name} could not be parsed: {exc}") from None
    raise SurveyError(f"survey file {path.name}: unsupported format {suffix!r} (use .csv or .parquet)")


# What a file is by its first bytes, for a file whose name says CSV (or Parquet) but whose bytes do not.
_MAGIC = {b"PAR1": ("a Parquet file", "name it .parquet"), b"\x1f\x8b": ("gzip-compressed", "decompress it"),
          b"PK\x03\x04": ("a zip archive (an Excel workbook?)", "export the sheet as CSV"),
          b"\xd0\xcf\x11\xe0": ("an old Excel/Office file", "export the sheet as CSV")}


def _check_not_disguised(path: Path, suffix: str) -> None:
    """A survey whose bytes are another format than its name says: name the format (a Parquet file
    saved as .csv would otherwise read as 'not UTF-8')."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, (what, fix) in _MAGIC.items():
        if head.startswith(magic) and not (magic == b"PAR1" and suffix in (".parquet", ".pq")):
            raise SurveyError(f"survey file {path.name} is {what}, not {suffix or 'a table'} text: {fix}")


def _csv_header(path: Path, sep: str) -> list[str]:
    """The CSV's header as written (pandas renames repeated names; this reads them as they are)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long header cell is legal (pandas reads it); the csv module's limit is 128 KiB
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for row in csv.reader(f, delimiter=sep):
                if any(cell.strip() for cell in row):  # pandas skips blank lines before the header too
                    return row
        return []
    finally:
        csv.field_size_limit(limit)


def _check_unique_names(path: Path, names: list[str]) -> None:
    """Reject a header that gives a column name twice (blank names, e.g. from a trailing comma, aside)."""
    counts = Counter(n for n in names if str(n).strip())
    repeated = {name: [i + 1 for i, n in enumerate(names) if n == name] for name, k in counts.items() if k > 1}
    if repeated:
        where = "; ".join(f"{name!r} at columns {', '.join(map(str, cols))}" for name, cols in repeated.items())
        raise SurveyError(
            f"survey file {path.name}: rule 'column names unique' failed: {where} - which one to use would "
            "be a guess; rename or drop the repeats"
        )


def _fold(name: str) -> str:
    return str(name).strip().casefold()


def check_mapped_columns(columns, spec: SurveySpec) -> None:
    """Reject a column that differs from a mapped name only by case or surrounding whitespace.

    With ``outcome: income`` and columns ``income`` and ``Income `` either could be meant; with
    ``outcome: income`` and only ``Income`` the study names a column the file does not have. Both
    are errors that name the two columns (columns the study maps exactly are not ambiguous).
    """
    columns = [str(c) for c in columns]
    mapped = {
        "survey.unit_id": spec.unit_id, "survey.lat": spec.lat, "survey.lon": spec.lon,
        "survey.treatment": spec.treatment, "survey.outcome": spec.outcome,
        **{f"survey.covariates[{i}]": c for i, c in enumerate(spec.covariates)},
    }
    exact = set(mapped.values())
    problems = []
    for field_name, name in mapped.items():
        near = [c for c in columns if c != name and c not in exact and _fold(c) == _fold(name)]
        if not near:
            continue
        shown = ", ".join(repr(c) for c in near)
        if name in columns:
            problems.append(f"{field_name} {name!r} and column(s) {shown} differ only by case or surrounding "
                            "whitespace - both are in the file")
        else:
            problems.append(f"{field_name} {name!r} is not a column; column(s) {shown} differ from it only by "
                            "case or surrounding whitespace")
    if problems:
        raise SurveyError(
            "rule 'mapped column names unambiguous' failed: " + "; ".join(problems)
            + ". Names must match exactly: map the column you mean by its exact name, or rename the other."
        )


def canonicalise(raw: pd.DataFrame, spec: SurveySpec) -> tuple[pd.DataFrame, list[RuleFailure]]:
    """Map the user's columns to canonical names and types.

    Returns the canonical table and the parse failures (values that are not numbers), which the
    caller reports together with the GX suite's failures. A missing column raises at once.
    """
    if raw.shape[0] == 0:
        raise SurveyError("survey table has a header but no rows")
    check_mapped_columns(raw.columns, spec)
    mapping = {
        spec.unit_id: "unit_id",
        spec.lat: "lat",
        spec.lon: "lon",
        spec.treatment: "treatment",
        spec.outcome: "outcome",
    }
    cov_names = {c: covariate_column(c) for c in spec.covariates}
    clashes = sorted({v for v in cov_names.values() if list(cov_names.values()).count(v) > 1})
    if clashes:
        raise SurveyError(f"covariates map to the same canonical column: {clashes}")
    mapping.update(cov_names)
    missing = [c for c in mapping if c not in raw.columns]
    if missing:
        failures = [RuleFailure(rule=f"required column '{c}' present", column=c, rows=[], unit_ids=[])
                    for c in missing]
        if len(missing) == len(mapping):  # not one of them: the header is probably not the header
            header = [str(c) if len(str(c)) <= 60 else str(c)[:57] + "..." for c in list(raw.columns)[:6]]
            failures[0].examples = [f"none of the study's columns is in the header, which reads {header}: is there "
                                    "a line above the header, or a delimiter other than ','?"]
        raise DataQualityError(
            QualityReport(suite="survey", n_rows=len(raw), n_expectations=len(mapping), failures=failures)
        )
    df = raw[list(mapping)].rename(columns=mapping).reset_index(drop=True)
    df["unit_id"] = df["unit_id"].map(_unit_id)
    parse_failures = []
    for col in (*_NUMERIC, *cov_names.values()):
        original = df[col]
        if pd.api.types.is_datetime64_any_dtype(original) or pd.api.types.is_timedelta64_dtype(original):
            # pandas would turn dates into nanosecond counts: a date is not a number (say which type)
            numeric = pd.Series(np.nan, index=original.index)
            original = original.astype(str).radd(f"{original.dtype} ")
        else:
            numeric = pd.to_numeric(original, errors="coerce")
        bad = original.notna() & numeric.isna()
        if bad.any():
            rows = np.flatnonzero(bad.to_numpy()).tolist()
            parse_failures.append(
                RuleFailure(rule=f"{col} numeric", column=col, rows=rows,
                            unit_ids=df["unit_id"].iloc[rows].astype(str).tolist(),
                            examples=original.iloc[rows[:5]].tolist())
            )
        df[col] = numeric.astype("float64")
    return df, parse_failures


def _unit_id(value) -> str | None:
    """An id as text, trimmed; only an empty one (or a null in a Parquet file) is missing."""
    if isinstance(value, str):
        return value.strip() or None
    try:
        if value is None or pd.isna(value):
            return None
    except (TypeError, ValueError):  # not a scalar (a list in a Parquet cell): its text is its id
        pass
    return str(value).strip() or None


def load_survey(
    path: Path, spec: SurveySpec, outcome_may_be_missing: bool = False, folds: int | None = None,
    max_units_per_tile: int = MAX_UNITS_PER_TILE,
) -> tuple[pd.DataFrame, QualityReport]:
    """Read, canonicalise and validate; raise DataQualityError naming every failed rule.

    ``outcome_may_be_missing`` (the study's ``analysis.outcome_imputation``): an empty outcome is
    allowed and counted in ``report.observations``; a non-finite one is still an error.
    ``folds`` (the study's ``analysis.folds``): each treatment arm needs at least that many units.
    ``max_units_per_tile`` (the study's ``imagery.max_units_per_tile``): the tiles' size.
    Nothing is written here: the caller writes the canonical table only after this returns.
    """
    df, parse_failures = canonicalise(read_survey_table(path, id_column=spec.unit_id), spec)
    covariates = [covariate_column(c) for c in spec.covariates]
    report = validate_survey(df, covariates, outcome_may_be_missing=outcome_may_be_missing, folds=folds)
    report.failures = parse_failures + _without_rows_already_named(report.failures, parse_failures)
    if not report.success:
        raise DataQualityError(report)
    df["treatment"] = df["treatment"].astype("int8")
    df["tile"] = assign_tiles(df["lat"].to_numpy(), df["lon"].to_numpy(), max_units_per_tile)  # eocausal.tiles
    return df, report


def _without_rows_already_named(failures: list[RuleFailure], parse_failures: list[RuleFailure]) -> list[RuleFailure]:
    """The suite's 'not null' failures less the cells a 'numeric' failure already names (a value that
    is not a number became missing when parsed: one cell, one rule)."""
    unparsed = {f.column: set(f.rows) for f in parse_failures}
    kept = []
    for f in failures:
        if f.column in unparsed and f.rule == f"{f.column} not null":
            keep = [i for i, row in enumerate(f.rows) if row not in unparsed[f.column]]
            if not keep:
                continue
            f.rows = [f.rows[i] for i in keep]
            f.unit_ids = [f.unit_ids[i] for i in keep if i < len(f.unit_ids)]
            f.examples = [f.examples[i] for i in keep if i < len(f.examples)]
        kept.append(f)
    return kept


def load_study_survey(study: Study) -> tuple[pd.DataFrame, QualityReport]:
    """The study's survey, read and validated with the study's settings (the design rules included:
    units per arm for ``analysis.folds``). Raises SurveyError or DataQualityError; writes nothing.

    ``eocausal run`` calls it before any work, so that a survey the contract rejects stops the run
    with exit code 2 and the rule, before a chip is cut.
    """
    return load_survey(study.survey_path, study.survey, outcome_may_be_missing=study.analysis.outcome_imputation,
                       folds=study.analysis.folds, max_units_per_tile=study.imagery.max_units_per_tile)
