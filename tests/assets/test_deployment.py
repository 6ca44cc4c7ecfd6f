"""Two studies in one deployment, run as the UI runs them: one `study` and one `warehouse` resource
for both, each run resolved to its study (its job's tag, or the assets it selected), each study's
files in its own working folder; a run that spans both studies fails and says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.components import StudyComponent
from assets.naming import STUDY_TAG
from assets.studies import StudyEntry, study_definitions, study_job_name, with_resources


def _copy(tiny_study: Path, root: Path, name: str) -> StudyEntry:
    folder = root / name
    shutil.copytree(tiny_study.parent, folder, ignore=shutil.ignore_patterns("eocausal_work", "landing"))
    doc = yaml.safe_load((folder / "study.yaml").read_text())
    doc["name"] = name
    (folder / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return StudyEntry(name, str(folder / "study.yaml"), str(folder / "work"))


@pytest.fixture
def two_studies(tiny_study, tmp_path):
    first, second = _copy(tiny_study, tmp_path, "first"), _copy(tiny_study, tmp_path, "second.v2")
    defs = with_resources(dg.Definitions.merge(study_definitions(first), study_definitions(second)))
    return defs, first, second


def _survey_lake(entry: StudyEntry) -> Path:
    return Path(entry.workdir) / "lake" / "survey.parquet"


def test_a_ui_materialisation_runs_in_the_selected_studys_folder(two_studies):
    defs, first, second = two_studies
    assert study_job_name(second.name) == "second_v2__study_job"
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        # "Materialize" on second.v2/survey in the UI: the global asset job, no study tag
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey([second.name, "survey"])],
                                        raise_on_error=False)
        assert result.success
        assert _survey_lake(second).is_file() and not _survey_lake(first).exists()
        # the study's own job carries its tag (schedules, sensors and backfills of the job too)
        run = defs.resolve_job_def(study_job_name(first.name)).execute_in_process(
            instance=instance, partition_key="geotiff", asset_selection=[dg.AssetKey([first.name, "survey"])])
        assert run.success and run.dagster_run.tags[STUDY_TAG] == first.name
        assert _survey_lake(first).is_file()

        both = [dg.AssetKey([first.name, "survey"]), dg.AssetKey([second.name, "survey"])]
        spanning = job.execute_in_process(instance=instance, asset_selection=both, raise_on_error=False)
        assert not spanning.success
        failure = next(e for e in spanning.all_events if e.is_failure)
        assert "selects assets of 2 studies (first, second.v2)" in str(failure.event_specific_data.error)


def test_two_studies_with_the_same_dagster_names_are_refused(tiny_study, tmp_path):
    a, b = _copy(tiny_study, tmp_path, "my-study"), _copy(tiny_study, tmp_path, "my.study")
    with pytest.raises(ValueError, match="'my-study' and 'my.study'.*my_study__study_job"):
        with_resources(dg.Definitions.merge(study_definitions(a), study_definitions(b)))


def test_a_study_component_is_a_defs_yaml(tiny_study, tmp_path):
    """A study declared as a component (defs.yaml attributes): the working folder by default beside
    the study file, the name from the study file."""
    entry = _copy(tiny_study, tmp_path, "declared")
    context = dg.ComponentTree.for_test().load_context
    component = StudyComponent(study=entry.study_path)
    defs = component.build_defs(context)
    # (no resources: the deployment binds them, for all its studies, in assets/definitions.py)
    assert {k.path[0] for a in defs.assets for k in a.keys} == {"declared"}
    meta = defs.metadata["eocausal/study/declared"].data
    assert meta == {"study": entry.study_path, "workdir": str(Path(entry.study_path).parent / "eocausal_work")}


def test_the_catalog_holds_every_published_study_and_follows_study_runs(two_studies, tmp_path, monkeypatch):
    from assets.catalog import CATALOG_JOB, CATALOG_SENSOR
    from assets.definitions import with_catalog
    from tests.catalog_support import published

    defs, first, second = two_studies
    monkeypatch.setenv("EOCAUSAL_CATALOG", str(tmp_path / "catalog" / "catalog.duckdb"))
    deployment = with_catalog(defs, tmp_path)
    published(Path(first.workdir) / "published" / "warehouse.duckdb", first.name, "v1", 3, "cov_a")
    with dg.instance_for_test() as instance:
        assert deployment.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance).success
        from eocausal.warehouse import query

        studies = query(tmp_path / "catalog" / "catalog.duckdb",
                        "select study, published_at is not null as published from marts.studies order by study")
        assert studies.values.tolist() == [[first.name, True], [second.name, False]]
        # A successful study run requests the catalog job.
        run = deployment.resolve_job_def(study_job_name(second.name)).execute_in_process(
            instance=instance, partition_key="geotiff", asset_selection=[dg.AssetKey([second.name, "survey"])])
        sensor = deployment.resolve_sensor_def(CATALOG_SENSOR)
        [record] = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS).records
        context = dg.build_run_status_sensor_context(
            sensor_name=CATALOG_SENSOR, dagster_instance=instance, dagster_run=run.dagster_run,
            dagster_event=record.event_log_entry.dagster_event)
        request = sensor(context)
        assert request.run_key == f"catalog:{run.run_id}"


def test_a_broken_study_file_leaves_the_other_studies_running(tiny_study, tmp_path):
    """A defs.yaml whose study file breaks the contract: that study becomes one asset that names the
    rule (and fails naming it), the other studies load with their jobs and resources."""
    good = _copy(tiny_study, tmp_path, "good")
    bad = _copy(tiny_study, tmp_path, "bad")
    doc = yaml.safe_load(Path(bad.study_path).read_text())
    doc["analysis"]["folds"] = "many"
    Path(bad.study_path).write_text(yaml.safe_dump(doc, sort_keys=False))
    context = dg.ComponentTree.for_test().load_context
    broken = StudyComponent(study=bad.study_path, name="bad-study").build_defs(context)
    assert [k for a in broken.assets for k in a.keys] == [dg.AssetKey(["bad_study", "study_file"])]
    [asset] = broken.assets
    assert "does not follow the study contract" in asset.specs_by_key[dg.AssetKey(["bad_study", "study_file"])].description
    assert "folds" in asset.specs_by_key[dg.AssetKey(["bad_study", "study_file"])].description
    defs = with_resources(dg.Definitions.merge(StudyComponent(study=good.study_path).build_defs(context), broken))
    assert defs.resolve_job_def(study_job_name("good"))
    result = dg.materialize([asset], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "folds" in str(failure.event_specific_data.error)
