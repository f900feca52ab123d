"""The serving overlay on a real API server: the promote step's rollout patches the champion's
storageUri (and a canary share) into the InferenceService, as the pipeline's account, which may
do that and no more."""

import json

import pytest

from cellseg.serving.rollout import roll_inference_service
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


def test_the_promote_steps_rollout_moves_the_service_then_a_canary_then_all(serving):
    api = serving.client(PIPELINE_SA)  # as the pipeline's steps run
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
