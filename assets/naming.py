"""Names per study in a deployment of many: asset-key prefixes, op/job/schedule/sensor names, and which
study a run belongs to.

Every study's assets are keyed under the study's name (``[study, "survey"]``,
``[study, "marts", "analysis_units"]``, ...). Op, job, schedule and sensor names must match
``^[A-Za-z0-9_]+$``, so they carry the *sanitised* name (``my--study.v2`` -> ``my__study_v2``),
joined to the stage's name by ``__``: ``my__study_v2__study_job``.

The deployment has one `study` and one `warehouse` resource (assets/resources.py), holding every
study's file and working folder; each run resolves its study once, from the run (:func:`run_study_name`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

import dagster as dg

# The tag every run of a study's job carries (schedules, sensors and backfills of the job too).
STUDY_TAG = "eocausal/study"
# The tag of a study's tile runs (its tiles job): they share the working folder with each other,
# so they stay outside the one-run-per-study cap that counts STUDY_TAG.
TILE_STUDY_TAG = "eocausal/tiles_of"
SEPARATOR = "__"

STUDY_JOB = "study_job"  # a study's job: <safe study>__study_job


def safe_name(study: str) -> str:
    """The study name with every character outside ``[A-Za-z0-9_]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", study)


def scoped(study: str | None, name: str) -> str:
    """A Dagster name (op, job, schedule, sensor) unique to the study: ``<safe study>__<name>``
    (the name itself for None: the pieces tests build without a study)."""
    return f"{safe_name(study)}{SEPARATOR}{name}" if study else name


def unscoped(study: str, name: str) -> str:
    """The stage's name of a scoped name (a step key, an op name): ``<safe study>__image_chips`` -> ``image_chips``."""
    return name.removeprefix(f"{safe_name(study)}{SEPARATOR}")


def study_key(study: str, *path: str) -> dg.AssetKey:
    """The study's asset key for a stage's key path: ``study_key("demo", "marts", "analysis_units")``."""
    return dg.AssetKey([study, *path])


def unprefixed(study: str, key: dg.AssetKey) -> dg.AssetKey:
    """The stage's key of one of the study's asset keys (``[study, "survey"]`` -> ``["survey"]``)."""
    return dg.AssetKey(key.path[1:]) if len(key.path) > 1 and key.path[0] == study else key


def check_unique_names(studies: Iterable[str]) -> None:
    """Two studies of one deployment must differ in name and in sanitised name (their ops' and jobs')."""
    seen: dict[str, str] = {}
    for study in studies:
        other = seen.get(safe_name(study))
        if other is not None:
            raise ValueError(
                f"two studies in this deployment are named {other!r} and {study!r}, which give the same Dagster "
                f"names ({scoped(study, STUDY_JOB)}, ...): rename one of them (`name` in its study.yaml)")
        seen[safe_name(study)] = study


def run_study_name(run: dg.DagsterRun | None, studies: Collection[str]) -> str:
    """The study a run belongs to: its ``eocausal/study`` tag (every study job's runs) or
    ``eocausal/tiles_of`` tag (its tiles job's), else the prefix of the assets and checks it
    selected (a UI "Materialize" run of the global asset job),
    else the deployment's only study. A run that selects two studies' assets fails here, naming them."""
    known = sorted(studies)
    if run is not None:
        tag = STUDY_TAG if STUDY_TAG in run.tags else TILE_STUDY_TAG
        tagged = run.tags.get(tag)
        if tagged is not None:
            if tagged not in studies:
                raise dg.Failure(description=f"run tagged {tag}={tagged!r}, a study this deployment does "
                                             f"not hold (it holds {known})")
            return tagged
        keys = [*(run.asset_selection or ()), *(c.asset_key for c in run.asset_check_selection or ())]
        prefixes = sorted({k.path[0] for k in keys if len(k.path) > 1 and k.path[0] in studies})
        if len(prefixes) > 1:
            raise dg.Failure(description=f"this run selects assets of {len(prefixes)} studies ({', '.join(prefixes)}): "
                                         "a run materialises one study's assets; launch one run per study")
        if prefixes:
            return prefixes[0]
    if len(known) == 1:
        return known[0]
    raise dg.Failure(description=f"cannot tell which study this run is for (no {STUDY_TAG} tag and no study's "
                                 f"assets selected); this deployment holds {known}: run a study's job")
