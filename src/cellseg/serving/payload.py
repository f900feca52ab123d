"""Request payloads -> RGB images, and cells -> response bodies; pure functions, no server.
The cell table (:data:`COLUMNS`, :func:`instance_rows`) is the served schema: the registered
MLflow model answers with the same rows.

An image arrives encoded (JPEG/PNG bytes, base64 in JSON) or as pixels (UINT8, H x W x 3). The
encoded form is about 30x smaller than a JSON list of pixel values and decodes in milliseconds:
the fast path. Whatever is wrong with a payload raises :class:`~cellseg.errors.InputError` with a
one-line message, which the server answers with a 400.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

import numpy as np

from cellseg.classes import CLASS_NAMES
from cellseg.errors import InputError
from cellseg.evaluation.predict import decode_image

MAX_IMAGES = 16  # per request: one forward pass holds them all in memory
COLUMNS = {  # the cell table's columns and their V2 datatypes; "image": index in the request
    "instance_id": "INT32",
    "category_id": "INT32",
    "class_name": "BYTES",
    "score": "FP32",
    "x": "INT32",
    "y": "INT32",
    "width": "INT32",
    "height": "INT32",
    "area": "INT32",
    "image": "INT32",
}
CELL_COLUMNS = tuple(c for c in COLUMNS if c != "image")  # one image's rows
MLFLOW_INPUT = "image"  # the registered model's input: one binary column of encoded images


_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")


def decode_encoded(item: str | bytes) -> np.ndarray:
    """An encoded image -> pixels: a base64 string, raw bytes (V2's binary extension, an MLflow
    binary column), or base64 text as bytes (MLflow's server hands ``{"inputs": [...]}`` to a
    binary column so; an encoded JPEG or PNG is never pure base64 text)."""
    if isinstance(item, bytes | bytearray) and _BASE64_TEXT.fullmatch(item):
        item = bytes(item).decode("ascii")
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("an image string is not base64") from None
    if not isinstance(item, bytes | bytearray):
        raise InputError(f"an encoded image must be a base64 string, got {type(item).__name__}")
    return decode_image(bytes(item))


def pixels(data, shape: list[int]) -> list[np.ndarray]:
    """UINT8 pixel data (flat or nested) of shape [H, W, 3] or [N, H, W, 3] -> images."""
    if len(shape) not in (3, 4):
        raise InputError(f"pixel input shape {shape}: expected [H, W, 3] or [N, H, W, 3]")
    if shape[-1] != 3:
        raise InputError(f"pixel input shape {shape}: {shape[-1]} channels, expected 3 (RGB)")
    array = np.asarray(data)
    if array.size == 0 or math.prod(shape) == 0:
        raise InputError("empty pixel input")
    if array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255:
        raise InputError("pixel values must be integers 0..255 (datatype UINT8)")
    if array.size != math.prod(shape):
        raise InputError(f"pixel input has {array.size} values, shape {shape} needs "
                         f"{math.prod(shape)}")  # fmt: skip
    array = array.astype(np.uint8).reshape(shape)
    return list(array) if array.ndim == 4 else [array]


def v2_images(inputs) -> list[np.ndarray]:
    """V2 inputs (objects with ``name``, ``datatype``, ``shape``, ``data``) -> images, in order:
    a BYTES input carries encoded images (shape [N]), a UINT8 input pixels."""
    if not inputs:
        raise InputError("no inputs: send a BYTES input of base64 images or UINT8 pixels")
    images = []
    for tensor in inputs:
        if tensor.datatype == "BYTES":
            data = tensor.data if isinstance(tensor.data, list) else [tensor.data]
            if not data:
                raise InputError(f"input {tensor.name!r} is empty")
            images += [decode_encoded(item) for item in data]
        elif tensor.datatype == "UINT8":
            images += pixels(tensor.data, list(tensor.shape))
        else:
            raise InputError(f"input {tensor.name!r} has datatype {tensor.datatype}: send BYTES "
                             "(base64 JPEG/PNG) or UINT8 pixels")  # fmt: skip
    return limited(images)


def v1_images(body) -> list[np.ndarray]:
    """V1 ``{"instances": [...]}``: each instance ``{"b64": ...}``, a base64 string, or an
    H x W x 3 nested list of pixels."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise InputError('expected a JSON object {"instances": [...]}')
    if not body["instances"]:
        raise InputError("no instances")
    images = []
    for item in body["instances"]:
        if isinstance(item, dict) and "b64" in item:
            images.append(decode_encoded(item["b64"]))
        elif isinstance(item, str):
            images.append(decode_encoded(item))
        else:
            shape = list(np.shape(item))
            images += pixels(item, shape if len(shape) == 3 else [len(shape)])
    return limited(images)


def mlflow_images(model_input) -> list[np.ndarray]:
    """What MLflow's pyfunc receives -> images. Through the model's input schema: a DataFrame
    whose :data:`MLFLOW_INPUT` cells are encoded images (bytes or base64; a cell may hold a
    list of them). Called without the schema check (``PythonModel.predict`` from code): also
    pixels, an H x W x 3 array of 0..255."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = MLFLOW_INPUT if MLFLOW_INPUT in model_input.columns else model_input.columns[0]
        items = []
        for cell in model_input[column].tolist():
            items.extend(cell if isinstance(cell, list | tuple | np.ndarray) else [cell])
        return limited([decode_encoded(item) for item in items])
    array = np.asarray(model_input)
    if array.dtype.kind in "USO":
        return limited([decode_encoded(item) for item in array.ravel().tolist()])
    if array.dtype.kind == "u":  # an image as Python passes it (gray, RGBA, 16-bit: the
        return [array]  # predictor converts it, as `cellseg predict` does)
    return pixels(array, list(array.shape))


def limited(images: list[np.ndarray]) -> list[np.ndarray]:
    if len(images) > MAX_IMAGES:
        raise InputError(f"{len(images)} images in one request; at most {MAX_IMAGES}")
    return images


def cell_rows(per_image: list[list[dict]]) -> list[dict]:
    """Each image's cell rows -> one list, each row with its image's index."""
    return [{**row, "image": i} for i, rows in enumerate(per_image) for row in rows]


def v2_columns(rows: list[dict]) -> dict[str, tuple[str, list]]:
    """Rows -> ``{column: (V2 datatype, values)}``: one output tensor of shape [cells] each."""
    return {name: (dtype, [row[name] for row in rows]) for name, dtype in COLUMNS.items()}


def instance_rows(inst) -> list[dict]:
    """One image's :class:`~cellseg.evaluation.postprocess.Instances` as rows
    (:data:`CELL_COLUMNS`): id, class, score, box and area."""
    from scipy import ndimage

    labels = np.ascontiguousarray(inst.labels)
    areas = np.bincount(labels.ravel())
    rows = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:  # an id with no pixel left (after resizing)
            continue
        rows_, cols = box
        cls = int(inst.classes[i - 1])
        rows.append(
            {
                "instance_id": i,
                "category_id": cls,
                "class_name": CLASS_NAMES[cls - 1],
                "score": float(inst.scores[i - 1]),
                "x": cols.start,
                "y": rows_.start,
                "width": cols.stop - cols.start,
                "height": rows_.stop - rows_.start,
                "area": int(areas[i]),
            }
        )
    return rows
