"""The champion behind the server KServe runs (`python -m cellseg.serving`, the kserve SDK's
model server) on 127.0.0.1: real V2 and V1 HTTP requests with a real BCCD image, and every kind
of bad payload answered 400 with one line while the server keeps serving."""

import base64
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import mlflow
import numpy as np
import pytest
from PIL import Image

from cellseg.classes import CLASS_NAMES
from cellseg.evaluation.inference import Predictor, predict_batch
from cellseg.registry.champion import CHAMPION, storage_uri_of
from cellseg.registry.promotion import promote, register
from cellseg.serving.payload import instance_rows
from cellseg.serving.rollout import PROXIED_ARTIFACTS
from tests.integration.conftest import free_port
from tests.integration.test_mlflow_registry import fake_metrics, new_run

pytestmark = pytest.mark.integration
NAME = "cellseg"


@pytest.fixture(scope="module")
def bccd_jpeg(bccd_source) -> bytes:
    return (bccd_source / "JPEGImages" / "BloodImage_00000.jpg").read_bytes()


@pytest.fixture(scope="module")
def champion_name(sqlite_mlflow_server, checkpoint):
    mlflow_server = sqlite_mlflow_server  # serving is the subject, not the store
    mlflow.set_tracking_uri(mlflow_server)
    name = f"cellseg-{uuid.uuid4().hex[:8]}"
    version, _ = register(new_run(), checkpoint, fake_metrics(0.5), np.zeros((32, 32, 3), np.uint8),
                          name)  # fmt: skip
    promote(version, "", name)
    return name


@pytest.fixture(scope="module")
def champion_dir(champion_name, tmp_path_factory):
    """The registered champion's MLflow model folder, as KServe's storage initializer puts
    the InferenceService's storageUri at /mnt/models."""
    name = champion_name
    dst = tmp_path_factory.mktemp("champion")
    return mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=str(dst))


@pytest.fixture(scope="module")
def server(champion_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    cmd = [sys.executable, "-m", "cellseg.serving", "--model_dir", champion_dir,
           "--model_name", NAME, "--http_port", str(port), "--enable_grpc", "false",
           "--threads", "1"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not ready(f"{url}/v2/models/{NAME}/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def v2(server, inputs) -> tuple[int, dict]:
    return post(f"{server}/v2/models/{NAME}/infer", {"inputs": inputs})


def b64_input(*encoded: bytes) -> dict:
    data = [base64.b64encode(e).decode() for e in encoded]
    return {"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}


def columns(answer: dict) -> dict[str, list]:
    return {o["name"]: o["data"] for o in answer["outputs"]}


def test_v2_base64_jpeg_gives_one_row_per_cell_as_the_predictor_does(server, bccd_jpeg, checkpoint):
    status, answer = v2(server, [b64_input(bccd_jpeg)])
    assert status == 200, answer
    cells = columns(answer)
    rgb = np.asarray(Image.open(io.BytesIO(bccd_jpeg)).convert("RGB"))
    expected = instance_rows(predict_batch(Predictor.from_checkpoint(checkpoint), [rgb])[0])
    assert len(cells["class_name"]) == len(expected)  # one row per cell
    assert cells["class_name"] == [r["class_name"] for r in expected]
    assert cells["area"] == [r["area"] for r in expected]
    assert set(cells["image"]) <= {0} and set(cells["class_name"]) <= set(CLASS_NAMES)
    x, w, y, h = (np.array(cells[k]) for k in ("x", "width", "y", "height"))
    assert (x + w <= 640).all() and (y + h <= 480).all()
    n = len(expected)
    assert all(o["shape"] == [n] for o in answer["outputs"])

    # the same pixels as a UINT8 tensor: the same cells
    pixels = {"name": "image", "datatype": "UINT8", "shape": list(rgb.shape),
              "data": rgb.ravel().tolist()}  # fmt: skip
    status, answer = v2(server, [pixels])
    assert status == 200 and columns(answer)["area"] == cells["area"]

    # two images in one request: each its own rows, in order, tagged by index
    small = Image.fromarray(rgb[:240, :320])
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    status, answer = v2(server, [b64_input(bccd_jpeg, buf.getvalue())])
    assert status == 200
    both = columns(answer)
    assert [a for a, i in zip(both["area"], both["image"], strict=True) if i == 0] == cells["area"]
    assert 1 in both["image"] or len(both["image"]) == n  # the crop may hold no whole cell

    # V1, as KServe's v1 protocol: {"instances": [{"b64": ...}]}
    instance = {"b64": base64.b64encode(bccd_jpeg).decode()}
    status, answer = post(f"{server}/v1/models/{NAME}:predict", {"instances": [instance]})
    assert status == 200
    assert [r["area"] for r in answer["predictions"][0]] == cells["area"]


def tensor(datatype: str, shape: list[int], data: list) -> dict:
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": data}]}


BAD = {
    "not JSON": b"\x89PNG this is no JSON",
    "wrong shape": tensor("UINT8", [64, 64], [0] * 4096),
    "wrong dtype": tensor("FP32", [16, 16, 3], [0.5] * 768),
    "4 channels": tensor("UINT8", [32, 32, 4], [0] * 4096),
    "1x1": tensor("UINT8", [1, 1, 3], [0, 0, 0]),
    "empty": {"inputs": []},
    "empty bytes": tensor("BYTES", [0], []),
    "data and shape disagree": tensor("UINT8", [32, 32, 3], [0] * 10),
    "not base64": tensor("BYTES", [1], ["%%% not base64 %%%"]),
    "base64 of no image": {"inputs": [b64_input(b"hello, no image here")]},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_payload_gets_400_with_one_line_and_the_server_keeps_serving(server, bccd_jpeg, case):
    body = BAD[case]
    status, answer = post(f"{server}/v2/models/{NAME}/infer", body)
    assert 400 <= status < 500, (status, answer)
    message = answer.get("error", "")
    assert message and "\n" not in message and len(message) < 300, answer
    status, _ = v2(server, [b64_input(bccd_jpeg)])
    assert status == 200


def test_the_champions_storage_uri_is_its_model_folder_on_the_mlflow_volume(
    champion_name, tmp_path_factory
):
    uri = storage_uri_of(champion_name)  # what the promote step patches in
    assert uri.startswith(f"{PROXIED_ARTIFACTS}/"), uri
    # sqlite_mlflow_server's --artifacts-destination stands for the mlflow-store volume's artifacts/
    (artifacts,) = tmp_path_factory.getbasetemp().glob("mlflow-sqlite-only[0-9]*/artifacts")
    folder = artifacts / uri.removeprefix(f"{PROXIED_ARTIFACTS}/")
    assert (folder / "MLmodel").is_file() and (folder / "pyfunc_model.py").is_file()
