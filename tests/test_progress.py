"""Progress and logs: the stages report progress (eocausal.progress), the terminal shows it only where
it should, `--log-level` and `--version`, and the library's loggers reach Dagster's run logs."""

from __future__ import annotations

import io
import logging
import sys
import types
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from pyproj import Transformer

from eocausal import __version__, cli, progress
from eocausal.embed.embeddings import compute_embeddings
from eocausal.estimate.effects import estimate_study
from eocausal.imagery.chips import extract_chips
from eocausal.imagery.geotiff import GeoTiffSource
from eocausal.study import AnalysisSpec, EmbeddingSpec
from tests.conftest import from_origin, write_geotiff

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def events():
    seen: list[progress.Progress] = []
    with progress.reporting_to(seen.append):
        yield seen


def test_report_without_a_sink_is_silent_and_a_failing_sink_stops_nothing(capsys):
    progress.report("chips", 1, 2)

    def broken(event):
        raise OSError("terminal gone")

    with progress.reporting_to(broken):
        progress.report("chips", 2, 2)
    assert capsys.readouterr() == ("", "")


def test_stage_start_and_end_are_logged(caplog, events):
    with caplog.at_level(logging.INFO, logger="eocausal.progress"):
        for done in range(4):
            progress.report("embeddings", done, 3, "chips", "rcf")
    assert [r.getMessage() for r in caplog.records] == [
        "embeddings [rcf]: 0/3 chips (0%)", "embeddings [rcf]: 3/3 chips (100%)"]
    assert [e.done for e in events] == [0, 1, 2, 3] and events[-1].finished


def test_terminal_progress_rewrites_one_line_per_stage_and_throttles():
    out = io.StringIO()
    show = progress.TerminalProgress(out, interval=3600)
    with progress.reporting_to(show):
        for done in range(0, 101):
            progress.report("chips", done, 100, "chips")
        progress.report("dbt", 0, 4, "models and tests", "analysis models")
        progress.report("dbt", 2, 4, "models and tests", "analysis models")
    text = out.getvalue()
    # the first update and the last of the stage; the unfinished dbt line is closed at the end
    assert text == ("\r\x1b[Kchips: 0/100 chips (0%)\r\x1b[Kchips: 100/100 chips (100%)\n"
                    "\r\x1b[Kdbt [analysis models]: 0/4 models and tests (0%)\n")


def _lonlat(transform, col, row):
    x, y = transform.c + transform.a * col, transform.f + transform.e * row
    return Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(x, y)


def test_chips_embeddings_and_estimation_report_their_progress(tmp_path, events):
    transform = from_origin(500_000.0, 4_500_000.0, 30.0, 30.0)
    data = np.random.default_rng(1).integers(100, 4000, size=(3, 64, 64), dtype=np.uint16)
    scene = write_geotiff(tmp_path / "scene.tif", data, "EPSG:32633", transform)
    points = [_lonlat(transform, 10.5 + 6 * i, 12.5 + 5 * i) for i in range(7)]
    units = pd.DataFrame({"unit_id": [f"u{i}" for i in range(7)], "lon": [p[0] for p in points],
                          "lat": [p[1] for p in points]})
    extraction = extract_chips(units, GeoTiffSource(scene), 8, tmp_path / "chips", 0.2)
    chips = [e for e in events if e.stage == "chips"]
    assert (chips[0].done, chips[-1].done, chips[-1].total) == (0, 7, 7)
    events.clear()
    extract_chips(units, GeoTiffSource(scene), 8, tmp_path / "chips", 0.2)  # all cached
    assert [(e.done, e.total, e.detail) for e in events] == [(7, 7, "7 cached")]

    events.clear()
    spec = EmbeddingSpec(n_features=8, dtype="float32", pca_components=2, filters="whitened", pool_scales=[1.0])
    compute_embeddings(extraction.index, tmp_path / "chips", tmp_path / "emb", spec)
    assert [e.stage for e in events] == ["embeddings"] * len(events)
    assert (events[0].done, events[-1].done, events[-1].total) == (0, 7, 7)

    events.clear()
    rng = np.random.default_rng(3)
    n = 120
    emb = rng.standard_normal((n, 6))
    d = (rng.random(n) < 1 / (1 + np.exp(-emb[:, 0]))).astype(int)
    table = pd.DataFrame({"unit_id": [f"u{i}" for i in range(n)], "lat": 0.0, "lon": 0.0, "treatment": d,
                          "outcome": emb[:, 0] + d + rng.standard_normal(n)})
    table["embedding"] = list(emb)
    analysis = AnalysisSpec(folds=3, image_components=4, estimators=["difference_in_means", "ipw"],
                            feature_sets=["none", "image"])
    estimate_study(table, [], analysis, study_name="s", survey_version="a", embeddings_version="b")
    assert [(e.stage, e.done, e.total) for e in events] == [("estimation", i, 5) for i in range(6)]


# -- the command line -----------------------------------------------------------------------


class ReportingRunner:
    """Stands in for assets.runner: reports a stage's progress, then fails (the run's output is not
    what these tests look at)."""

    def __init__(self):
        self.options = []

    def run_study(self, study_path, workdir=None, **options):
        self.options.append(options)
        for done in range(4):
            progress.report("chips", done, 3, "chips")
        logging.getLogger("eocausal.imagery.chips").warning("a chip warning")
        logging.getLogger("eocausal.imagery.chips").info("a chip note")
        return types.SimpleNamespace(success=False, workdir=Path(study_path).parent, estimates=None, metadata={},
                                     errors=["stand-in"], failed_checks=[], log_path=None)


@pytest.fixture
def runner(monkeypatch):
    fake = ReportingRunner()
    module = types.ModuleType("assets.runner")
    module.run_study = fake.run_study
    monkeypatch.setitem(sys.modules, "assets.runner", module)
    return fake


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"eocausal {__version__}"
    assert __version__ != "0+unknown"  # the installed distribution's


def test_progress_only_on_a_terminal_and_never_under_json(tiny_study, runner, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)
    assert cli.main(["run", str(tiny_study)]) == 1
    err = capsys.readouterr().err
    assert "chips: 3/3 chips (100%)\n" in err
    assert cli.main(["run", str(tiny_study), "--json"]) == 1
    assert "3/3 chips" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: False)
    assert cli.main(["run", str(tiny_study)]) == 1
    assert "3/3 chips" not in capsys.readouterr().err


def test_log_level_before_or_after_the_command(tiny_study, runner, capsys):
    assert cli.main(["run", str(tiny_study)]) == 1
    err = capsys.readouterr().err
    assert "eocausal WARNING eocausal.imagery.chips: a chip warning" in err and "a chip note" not in err
    assert cli.main(["--log-level", "info", "run", str(tiny_study)]) == 1
    assert "eocausal INFO eocausal.imagery.chips: a chip note" in capsys.readouterr().err
    assert cli.main(["run", str(tiny_study), "--log-level", "ERROR"]) == 1
    assert "a chip warning" not in capsys.readouterr().err
    assert [o["log_level"] for o in runner.options] == ["WARNING", "INFO", "ERROR"]
    with pytest.raises(SystemExit):
        cli.main(["run", str(tiny_study), "--log-level", "LOUD"])
    assert "invalid choice" in capsys.readouterr().err


# -- Dagster's run logs ---------------------------------------------------------------------


def test_the_repository_dagster_yaml_is_the_instance_config_runs_get():
    from assets.instance import INSTANCE_CONFIG

    assert yaml.safe_load((REPO / "dagster.yaml").read_text()) == INSTANCE_CONFIG


def test_library_loggers_reach_the_run_logs_and_the_terminal_shows_them_once(tmp_path, capsys):
    from assets.instance import open_instance

    @dg.asset
    def logs_something() -> None:
        logging.getLogger("eocausal.imagery.chips").info("cached chip unreadable; reading it again")
        progress.report("chips", 0, 2, "chips")

    cli.configure_logging("INFO")  # what `eocausal run --log-level INFO` sets up
    with open_instance(tmp_path / "home") as instance:
        result = dg.materialize([logs_something], instance=instance)
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert "cached chip unreadable; reading it again" in messages
    assert "chips: 0/2 chips (0%)" in messages
    # inside the run, Dagster's console logger prints the record; the CLI's handler stays quiet
    assert "eocausal INFO eocausal.imagery.chips" not in capsys.readouterr().err
    cli.configure_logging("WARNING")
