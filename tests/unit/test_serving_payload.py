"""Request payloads -> images, and the rollout's storageUri and patch, on hand-built inputs."""

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cellseg.errors import CellsegError, InputError
from cellseg.serving import payload
from cellseg.serving.rollout import MODE_ANNOTATION, deployment_mode, rollout_patch, storage_uri


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def tensor(datatype, shape, data):
    return SimpleNamespace(name="image", datatype=datatype, shape=shape, data=data)


IMAGE = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)


def test_base64_pngs_and_uint8_pixels_decode_to_the_same_images():
    b64 = base64.b64encode(png(IMAGE)).decode()
    images = payload.v2_images([tensor("BYTES", [2], [b64, b64])])
    assert len(images) == 2 and all(np.array_equal(im, IMAGE) for im in images)
    flat = tensor("UINT8", [20, 30, 3], IMAGE.ravel().tolist())
    batch = tensor("UINT8", [2, 20, 30, 3], np.stack([IMAGE, IMAGE]).ravel().tolist())
    assert np.array_equal(payload.v2_images([flat])[0], IMAGE)
    assert [im.shape for im in payload.v2_images([batch])] == [(20, 30, 3)] * 2
    v1 = payload.v1_images({"instances": [{"b64": b64}, b64, IMAGE.tolist()]})
    assert all(np.array_equal(im, IMAGE) for im in v1)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "no inputs"),
        ([tensor("FP32", [20, 30, 3], [0.5] * 1800)], "datatype FP32"),
        ([tensor("UINT8", [20, 30, 4], [0] * 2400)], "4 channels"),
        ([tensor("UINT8", [20, 30], [0] * 600)], "expected [H, W, 3]"),
        ([tensor("UINT8", [20, 30, 3], [0] * 7)], "has 7 values"),
        ([tensor("UINT8", [20, 30, 3], [256] * 1800)], "0..255"),
        ([tensor("UINT8", [0, 30, 3], [])], "empty"),
        ([tensor("BYTES", [0], [])], "empty"),
        ([tensor("BYTES", [1], ["***"])], "not base64"),
        ([tensor("BYTES", [1], [base64.b64encode(b"text").decode()])], "not a readable image"),
        ([tensor("BYTES", [17], [base64.b64encode(png(IMAGE)).decode()] * 17)], "at most 16"),
    ],
)
def test_each_bad_payload_names_its_fault_in_one_line(inputs, message):
    with pytest.raises(InputError, match=None) as err:
        payload.v2_images(inputs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mlflow_inputs_pixels_or_base64_strings():
    assert np.array_equal(payload.mlflow_images(IMAGE)[0], IMAGE)
    assert np.array_equal(payload.mlflow_images(IMAGE.astype(np.int64))[0], IMAGE)  # from JSON
    b64 = base64.b64encode(png(IMAGE)).decode()
    assert len(payload.mlflow_images(np.array([b64, b64]))) == 2


def test_cell_rows_are_columns_of_equal_length_tagged_by_image():
    rows = payload.cell_rows([[{"area": 5, "class_name": "RBC"}], [], [{"area": 7}]])
    assert [(r["image"], r["area"]) for r in rows] == [(0, 5), (2, 7)]
    full = {c: 0 for c in payload.COLUMNS} | {"class_name": "RBC"}
    columns = payload.v2_columns(payload.cell_rows([[full, full]]))
    assert columns["class_name"] == ("BYTES", ["RBC", "RBC"]) and columns["image"][1] == [0, 0]


def test_storage_uri_maps_proxied_artifacts_to_the_mlflow_volume():
    proxied = "mlflow-artifacts:/1/models/m-abc/artifacts"
    assert storage_uri(proxied) == "pvc://mlflow-store/artifacts/1/models/m-abc/artifacts"
    assert storage_uri("mlflow-artifacts://mlflow:5000/1/x") == "pvc://mlflow-store/artifacts/1/x"
    assert storage_uri("s3://bucket/1/models/m-abc/artifacts").startswith("s3://bucket/")
    with pytest.raises(CellsegError, match="KServe cannot read"):
        storage_uri("file:///home/me/mlruns/1/models/m-abc/artifacts")


def test_rollout_patch_sets_a_canary_share_or_clears_it():
    assert rollout_patch("s3://b/m", 20)["spec"]["predictor"] == {
        "model": {"storageUri": "s3://b/m"},
        "canaryTrafficPercent": 20,
    }
    for full in (0, 100):  # null in a merge patch: the field removed, all traffic to the model
        assert rollout_patch("s3://b/m", full)["spec"]["predictor"]["canaryTrafficPercent"] is None
    with pytest.raises(CellsegError):
        rollout_patch("s3://b/m", 120)


def test_the_proxied_artifacts_root_is_configurable_and_must_be_one_kserve_reads():
    """The mlflow-team overlay keeps proxied artifacts in a bucket: there is no mlflow-store
    volume, and a pvc:// storageUri would leave the predictor waiting forever."""
    proxied = "mlflow-artifacts:/1/models/m-abc/artifacts"
    assert storage_uri(proxied, "s3://team-bucket/mlflow/") == (
        "s3://team-bucket/mlflow/1/models/m-abc/artifacts"
    )
    assert storage_uri(proxied, "").startswith("pvc://mlflow-store/artifacts/")  # the default
    with pytest.raises(CellsegError, match="KServe reads"):
        storage_uri(proxied, "/mlflow/artifacts")


def test_the_deployment_mode_is_read_in_kserves_order():
    """kserve/kserve v0.20.0 pkg/controller/v1beta1/inferenceservice/utils/utils.go
    ``GetDeploymentMode``: the status, the annotation, then the ``deploy`` default of
    ``inferenceservice-config``; Serverless and RawDeployment are the old names of Knative and
    Standard (pkg/constants/constants.go, pkg/apis/serving/v1beta1/configmap.go
    ``NewDeployConfig``)."""
    config = {"data": {"deploy": json.dumps({"defaultDeploymentMode": "RawDeployment"})}}
    bare = {"metadata": {}}
    assert deployment_mode(bare, config)[0] == "Standard"
    annotated = {"metadata": {"annotations": {MODE_ANNOTATION: "Serverless"}}}
    assert deployment_mode(annotated, config)[0] == "Knative"
    reconciled = {**annotated, "status": {"deploymentMode": "Standard"}}
    assert deployment_mode(reconciled, config) == ("Standard", "its status")
    assert deployment_mode(bare, None)[0] == ""
