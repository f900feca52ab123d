"""On a cluster (``KFP_HOST``): compile, upload a pipeline version, start a run, schedule.

Settings from the environment, read in ``main``: ``KFP_HOST`` (e.g. https://kubeflow.example.com/pipeline),
``KFP_NAMESPACE`` (default ``cellseg``, where the manifests put the volumes, the RBAC and the
runtime), ``KFP_TOKEN`` (a bearer token, never printed), ``IMAGE`` (the project image for every
step). Runs use the ``cellseg-pipeline`` service account, the one the RBAC is written for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellseg.data.source import read_dvc_pointer
from cellseg.settings import CLUSTER_PROFILE, IMAGE, NAMESPACE, PIPELINE_SERVICE_ACCOUNT
from pipelines.cellseg_pipeline import PIPELINE_NAME
from pipelines.compile import compile_pipeline

EXPERIMENT = "cellseg"
RECURRING_RUN = "cellseg-retrain"


class ScheduleError(ValueError):
    """A schedule KFP would not take (or would misread)."""


DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# a Go duration, as `@every` takes it (time.ParseDuration): 168h, 1h30m, 90s, 1.5h
GO_DURATION = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h)")


def check_cron(expression: str) -> str:
    """What KFP's scheduler (robfig/cron, seconds first) takes: six fields, a descriptor such as
    ``@weekly``, or ``@every <Go duration>``. A 5-field (Unix) cron is refused, not guessed: KFP
    would read its fields shifted by one (minutes as seconds)."""
    expression = expression.strip()
    if expression.startswith("@"):
        head, _, rest = expression.partition(" ")
        if head == "@every":
            duration = rest.strip()
            if duration and GO_DURATION.sub("", duration) == "":
                return expression
            raise ScheduleError(f"{expression!r}: @every takes a Go duration such as 168h or 1h30m")
        if head in DESCRIPTORS and not rest:
            return expression
        raise ScheduleError(
            f"{expression!r}: descriptors are {', '.join(DESCRIPTORS)} and '@every <duration>'"
        )
    fields = expression.split()
    if len(fields) == 5:
        raise ScheduleError(
            f"cron {expression!r} has 5 fields, but KFP expects 6 with seconds first: "
            f"did you mean '0 {expression}'?"
        )
    if len(fields) != 6:
        raise ScheduleError(
            f"cron {expression!r} must have 6 fields: second minute hour day month weekday"
        )
    return expression


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def pipeline_namespace(client, namespace: str) -> str | None:
    """Where the pipeline lives: the runs' namespace on a multi-user backend, None (shared, the
    only kind) on a standalone one. A shared pipeline on a multi-user backend is authorised
    against KFP's own namespace (2.17's CreatePipeline), where a profile's user has no rights,
    and refused where ``REQUIRE_NAMESPACE_FOR_PIPELINES`` is set."""
    return namespace if client.get_kfp_healthz().multi_user else None


def find_pipeline(client, namespace: str | None) -> str | None:
    """The id of the pipeline named :data:`PIPELINE_NAME` in ``namespace`` (None: shared)."""
    by_name = json.dumps(
        {
            "predicates": [
                {"operation": "EQUALS", "key": "display_name", "stringValue": PIPELINE_NAME}
            ]
        }
    )
    found = client.list_pipelines(filter=by_name, namespace=namespace).pipelines or []
    return found[0].pipeline_id if found else None


def upload_version(client, spec: Path, version_name: str, namespace: str) -> tuple[str, str]:
    """The pipeline (created on first upload, in :func:`pipeline_namespace`) and a new version
    of it; returns their ids."""
    home = pipeline_namespace(client, namespace)
    pipeline_id = find_pipeline(client, home)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(
            str(spec), pipeline_name=PIPELINE_NAME, namespace=home
        ).pipeline_id
    version = client.upload_pipeline_version(
        str(spec), pipeline_version_name=version_name, pipeline_id=pipeline_id
    )
    return pipeline_id, version.pipeline_version_id


def run_params(data_md5: str, image: str, profile: str, extra: dict | None = None) -> dict:
    """The pipeline's parameters, with the MLflow tags a local run carries too, so `make
    compare` groups cluster and local runs alike."""
    tags = {"cellseg.git_commit": git_commit(), "cellseg.image": image, "cellseg.profile": profile}
    if data_md5:
        tags["cellseg.data_md5"] = data_md5
    return {
        "data_md5": data_md5,
        "run_tags": tags,
        "image": image,
        "profile": profile,
        **(extra or {}),
    }


def data_params(data_repo: str, data_rev: str) -> dict:
    """The pipeline's data parameters when a data repository is named (else the volume)."""
    if data_rev and not data_repo:
        raise ScheduleError("--data-rev needs --data-repo (DATA_REPO=...)")
    return {"data_repo": data_repo, "data_rev": data_rev} if data_repo else {}


def submit_run(
    client, host: str, spec: Path, version_name: str, params: dict, namespace: str
) -> str:
    """Upload, run in the ``cellseg`` experiment; returns the run's URL."""
    pipeline_id, version_id = upload_version(client, spec, version_name, namespace)
    experiment = client.create_experiment(EXPERIMENT, namespace=namespace)  # gets if it exists
    run = client.run_pipeline(
        experiment_id=experiment.experiment_id,
        job_name=f"{PIPELINE_NAME} {version_name}",
        pipeline_id=pipeline_id,
        version_id=version_id,
        params=params,
        service_account=PIPELINE_SERVICE_ACCOUNT,
    )
    return f"{host.rstrip('/')}/#/runs/details/{run.run_id}"


def recurring_runs(client, experiment_id: str) -> list:
    found = client.list_recurring_runs(experiment_id=experiment_id, page_size=100)
    return [r for r in (found.recurring_runs or []) if r.display_name == RECURRING_RUN]


def schedule(client, spec: Path, version_name: str, cron: str, params: dict, namespace: str) -> str:
    """Create the retraining run, then remove the ones it replaces (never duplicate, and a
    failed create leaves the old schedule running); returns the new run's id."""
    check_cron(cron)
    pipeline_id, version_id = upload_version(client, spec, version_name, namespace)
    experiment = client.create_experiment(EXPERIMENT, namespace=namespace)
    old = recurring_runs(client, experiment.experiment_id)
    job = client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=RECURRING_RUN,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        pipeline_id=pipeline_id,
        version_id=version_id,
        params=params,
        enabled=True,
        service_account=PIPELINE_SERVICE_ACCOUNT,
    )
    for run in old:
        if run.recurring_run_id != job.recurring_run_id:
            client.delete_recurring_run(run.recurring_run_id)
    return job.recurring_run_id


def existing_experiment(client, namespace: str):
    """The ``cellseg`` experiment, or None: looked up, never created."""
    try:
        return client.get_experiment(experiment_name=EXPERIMENT, namespace=namespace)
    except ValueError as err:  # kfp.Client's answer when no experiment has the name
        if "No experiment is found" in str(err):
            return None
        raise


def unschedule(client, namespace: str) -> int:
    """Remove the retraining runs; with no experiment (nothing was ever scheduled) nothing is
    created or touched."""
    experiment = existing_experiment(client, namespace)
    if experiment is None:
        return 0
    runs = recurring_runs(client, experiment.experiment_id)
    for run in runs:
        client.delete_recurring_run(run.recurring_run_id)
    return len(runs)


def make_client(host: str, namespace: str, token: str | None):
    import kfp

    return kfp.Client(host=host, namespace=namespace, existing_token=token or None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Submit or schedule the pipeline on KFP_HOST")
    parser.add_argument("action", choices=("run", "schedule", "unschedule"))
    parser.add_argument(
        "--cron", default="", help='6 fields, seconds first ("0 0 3 * * 1"), @weekly, @every 168h'
    )
    parser.add_argument("--profile", default=CLUSTER_PROFILE)
    parser.add_argument("--data-repo", default="", help="a DVC data repository (git URL)")
    parser.add_argument("--data-rev", default="", help="its branch, tag or commit to train on")
    args = parser.parse_args(argv)
    try:
        data = data_params(args.data_repo, args.data_rev)
        if args.action == "schedule":
            check_cron(args.cron)
        host = os.environ.get("KFP_HOST")
        if not host:
            raise ScheduleError("KFP_HOST is not set (e.g. https://kubeflow.example.com/pipeline)")
    except ScheduleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    namespace = os.environ.get("KFP_NAMESPACE", NAMESPACE)
    image = os.environ.get("IMAGE", IMAGE)
    client = make_client(host, namespace, os.environ.get("KFP_TOKEN"))
    version_name = f"{git_commit()}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        spec = compile_pipeline(Path(tmp) / "cellseg_pipeline.yaml", image)
        if args.action == "run":
            # the data this checkout pins, unless a data repository says which
            pinned = "" if args.data_repo else read_dvc_pointer(Path("data.dvc")).md5
            params = run_params(pinned, image, args.profile, data)
            print(f"run: {submit_run(client, host, spec, version_name, params, namespace)}")
        elif args.action == "schedule":
            # data_md5 "": a data_rev branch as it is then, or the volume at `source`
            params = run_params("", image, args.profile, data)
            job = schedule(client, spec, version_name, args.cron, params, namespace)
            print(f"scheduled {RECURRING_RUN} ({args.cron}): {job}")
        else:
            print(f"removed {unschedule(client, namespace)} recurring run(s) named {RECURRING_RUN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
