"""Imports go one way (DESIGN §3): the Dagster layer imports the library, never the reverse, and
importing the command line module changes no environment variable."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import eocausal
from eocausal.launch import ENTRY_POINT_GROUP, find_launcher

REPO = Path(__file__).resolve().parents[1]
LAYER = ("assets", "sensors", "dagster", "dagster_dbt", "dagster_webserver", "dagster_graphql")

IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import eocausal
before = dict(os.environ)
import eocausal.cli
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
names = sorted(m.name for m in pkgutil.walk_packages(eocausal.__path__, "eocausal."))
for name in names:
    importlib.import_module(name)
layer = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"modules": names, "layer": layer, "environ": changed}))
""" % (LAYER,)


def test_importing_every_library_module_imports_no_dagster_layer():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"eocausal.cli", "eocausal.launch", "eocausal.estimate.effects", "eocausal.imagery.chips"} <= set(
        found["modules"])
    assert found["layer"] == []
    assert found["environ"] == []  # eocausal.cli sets its offline defaults in main(), not on import


def test_no_library_source_names_the_dagster_layer():
    offenders = []
    for path in Path(eocausal.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in LAYER]
    assert offenders == []


def test_the_command_line_finds_the_dagster_layer_by_its_entry_point():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert declared == {"dagster": "assets.launcher"}
    launcher = find_launcher()
    assert launcher.__name__ == "assets.launcher"
    assert callable(launcher.run_study) and callable(launcher.generate_docs)
