"""The example notebooks run end to end (executed with nbclient, as a reader's Jupyter would).

Slow (a real run of the demo study): collected by `make test-ops`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_demo_results_notebook_runs_and_shows_figures(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("EOCAUSAL_EXAMPLE_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    os.environ.pop("DAGSTER_HOME", None)
    notebook = nbformat.read(EXAMPLES / "demo_results.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # the unit map, example chips, forest, overlap and RATE figures, inline
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "Adjusting for the image moved the estimate by" in text and "units.parquet" in text
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "StudyResults" in "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "tabular+image" in html  # the estimates matrix as a table
