"""The committed compiled pipeline: fresh, valid against the KFP protos, GPU settings right."""

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from cellseg import settings
from cellseg.data.manifest import FORMAT as DATASET_FORMAT
from pipelines.compile import DEFAULT_OUTPUT, compile_pipeline


@pytest.fixture(scope="module")
def committed():
    docs = list(yaml.safe_load_all(DEFAULT_OUTPUT.read_text()))
    assert len(docs) == 2, "expected the PipelineSpec and the Kubernetes platform spec"
    return docs


def test_committed_yaml_is_what_make_compile_writes(tmp_path):
    fresh = compile_pipeline(tmp_path / "fresh.yaml")
    assert fresh.read_text() == DEFAULT_OUTPUT.read_text(), "stale: run `make compile` and commit"


def test_both_documents_parse_into_the_kfp_protos(committed):
    pipeline, platform = committed
    json_format.ParseDict(pipeline, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    for config in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig())


def body(committed) -> dict:
    """The tasks inside the exit handler: every step but finish-run."""
    pipeline = committed[0]
    (handler,) = [t for t in pipeline["root"]["dag"]["tasks"].values() if "componentRef" in t
                  and t["componentRef"]["name"].startswith("comp-exit-handler")]  # fmt: skip
    return pipeline["components"][handler["componentRef"]["name"]]["dag"]["tasks"]


def channel(name: str) -> str:
    """A pipeline parameter as a task inside the exit handler's DAG sees it."""
    return f"pipelinechannel--{name}"


def executors(committed):
    pipeline, platform = committed
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return pipeline["deploymentSpec"]["executors"], k8s


# training GPUs belong to the PyTorchJobs, not to KFP pods; both inference steps get one GPU
GPU_EXECUTORS = {"exec-tune", "exec-evaluate", "exec-score-champion"}
TRAINING_TASKS = {"train": 1, "train-2": 2}  # DAG task -> phase


def test_gpu_steps_carry_accelerator_selector_and_toleration(committed):
    containers, k8s = executors(committed)
    for step in (name.removeprefix("exec-") for name in GPU_EXECUTORS):
        resources = containers[f"exec-{step}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", step
        # one model on one device: gpus_per_node GPUs would sit idle on an 8-GPU node
        assert resources["accelerator"]["resourceCount"] == str(settings.INFERENCE_GPUS) == "1"
        config = k8s[f"exec-{step}"]
        assert config["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == channel(
            "node_selector"
        )
        assert config["tolerations"][0]["tolerationJson"]["componentInputParameter"] == channel(
            "tolerations"
        )


def test_every_other_step_asks_for_no_gpu_but_for_cpu_and_memory(committed):
    containers, k8s = executors(committed)
    cpu = sorted(set(containers) - GPU_EXECUTORS)
    assert len(cpu) == len(containers) - len(GPU_EXECUTORS) == 8, cpu
    for step in (name.removeprefix("exec-") for name in cpu):
        resources = containers[f"exec-{step}"]["container"]["resources"]
        assert "accelerator" not in resources, step
        assert resources["cpuRequest"] > 0 and resources["memoryRequest"] > 0, step
        assert "nodeSelector" not in k8s.get(f"exec-{step}", {}), step
        assert "tolerations" not in k8s.get(f"exec-{step}", {}), step


def test_training_steps_pass_gpu_placement_to_their_pytorchjobs(committed):
    _, k8s = executors(committed)
    tasks = body(committed)
    for step, phase in TRAINING_TASKS.items():
        params = tasks[step]["inputs"]["parameters"]
        assert params["phase"]["runtimeValue"]["constant"] == phase
        assert tasks[step]["taskInfo"]["name"] == f"train-phase{phase}"
        names = (
            "node_selector",
            "tolerations",
            "gpus_per_node",
            "num_nodes",
            "image",
            "lora_alpha",
        )
        for name in names:
            assert params[name]["componentInputParameter"] == channel(name), (step, name)
        executor = tasks[step]["componentRef"]["name"].replace("comp-", "exec-")
        assert k8s[executor]["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"


def test_the_tuned_model_is_what_is_evaluated_and_registered(committed):
    tasks = body(committed)
    source = tasks["tune"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
    assert source == {"outputArtifactKey": "model", "producerTask": "train-2"}
    tuned = {"outputArtifactKey": "tuned", "producerTask": "tune"}
    assert tasks["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == tuned
    assert tasks["register"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == tuned
    budget = tasks["tune"]["inputs"]["parameters"]["budget_seconds"]
    assert budget["componentInputParameter"] == channel("tune_budget_seconds")


def test_phase2_consumes_phase1s_model(committed):
    tasks = body(committed)
    init = tasks["train-2"]["inputs"]["artifacts"]["init_model"]["taskOutputArtifact"]
    assert init == {"outputArtifactKey": "model", "producerTask": "train"}
    assert "init_model" not in tasks["train"]["inputs"].get("artifacts", {})


def test_only_conversion_is_cached(committed):
    pipeline, _ = committed
    tasks = {**pipeline["root"]["dag"]["tasks"]}
    for comp in pipeline["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"convert"}
    assert (
        tasks["convert"]["inputs"]["parameters"]["data_md5"]["taskOutputParameter"]["producerTask"]
        == "data-version"
    )
    # a new converter (dataset format) misses the cache: old conversions are not reused
    fmt = tasks["convert"]["inputs"]["parameters"]["dataset_format"]["runtimeValue"]["constant"]
    assert fmt == DATASET_FORMAT


def test_promotion_runs_under_the_gate(committed):
    pipeline, _ = committed
    condition = body(committed)["condition-2"]  # the exit handler is group 1
    assert condition["taskInfo"]["name"] == "promotion-gate"
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--register-Output'] == true"
    )
    gated = pipeline["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert list(gated) == ["promote"]
    assert "promote" not in body(committed)  # never outside the gate


def test_every_pipeline_parameter_has_one_row_in_the_docs_parameter_table(committed):
    lines = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.md").read_text().splitlines()
    header = lines.index("| parameter | default | meaning |")
    rows = []
    for line in lines[header + 2 :]:  # past the header and its `| --- |` line
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip().strip("`"))
    assert len(rows) == len(set(rows)), "a parameter has two rows"
    assert sorted(rows) == sorted(committed[0]["root"]["inputDefinitions"]["parameters"])


def output_types(committed, component: str) -> dict[str, str]:
    outputs = committed[0]["components"][component]["outputDefinitions"]["artifacts"]
    return {name: out["artifactType"]["schemaTitle"] for name, out in outputs.items()}


def test_the_run_page_gets_a_confusion_matrix_an_html_report_and_the_gate_decision(committed):
    evaluate = output_types(committed, "comp-evaluate")
    assert evaluate["confusion"] == "system.ClassificationMetrics"
    assert evaluate["report_html"] == "system.HTML"
    assert evaluate["metrics"] == "system.Metrics" and evaluate["report"] == "system.Markdown"
    assert output_types(committed, "comp-register")["decision"] == "system.Markdown"


def test_the_gate_gets_the_champion_scored_on_this_runs_split(committed):
    tasks = body(committed)
    champion = tasks["score-champion"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert champion == {"outputArtifactKey": "dataset", "producerTask": "convert"}
    scored = tasks["register"]["inputs"]["artifacts"]["champion_score"]["taskOutputArtifact"]
    assert scored == {"outputArtifactKey": "champion_score", "producerTask": "score-champion"}
    evaluated = tasks["register"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert evaluated == champion  # the same converted split as the challenger's evaluation


def test_training_steps_retry_and_pass_their_pod_and_sizes(committed):
    pipeline, _ = committed
    _, k8s = executors(committed)
    tasks = body(committed)
    defaults = pipeline["root"]["inputDefinitions"]["parameters"]
    assert "checkpoint_root" not in defaults  # the mounts are fixed: no parameter pretends not
    sizes = {"train_cpu_per_node": "8", "train_memory_per_node": "64Gi",
             "train_shm_per_node": "16Gi"}  # fmt: skip
    for name, value in sizes.items():
        assert defaults[name]["defaultValue"] == value, name
    for step in TRAINING_TASKS:
        retry = tasks[step]["retryPolicy"]
        assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "120s"
        assert retry["backoffFactor"] == 2.0
        params = tasks[step]["inputs"]["parameters"]
        for name in ("train_memory_per_node", "train_timeout_hours", "training_engine"):
            assert params[name]["componentInputParameter"] == channel(name)  # one name
        assert params["pending_timeout_minutes"]["componentInputParameter"] == channel(
            "pending_timeout_minutes"
        )
        executor = tasks[step]["componentRef"]["name"].replace("comp-", "exec-")
        env = {e["name"]: e["fieldPath"] for e in k8s[executor]["fieldPathAsEnv"]}
        assert env["POD_NAME"] == "metadata.name" and env["POD_UID"] == "metadata.uid"
        # the label Argo puts on every step pod (argoproj/argo-workflows v4.0.5
        # workflow/controller/workflowpod.go, common.LabelKeyWorkflow): the run's Workflow
        assert env["WORKFLOW_NAME"] == "metadata.labels['workflows.argoproj.io/workflow']"


def test_the_steps_that_call_mlflow_read_its_optional_login(committed):
    """Where MLflow authenticates (overlays/kubeflow) these steps log in; elsewhere the Secret
    is absent and optional, so nothing changes."""
    _, k8s = executors(committed)
    with_login = {
        name
        for name, config in k8s.items()
        for secret in config.get("secretAsEnv", [])
        if secret["secretName"] == "cellseg-mlflow-auth" and secret["optional"]
    }
    assert with_login == {"exec-start-run", "exec-train", "exec-train-2", "exec-tune",
                          "exec-evaluate", "exec-score-champion", "exec-register", "exec-promote",
                          "exec-finish-run"}  # fmt: skip


LOGGING_STEPS = ("train", "train-2", "tune", "evaluate", "score-champion", "register")


def test_every_step_runs_inside_the_exit_handler_and_logs_under_start_runs_parent(committed):
    """One MLflow parent run per pipeline run: start-run creates it before any step logs (two
    steps that search-then-create at once can make two), the others get its id; finish-run,
    the exit handler, runs however the body ends, with the run's id and the checkpoints volume
    (its scratch folder goes) but no task output: KFP forbids an exit task any dependency."""
    pipeline, _ = committed
    _, k8s = executors(committed)
    root = pipeline["root"]["dag"]["tasks"]
    assert sorted(root) == ["exit-handler-1", "finish-run"]
    finish = root["finish-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["dependentTasks"] == ["exit-handler-1"]
    params = finish["inputs"]["parameters"]
    assert params["pipeline_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert params["mlflow_uri"]["componentInputParameter"] == "mlflow_uri"
    assert k8s["exec-finish-run"]["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"
    tasks = body(committed)
    for step in LOGGING_STEPS:
        parent = tasks[step]["inputs"]["parameters"]["mlflow_parent_run"]["taskOutputParameter"]
        assert parent == {"outputParameterKey": "Output", "producerTask": "start-run"}, step
        assert "start-run" in tasks[step]["dependentTasks"], step


def test_the_data_comes_from_data_version_by_revision_or_from_source(committed):
    """data-version resolves what the run trains on (a data repository at a revision, pulled
    onto the datasets volume, or the folder at `source`): conversion reads the folder it names
    and is keyed on its md5; start-run tags the parent run with the resolved commit."""
    _, k8s = executors(committed)
    tasks = body(committed)
    params = tasks["data-version"]["inputs"]["parameters"]
    for name in ("source", "data_repo", "data_rev"):
        assert params[name]["componentInputParameter"] == channel(name)
    convert = tasks["convert"]["inputs"]["parameters"]
    for name, key in (("source", "source"), ("data_md5", "md5")):
        ref = convert[name]["taskOutputParameter"]
        assert ref == {"outputParameterKey": key, "producerTask": "data-version"}, name
    commit = tasks["start-run"]["inputs"]["parameters"]["data_commit"]["taskOutputParameter"]
    assert commit == {"outputParameterKey": "commit", "producerTask": "data-version"}
    secrets = k8s["exec-data-version"]["secretAsEnv"]
    assert [(s["secretName"], s["optional"]) for s in secrets] == [("cellseg-dvc-remote", True)]
    assert k8s["exec-data-version"]["pvcMount"][0]["mountPath"] == "/mnt/datasets"


def test_training_retries_cover_every_attempt_queued_and_training_to_its_deadline(committed):
    """A retry without ``backoff_max_duration`` compiles to 3600 s (kubeflow/pipelines
    sdk-2.17.0-1 sdk/python/kfp/dsl/structures.py ``RetryPolicy.to_proto``; SDKs up to 2.16.1
    clamp any value to 3600 s there); the backend hands it to Argo unchanged
    (2.17.0 backend/src/v2/compiler/argocompiler/container.go ``getTaskRetryStrategyFromInput``;
    2.5.0 ``getTaskRetryStrategy``). Argo measures ``backoff.maxDuration`` from the first
    attempt's ``StartedAt``, fails the node once it has passed, and gives a later attempt the
    rest as its ``ARGO_DEADLINE``, which the executor enforces with SIGTERM
    (argoproj/argo-workflows v4.0.5 workflow/controller/operator.go ``processNodeRetries``,
    workflow/executor/executor.go ``monitorDeadline``; the same in v3.5.14). With 3600 s a
    failure after hour one is never retried and a retry is killed at the one-hour mark."""
    tasks = body(committed)
    per_attempt = settings.TRAINING_JOB.queue_timeout_hours + settings.MAX_TRAIN_TIMEOUT_HOURS
    for step in TRAINING_TASKS:
        policy = tasks[step]["retryPolicy"]
        assert policy["maxRetryCount"] == settings.TRAIN_RETRIES == 2
        window = int(policy["backoffMaxDuration"].removesuffix("s"))
        backoffs = int(policy["backoffDuration"].removesuffix("s")) * (1 + policy["backoffFactor"])
        assert window >= (policy["maxRetryCount"] + 1) * per_attempt * 3600 + backoffs, step
    assert settings.TRAINING_JOB.train_timeout_hours <= settings.MAX_TRAIN_TIMEOUT_HOURS
    with pytest.raises(ValueError, match="compiled retry window"):
        settings.TrainingJobSettings(train_timeout_hours=settings.MAX_TRAIN_TIMEOUT_HOURS + 1)
