"""The code location of the Postgres deployment test (tests/packaging/test_postgres_backfill.py).

`dagster-daemon` (and its code server, and every run worker) load :data:`defs`: the studies named
in ``EOCAUSAL_DEPLOYMENT_STUDIES`` (a JSON list of ``[study file, working folder]``), each built as
the deployment's `StudyComponent` builds it (assets/studies.py `study_definitions`), with the
deployment's one `study` and one `warehouse` resource (`with_resources`): the same graph, job
and tags as `dagster dev` on assets/defs/, without the catalog.

``python -m tests.packaging.postgres_deployment backfill WORKSPACE JOB PARTITIONS [ASSET_KEY ...]``
adds a backfill of the job's partitions, restricted to the given assets (``study/image_chips``
style keys), to the instance in ``$DAGSTER_HOME``, as the UI's "backfill selected assets" does;
the daemon's backfill loop then creates its runs (one per partition) and its run queue starts them.
`dagster job backfill` has no asset selection: it runs the whole job for each partition.
"""

from __future__ import annotations

import json
import os
import sys

import dagster as dg

from assets.studies import StudyEntry, study_definitions, study_name, with_resources

STUDIES_ENV = "EOCAUSAL_DEPLOYMENT_STUDIES"


def load() -> dg.Definitions:
    pairs = json.loads(os.environ.get(STUDIES_ENV) or "[]")
    entries = [StudyEntry(study_name(path), path, workdir) for path, workdir in pairs]
    return with_resources(dg.Definitions.merge(*(study_definitions(e) for e in entries)))


@dg.definitions
def defs() -> dg.Definitions:
    return load()


def add_backfill(workspace_file: str, job: str, partitions: list[str], asset_keys: list[str]) -> str:
    """Add a REQUESTED backfill of ``job`` over ``partitions`` (only ``asset_keys`` when given); its id."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster._time import get_current_timestamp

    with dg.DagsterInstance.get() as instance, \
            WorkspaceProcessContext(instance, WorkspaceFileTarget([workspace_file])) as process_context:
        context = process_context.create_request_context()
        for entry in context.get_code_location_entries().values():
            if entry.load_error is not None:
                raise RuntimeError(f"code location {entry.origin.location_name} failed to load: {entry.load_error}")
        for location in (e.code_location for e in context.get_code_location_entries().values()):
            for repo in location.get_repositories().values():
                partition_set = next((ps for ps in repo.get_partition_sets() if ps.job_name == job), None)
                if partition_set is None:
                    continue
                backfill = PartitionBackfill(
                    backfill_id=make_new_backfill_id(),
                    partition_set_origin=partition_set.get_remote_origin(),
                    status=BulkActionStatus.REQUESTED,
                    partition_names=partitions,
                    from_failure=False,
                    reexecution_steps=None,
                    tags={},
                    backfill_timestamp=get_current_timestamp(),
                    asset_selection=[dg.AssetKey.from_user_string(k) for k in asset_keys] or None,
                )
                instance.add_backfill(backfill)
                return backfill.backfill_id
    raise RuntimeError(f"no partitioned job {job!r} in {workspace_file}")


if __name__ == "__main__":
    command, workspace, job, parts, *keys = sys.argv[1:]
    assert command == "backfill", command
    print(f"backfill-id: {add_backfill(workspace, job, parts.split(','), keys)}", flush=True)
