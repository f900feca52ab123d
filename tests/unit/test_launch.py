"""Training-job manifests of both engines against the real CRD schemas (PyTorchJob from
training-operator 1.9, TrainJob from kubeflow/trainer v2.3.0) and the operator's admission
rules. Submitting and waiting run against a real API server: tests/cluster/."""

import subprocess
import sys

import jsonschema
import pytest
import yaml

from cellseg.cluster.jobs import (
    QUEUE_LABEL,
    JobSpec,
    build_pytorchjob,
    build_trainjob,
    job_key,
    job_name,
)
from cellseg.settings import TrainingJobSettings
from tests.crds import crd


def job_spec(name="j", train_args=(), **job) -> JobSpec:
    """A JobSpec whose job settings are ``job`` (TrainingJobSettings fields)."""
    return JobSpec(name=name, train_args=tuple(train_args), job=TrainingJobSettings(**job))


def load_schema(name: str, version: str) -> dict:
    document = yaml.safe_load(crd(name).read_text())  # CELLSEG_CRDS or `make crds`' cache
    (v,) = [v for v in document["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def crd_schema():
    return load_schema("kubeflow.org_pytorchjobs.yaml", "v1")


@pytest.fixture(scope="module")
def trainjob_schema():
    return load_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")


def unknown_fields(value, schema, path="") -> list[str]:
    """Fields the API server would silently prune (not in the schema)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if props is not None and key in props:
                found += unknown_fields(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(sub, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def admission_errors(job: dict) -> list[str]:
    """The training operator's webhook rules for PyTorchJobs."""
    errors = []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    if replicas.get("Master", {}).get("replicas") != 1:
        errors.append("exactly one Master replica")
    for role, spec in replicas.items():
        containers = spec["template"]["spec"]["containers"]
        if not any(c["name"] == "pytorch" for c in containers):
            errors.append(f"{role}: no container named pytorch")
        if not all(c.get("image") for c in containers):
            errors.append(f"{role}: a container without an image")
    return errors


SHAPES = {
    "one node": dict(num_nodes=1, gpus_per_node=1),
    "three nodes with tolerations": dict(
        num_nodes=3,
        gpus_per_node=8,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
    "two nodes without tolerations": dict(
        num_nodes=2, gpus_per_node=4, node_selector={}, tolerations=()
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_job_shape_validates_against_the_crd_and_the_webhook_rules(crd_schema, shape):
    spec = job_spec("cellseg-x-phase1", ("--phase", "1"), image="reg/cellseg:abc", **SHAPES[shape])
    job = build_pytorchjob(spec)
    jsonschema.Draft7Validator(crd_schema).validate(job)
    assert unknown_fields(job, crd_schema) == []
    assert admission_errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas.get("Worker", {}).get("replicas", 0) == spec.job.num_nodes - 1
    assert job["spec"]["nprocPerNode"] == str(spec.job.gpus_per_node)
    pod = replicas["Master"]["template"]["spec"]
    gpus = pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == str(spec.job.gpus_per_node)
    assert pod["nodeSelector"] == spec.job.node_selector
    assert pod["tolerations"] == list(spec.job.tolerations)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cellseg-hf-token"  # a Secret
    assert set(job["spec"]["runPolicy"]) >= {
        "cleanPodPolicy", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished",
    }  # fmt: skip


def test_job_names_are_distinct_per_run_and_phase_and_dns_safe():
    names = {job_name(r, p) for r in ("Run_1", "run-2", "8f14e45f-ceea") for p in (1, 2)}
    assert len(names) == 6
    assert all(len(n) <= 63 and n.replace("-", "").isalnum() and n.islower() for n in names)


def test_launch_dry_run_prints_a_reviewable_manifest(crd_schema):
    result = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "launch", "--dry-run", "--num-nodes", "2",
         "--gpus-per-node", "4", "--toleration", "nvidia.com/gpu", "--node-selector", "pool=h100"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    jsonschema.Draft7Validator(crd_schema).validate(job)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelector"] == {
        "pool": "h100"
    }


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_trainjob_shape_validates_against_the_trainer_v2_crd(trainjob_schema, shape):
    spec = job_spec(
        "cellseg-x-phase1", ("--phase", "1"), image="reg/cellseg:abc", queue_name="gpu-queue",
        train_timeout_hours=2, **SHAPES[shape],
    )  # fmt: skip
    job = build_trainjob(spec)
    jsonschema.Draft7Validator(trainjob_schema).validate(job)
    assert unknown_fields(job, trainjob_schema) == []
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == spec.job.num_nodes and "numProcPerNode" not in trainer  # GPUs
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(spec.job.gpus_per_node)
    assert trainer["command"][:4] == ["torchrun", "-m", "cellseg.cli", "train"]
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "cellseg-torch",
    }  # fmt: skip
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == spec.job.node_selector
    assert pod["tolerations"] == list(spec.job.tolerations)
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue" and job["spec"]["suspend"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cellseg-hf-token"


def test_launch_dry_run_prints_a_trainjob_that_validates(trainjob_schema):
    result = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "launch", "--dry-run",
         "--training-engine", "trainjob", "--num-nodes", "2", "--gpus-per-node", "4",
         "--queue-name", "team-a", "--train-timeout-hours", "3"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    jsonschema.Draft7Validator(trainjob_schema).validate(job)
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 3 * 3600
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"


def test_the_deadline_follows_the_timeout_and_kueue_suspends_a_queued_pytorchjob():
    spec = job_spec(image="i", train_timeout_hours=1.5, queue_name="q")
    job = build_pytorchjob(spec)
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 5400
    assert job["spec"]["runPolicy"]["suspend"] and job["metadata"]["labels"][QUEUE_LABEL] == "q"
    plain = build_pytorchjob(job_spec(image="i"))
    assert "suspend" not in plain["spec"]["runPolicy"]
    assert QUEUE_LABEL not in plain["metadata"]["labels"]


def test_a_retry_has_the_same_job_key_and_another_image_does_not():
    spec = job_spec("j", ("--phase", "1", "--mlflow-run", "a"), image="i:1")
    retry = job_spec("j", ("--phase", "1", "--mlflow-run", "b"), image="i:1")
    other = job_spec("j", ("--phase", "1", "--mlflow-run", "a"), image="i:2")
    assert job_key(spec) == job_key(retry) != job_key(other)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(
    "build", [build_pytorchjob, build_trainjob], ids=["pytorchjob", "trainjob"]
)
def test_every_training_pod_stays_out_of_the_mesh_with_a_seccomp_profile(build, shape):
    """A sidecar keeps a finished trainer pod running, and Pod Security "restricted" refuses a
    pod without a seccomp profile: every pod template of every job shape is checked."""
    from tests.pods import mesh_and_seccomp_problems, pod_templates

    job = build(job_spec(image="i:1", **SHAPES[shape]))
    templates = list(pod_templates(job))
    nodes = SHAPES[shape]["num_nodes"]
    assert len(templates) == (1 if build is build_trainjob else min(nodes, 2))
    assert mesh_and_seccomp_problems(job) == []


def test_launch_without_placement_flags_targets_the_gpu_nodes_as_the_pipeline_does():
    from cellseg import settings

    result = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "launch", "--dry-run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pod = yaml.safe_load(result.stdout)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == settings.GPU_NODE_SELECTOR
    assert pod["tolerations"] == list(settings.GPU_TOLERATIONS)
