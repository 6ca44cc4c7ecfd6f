"""The working-folder layout: the one place that names a study's folders and files.

    <workdir>/
      lake/                    Parquet tables (eocausal.lake), one file per table, period or version
      cache/chips/             content-addressed chip store (eocausal.imagery.chips)
      cache/embeddings/        embedder fits and per-chip embeddings
      models/                  fitted heterogeneity models (JSON)
      figures/                 figures (transport maps, saliency, sensitivity)
      reports/                 study reports; <study>.latest names the newest
      warehouse.duckdb         the dbt-built warehouse (one writer at a time)
      published/warehouse.duckdb   the copy SQL readers open (swapped atomically)
      dbt_target/<step>/       dbt's target folder per step
      logs/                    the last run's log and failure logs
      .eocausal-run.lock       held by the run using the folder (eocausal.workdir)

Everything else asks this module for a path instead of joining names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WAREHOUSE_FILE = "warehouse.duckdb"
PUBLISHED_WAREHOUSE = Path("published") / WAREHOUSE_FILE
LOGS_FOLDER = "logs"


@dataclass(frozen=True)
class Layout:
    """A study's working folder."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def chip_cache(self) -> Path:
        return self.cache / "chips"

    @property
    def embedding_cache(self) -> Path:
        return self.cache / "embeddings"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def warehouse(self) -> Path:
        return self.root / WAREHOUSE_FILE

    @property
    def published(self) -> Path:
        return self.root / PUBLISHED_WAREHOUSE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_FOLDER

    def dbt_target(self, step: str) -> Path:
        return self.root / "dbt_target" / step

    def latest_report_pointer(self, study_name: str) -> Path:
        return self.reports / f"{study_name}.latest"
