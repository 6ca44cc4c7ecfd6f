"""Metadata helpers shared by the assets: row counts and column schemas in Dagster's keys."""

from __future__ import annotations

import dagster as dg
import pandas as pd


def table_metadata(df: pd.DataFrame, path=None) -> dict:
    meta = {
        "dagster/row_count": dg.MetadataValue.int(len(df)),
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(name=str(c), type=str(t)) for c, t in df.dtypes.items()]
        ),
    }
    if path is not None:
        meta["path"] = dg.MetadataValue.path(str(path))
    return meta
