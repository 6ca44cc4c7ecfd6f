"""A non-editable install of the project (`pip install .`) into a fresh venv imports and runs the demo.

The wheel must carry everything a run needs outside the source tree: the library, the Dagster
layer, the dbt project (dbt_project/, installed beside assets/) and the demo scene. To stay fast
and offline, the venv gets the project's dependencies from the test's own venv (a .pth line naming
its site-packages: plain path, so the editable install's finder there is not loaded) and the
project is installed with --no-deps --no-build-isolation; everything runs from a folder outside
the repository, so nothing can be imported from the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "eocausal", "assets", "sensors", "dbt_project"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "target", "logs", "dbt_packages", "*.egg-info")


def _run(args, cwd, env, timeout=900):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{args} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=IGNORE)
        else:
            shutil.copyfile(item, src / name)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, os.environ)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     root, os.environ).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DAGSTER_HOME")}
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-build-isolation", str(src)], root, env)
    # The console scripts a full install would bring along with dbt-core (assets/dbt.py runs the dbt
    # beside the interpreter).
    dbt = Path(sys.executable).with_name("dbt")
    text = dbt.read_text().split("\n", 1)[1]
    (venv / "bin" / "dbt").write_text(f"#!{python}\n{text}")
    (venv / "bin" / "dbt").chmod(0o755)
    shutil.rmtree(src)  # nothing may come from the source tree
    return {"root": root, "venv": venv, "python": python, "site": site, "env": env}


def test_the_wheel_holds_the_library_the_dagster_layer_and_the_dbt_project(installed):
    site = installed["site"]
    probe = _run([str(installed["python"]), "-c",
                  "import json, eocausal, assets.dbt, sensors; from importlib.metadata import entry_points;"
                  "print(json.dumps([eocausal.__file__, str(assets.dbt.DBT_PROJECT_DIR), eocausal.__version__,"
                  " [e.value for e in entry_points(group='eocausal.launchers')]]))"],
                 installed["root"], installed["env"])
    module, project_dir, version, launchers = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(site) and Path(project_dir) == site / "dbt_project"
    assert launchers == ["assets.launcher"]  # how `eocausal run` finds the Dagster layer (eocausal/launch.py)
    assert version == "0.1.0"
    for name in ("dbt_project.yml", "profiles.yml", "models/marts/_marts.yml", "models/marts/effect_estimates.sql",
                 "models/staging/_sources.yml", "macros/generate_schema_name.sql", "tests/generic/test_between.sql"):
        assert (site / "dbt_project" / name).is_file(), name
    assert any((site / "eocausal" / "data" / "demo").iterdir())


def test_the_installed_command_runs_the_demo(installed):
    work = installed["root"] / "demo"
    result = _run([str(installed["venv"] / "bin" / "eocausal"), "demo", "--workdir", str(work), "--n-units", "200",
                   "--json"], installed["root"], installed["env"], timeout=1500)
    rows = json.loads(result.stdout)
    assert rows and {r["feature_set"] for r in rows} == {"none", "tabular", "image", "tabular+image"}
    assert all(r["estimate"] is not None for r in rows)
    assert (work / "study" / "eocausal_work" / "published" / "warehouse.duckdb").is_file()
