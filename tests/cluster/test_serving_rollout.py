"""The serving overlay on a real API server: the promote step's rollout patches the champion's
storageUri (and a canary share) into the InferenceService, as the pipeline's account, which may
do that and no more."""

import json

import pytest

from cellseg.serving.rollout import MODE_ANNOTATION, RolloutRefused, roll_inference_service
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA, REPO

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def serving(installed):
    installed.kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / "serving"))
    return installed


def predictor(server) -> dict:
    got = server.kubectl("get", "inferenceservice", "cellseg", "-n", NAMESPACE, "-o", "json")
    return json.loads(got.stdout)["spec"]["predictor"]


def test_the_serving_overlay_runs_the_project_model_server(serving):
    runtime = json.loads(serving.kubectl("get", "clusterservingruntime", "cellseg-kserve",
                                         "-o", "json").stdout)  # fmt: skip
    container = runtime["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "cellseg.serving"]
    assert "--model_dir=/mnt/models" in container["args"]  # where storageUri is downloaded
    assert {"name": "cellseg-mlflow", "version": "1", "autoSelect": True} in runtime["spec"][
        "supportedModelFormats"
    ]
    model = predictor(serving)["model"]
    assert model["runtime"] == "cellseg-kserve" and model["modelFormat"]["name"] == "cellseg-mlflow"


def mode(server, value: str | None) -> None:
    """The InferenceService's deployment-mode annotation (None: removed)."""
    setting = f"{MODE_ANNOTATION}={value}" if value else f"{MODE_ANNOTATION}-"
    server.kubectl("annotate", "--overwrite", "inferenceservice", "cellseg", "-n", NAMESPACE,
                   setting)  # fmt: skip


def test_the_promote_steps_rollout_moves_the_service_then_a_canary_then_all(serving):
    api = serving.client(PIPELINE_SA)  # as the pipeline's steps run
    mode(serving, "Serverless")  # KServe's legacy name of the Knative mode
    v2 = "s3://models/1/models/m-2/artifacts"
    roll_inference_service("cellseg", NAMESPACE, v2, 0, api)
    spec = predictor(serving)
    assert spec["model"]["storageUri"] == v2 and "canaryTrafficPercent" not in spec

    v3 = "pvc://mlflow-store/artifacts/1/models/m-3/artifacts"
    roll_inference_service("cellseg", NAMESPACE, v3, 20, api)
    spec = predictor(serving)
    assert spec["model"]["storageUri"] == v3 and spec["canaryTrafficPercent"] == 20
    assert spec["model"]["runtime"] == "cellseg-kserve"  # a merge patch: the rest stays

    roll_inference_service("cellseg", NAMESPACE, v3, 100, api)  # the canary promoted: all
    assert "canaryTrafficPercent" not in predictor(serving)
    mode(serving, None)


@pytest.mark.parametrize("standard", ["Standard", "RawDeployment"])
def test_a_canary_in_standard_mode_is_refused_before_anything_moves(serving, standard):
    """KServe v0.20.0 reads ``canaryTrafficPercent`` only in its Knative reconciler
    (pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go); the
    Standard mode (RawDeployment, pkg/constants/constants.go) accepts the field and ignores it,
    so a 20 % canary would take all traffic. All traffic (canary 0) still rolls."""
    api = serving.client(PIPELINE_SA)
    mode(serving, standard)
    before = predictor(serving)
    with pytest.raises(RolloutRefused) as refused:
        roll_inference_service("cellseg", NAMESPACE, "s3://models/1/m-4", 20, api)
    message = str(refused.value)
    assert "\n" not in message and "Standard mode" in message, message
    assert "ignores canaryTrafficPercent" in message and "canary_traffic_percent=0" in message
    assert predictor(serving) == before  # nothing moved
    roll_inference_service("cellseg", NAMESPACE, "s3://models/1/m-4", 0, api)
    assert predictor(serving)["model"]["storageUri"] == "s3://models/1/m-4"
    mode(serving, None)
    with pytest.raises(RolloutRefused, match="deployment mode is unknown"):
        roll_inference_service("cellseg", NAMESPACE, "s3://models/1/m-5", 20, api)


def can_i(server, user, verb, resource, namespace) -> bool:
    result = server.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={user}",
                            check=False)  # fmt: skip
    return result.stdout.strip() == "yes"


def test_the_pipeline_account_may_roll_the_service_and_nothing_more(serving):
    isvc = "inferenceservices.serving.kserve.io"
    for verb in ("get", "patch"):
        assert can_i(serving, PIPELINE_SA, verb, isvc, NAMESPACE), verb
        assert not can_i(serving, PIPELINE_SA, verb, isvc, "default"), verb
    for verb in ("create", "delete", "update"):
        assert not can_i(serving, PIPELINE_SA, verb, isvc, NAMESPACE), verb
    assert not can_i(serving, PIPELINE_SA, "patch", "clusterservingruntimes", NAMESPACE)
