"""dbt docs for a study's warehouse: what SQL consumers can read about each table and view.

`eocausal docs STUDY` (or `make docs` for the demo) runs `dbt docs generate --static` against a
private copy of the *published* warehouse: dbt-duckdb opens its database read-write, so it must
touch neither the consumers' copy nor the file the pipeline writes (which would need the
warehouse pool). Works offline: dbt builds the catalog from the file and bundles the page.
Output: <workdir>/docs/static_index.html (one self-contained page), catalog.json, manifest.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from assets.dbt import DBT_EXECUTABLE, DBT_PROJECT_DIR
from assets.resources import dbt_path_vars
from eocausal.layout import Layout
from eocausal.warehouse import check_sql_safe_path

DOCS_FOLDER = "docs"


def generate_docs(workdir: Path, out: Path | None = None, analysis_period: str | None = None) -> Path:
    """Generate dbt docs for the published warehouse under ``workdir``; returns the static page.
    ``analysis_period``: the imagery period the sources read (shown as their location)."""
    workdir = check_sql_safe_path(Path(workdir).resolve())
    published = Layout(workdir).published
    if not published.exists():
        raise FileNotFoundError(f"no published warehouse at {published}: run the study first")
    out = Path(out).resolve() if out else workdir / DOCS_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eocausal-docs-") as tmp:
        copy = Path(tmp) / "warehouse.duckdb"
        shutil.copyfile(published, copy)
        env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
        dbt_vars = dbt_path_vars(Layout(workdir).lake, copy)
        if analysis_period is not None:
            dbt_vars["analysis_period"] = analysis_period
        result = subprocess.run(
            [DBT_EXECUTABLE, "docs", "generate", "--static", "--vars", json.dumps(dbt_vars, sort_keys=True),
             "--project-dir", str(DBT_PROJECT_DIR),
             "--profiles-dir", str(DBT_PROJECT_DIR), "--target-path", str(out), "--log-path", str(out / "logs")],
            env=env, cwd=DBT_PROJECT_DIR, capture_output=True, text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"dbt docs generate failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return out / "static_index.html"
