"""Reading and canonicalising survey tables (DESIGN §4 'survey').

The user's table (CSV or Parquet, their column names) becomes the canonical table:
``unit_id`` (str), ``lat``, ``lon`` (float, WGS84), ``treatment`` (int 0/1), ``outcome`` (float),
and one ``cov_<name>`` float column per covariate. Every rule is checked by the GX survey suite
(:func:`eocausal.quality.validate_survey`) before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.quality import DataQualityError, QualityReport, RuleFailure, validate_survey
from eocausal.study import SurveySpec

CANONICAL_COLUMNS = ("unit_id", "lat", "lon", "treatment", "outcome")
_NUMERIC = ("lat", "lon", "treatment", "outcome")


class SurveyError(ValueError):
    """A survey file that cannot be read as a table (missing, empty, wrong format or encoding)."""


def covariate_column(name: str) -> str:
    """Canonical column for a user covariate: ``cov_`` + lower-case identifier characters."""
    safe = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    if not safe:
        raise SurveyError(f"covariate name {name!r} has no letters or digits")
    return f"cov_{safe}"


def read_survey_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet survey table as the user wrote it (ids kept as text)."""
    path = Path(path)
    if not path.exists():
        raise SurveyError(f"survey file not found: {path}")
    if path.stat().st_size == 0:
        raise SurveyError(f"survey file is empty: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            # utf-8-sig strips a BOM that spreadsheet exports add.
            return pd.read_csv(path, sep=sep, encoding="utf-8-sig", dtype=str, keep_default_na=True)
    except UnicodeDecodeError as exc:
        raise SurveyError(f"survey file {path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise SurveyError(f"survey file has no columns: {path.name}") from None
    except (pd.errors.ParserError, OSError, ValueError) as exc:
        raise SurveyError(f"survey file {path.name} could not be parsed: {exc}") from None
    raise SurveyError(f"survey file {path.name}: unsupported format {suffix!r} (use .csv or .parquet)")


def canonicalise(raw: pd.DataFrame, spec: SurveySpec) -> tuple[pd.DataFrame, list[RuleFailure]]:
    """Map the user's columns to canonical names and types.

    Returns the canonical table and the parse failures (values that are not numbers), which the
    caller reports together with the GX suite's failures. A missing column raises at once.
    """
    if raw.shape[0] == 0:
        raise SurveyError("survey table has a header but no rows")
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
        raise DataQualityError(
            QualityReport(
                suite="survey",
                n_rows=len(raw),
                n_expectations=len(mapping),
                failures=[RuleFailure(rule=f"required column '{c}' present", column=c, rows=[], unit_ids=[])
                          for c in missing],
            )
        )
    df = raw[list(mapping)].rename(columns=mapping).reset_index(drop=True)
    df["unit_id"] = df["unit_id"].map(lambda v: None if pd.isna(v) else str(v).strip())
    parse_failures = []
    for col in (*_NUMERIC, *cov_names.values()):
        original = df[col]
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


def load_survey(
    path: Path, spec: SurveySpec, outcome_may_be_missing: bool = False
) -> tuple[pd.DataFrame, QualityReport]:
    """Read, canonicalise and validate; raise DataQualityError naming every failed rule.

    ``outcome_may_be_missing`` (the study's ``analysis.outcome_imputation``): an empty outcome is
    allowed and counted in ``report.observations``; a non-finite one is still an error.
    Nothing is written here: the caller writes the canonical table only after this returns.
    """
    df, parse_failures = canonicalise(read_survey_table(path), spec)
    covariates = [covariate_column(c) for c in spec.covariates]
    report = validate_survey(df, covariates, outcome_may_be_missing=outcome_may_be_missing)
    report.failures = parse_failures + report.failures
    if not report.success:
        raise DataQualityError(report)
    df["treatment"] = df["treatment"].astype("int8")
    return df, report
