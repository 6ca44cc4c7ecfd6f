"""The process killed (SIGKILL) inside each stage of a refresh, then run again.

One working folder goes through the crashes in turn — chips half cached, embeddings cached but not
in the lake, dbt mid-build (analysis models), estimates computed but not written, dbt mid-build
(the append-only history), the published copy made but not swapped in — each run resuming from
what the previous crash left. After every crash the published warehouse is byte-for-byte what it
was, and the private warehouse holds only complete versions. The last run, uninterrupted, must
end with the same warehouse as a refresh that never crashed; a reader process queries the
published copy throughout.
"""

from __future__ import annotations

import json

import pytest

from eocausal.imagery.chips import stored_chip_keys
from tests.faults import support

pytestmark = pytest.mark.slow

CRASHES = [
    ("chips.gathered@20", "chips: 20 of 40 new chips gathered, their part not yet written"),
    ("embeddings.computed", "embeddings: cached, lake not yet written"),
    ("dbt.dbt_analysis_models", "dbt: analysis models mid-build"),
    ("estimates.computed", "estimates: computed, not yet written"),
    ("dbt.dbt_estimate_models", "dbt: estimates history mid-build"),
    ("publish.copied", "publish: copy made, not yet swapped in"),
]


def _chip_files(workdir):
    return sorted(stored_chip_keys(workdir / "cache" / "chips"))


@pytest.fixture(scope="module")
def chain(ops, tmp_path_factory):
    from assets.runner import run_study

    study_path, workdir = support.scenario(ops, "crash_chain", wave=2)
    published = workdir / "published" / "warehouse.duckdb"
    published_sha = support.file_sha256(published)
    chips_before = len(_chip_files(workdir))
    reader = support.Reader(ops, published, "crash_chain")
    observations = []
    try:
        for i, (point, label) in enumerate(CRASHES):
            crash = support.run_until_crash(ops, study_path, workdir, point, f"crash_{i}")
            crash.update(
                label=label,
                published_unchanged=support.file_sha256(published) == published_sha,
                private_versions=support.version_counts(workdir / "warehouse.duckdb")
                if (workdir / "warehouse.duckdb").exists() else {},
                new_chips=len(_chip_files(workdir)) - chips_before,
                lake_estimate_files=sorted(p.name for p in (workdir / "lake" / "effect_estimates").glob("*.parquet")),
                publish_leftovers=sorted(p.name for p in published.parent.glob(".publish.*")),
            )
            observations.append(crash)
        with support.environment(ops.secrets):
            final = run_study(study_path, workdir)
        reader.wait_until_seen(2)
    finally:
        reads = reader.stop()
    (ops.logs / "crash_chain.json").write_text(json.dumps(observations, indent=2, default=str))
    return {"observations": observations, "final": final, "reads": reads, "workdir": workdir,
            "published": published, "chips_before": chips_before}


def test_every_crash_was_a_real_kill_inside_its_stage(chain):
    for obs in chain["observations"]:
        assert obs["returncode"] == -9, obs
        assert not obs["survivors"], f"{obs['label']}: a process of the killed run survived"


def test_published_warehouse_untouched_by_every_crash(chain):
    for obs in chain["observations"]:
        assert obs["published_unchanged"], obs["label"]


def test_private_warehouse_holds_only_complete_versions_after_every_crash(chain):
    for obs in chain["observations"]:
        assert obs["private_versions"], obs["label"]
        assert set(obs["private_versions"].values()) == {support.ROWS_PER_VERSION}, obs


def test_crashes_keep_finished_work_and_lose_unfinished_work(chain):
    obs = {o["point"]: o for o in chain["observations"]}
    # the kill loses at most the part being gathered (all 40 new chips fit one part: 0 stored,
    # no partial part under its name); the next run stores them all
    assert obs["chips.gathered@20"]["new_chips"] == 0
    assert obs["embeddings.computed"]["new_chips"] == support.N_NEW_UNITS
    # estimates killed before their write leave no file; the next run writes one
    assert len(obs["estimates.computed"]["lake_estimate_files"]) == 1
    assert len(obs["dbt.dbt_estimate_models"]["lake_estimate_files"]) == 2
    # the killed publish left its copy behind
    assert obs["publish.copied"]["publish_leftovers"]


def test_rerun_ends_with_the_same_warehouse_as_an_uninterrupted_refresh(chain, reference):
    final = chain["final"]
    assert final.success, final.errors + final.failed_checks
    support.assert_same_warehouse(chain["published"], reference["workdir"] / "published" / "warehouse.duckdb")
    support.assert_same_warehouse(chain["workdir"] / "warehouse.duckdb", reference["workdir"] / "warehouse.duckdb")
    # work finished before the crashes was not done again
    assert final.metadata["image_chips"]["n_chips_extracted"] == 0
    assert final.metadata["image_embeddings"]["from_cache"] is True


def test_no_duplicates_no_partial_rows_no_leftovers(chain):
    published = chain["published"]
    counts = support.version_counts(published)
    assert len(counts) == 2 and set(counts.values()) == {support.ROWS_PER_VERSION}
    keys = support.estimate_history(published)[["study", "estimate_version", "estimand", "estimator", "feature_set"]]
    assert not keys.duplicated().any()
    # the dead publisher's copy was cleared by the next publish; the lake has no temp files
    assert [p.name for p in published.parent.iterdir()] == ["warehouse.duckdb"]
    assert not [p for p in (chain["workdir"] / "lake").rglob("*") if p.name.startswith(".")]


def test_reader_saw_no_error_and_only_complete_versions_during_the_crashes(chain):
    reads = chain["reads"]
    assert reads["reads"] > 0 and reads["errors"] == []
    for shape in reads["shapes"]:
        version, n_rows, n_keys = shape.split(":")
        assert int(n_rows) == int(n_keys) == support.ROWS_PER_VERSION, shape
    # first only the baseline's version, then (after the final publish) both
    assert len(reads["sequence"][0]) == 1 and len(reads["sequence"][-1]) == 2
