"""The champion behind KServe's model server: V2 (``POST /v2/models/<name>/infer``) and V1
(``POST /v1/models/<name>:predict``), the server a KServe InferenceService runs.

``python -m cellseg.serving --model_dir DIR --model_name cellseg`` serves the MLflow model in DIR
(what KServe's storage initializer downloads from the InferenceService's ``storageUri`` to
/mnt/models), a training folder or checkpoint, or an MLflow URI (``models:/cellseg@champion``).
The server's own flags (``--http_port``, ``--workers``, ...) are KServe's.

Concurrent requests: their decoding and post-processing overlap in worker threads; forward
passes take turns (one lock) on ``--threads`` intra-op threads, so requests never fight over
the cores. A request with several images is one forward pass per image size.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import uuid

from cellseg.errors import CellsegError, InputError, one_line


def load_kserve_model(name: str, model_dir: str, device: str = "cpu"):
    """The KServe model, loaded (``ready``)."""
    import kserve
    from kserve.errors import InvalidInput

    from cellseg.evaluation.inference import load_predictor, predict_batch
    from cellseg.serving import payload

    class CellSegKServe(kserve.Model):
        """RGB images in, one row per cell out (see :mod:`cellseg.serving.payload`)."""

        def __init__(self):
            super().__init__(name)
            self.predictor = None
            self.forward_lock = threading.Lock()

        def load(self) -> bool:
            self.predictor = load_predictor(model_dir, device)
            self.ready = True
            return self.ready

        def cells(self, body) -> list[list[dict]]:
            """A V2 request (an InferRequest) or a V1 body (a dict) -> each image's cells."""
            if isinstance(body, kserve.InferRequest):
                images = payload.v2_images(body.inputs)
            else:
                images = payload.v1_images(body)
            results = predict_batch(self.predictor, images, self.forward_lock)
            return [payload.instance_rows(inst) for inst in results]

        async def predict(self, body, headers=None):
            try:  # in a worker thread: the event loop keeps answering health checks
                cells = await asyncio.get_running_loop().run_in_executor(None, self.cells, body)
            except InputError as err:
                raise InvalidInput(one_line(err)) from None
            if not isinstance(body, kserve.InferRequest):
                return {"predictions": cells}
            outputs = [
                kserve.InferOutput(column, [len(values)], dtype, values)
                for column, (dtype, values) in payload.v2_columns(payload.cell_rows(cells)).items()
            ]
            response_id = body.id or uuid.uuid4().hex  # V2: the request's id, when it has one
            return kserve.InferResponse(response_id, self.name, outputs, from_grpc=body.from_grpc)

    model = CellSegKServe()
    model.load()
    return model


def one_line_errors(app) -> None:
    """FastAPI answers a body that is not a V2 request (not JSON, fields missing) with 422 and
    a list of pydantic errors, and an unparsable one with ``{"detail": ...}``; make each a 400
    ``{"error": "<one line>"}``, as KServe answers every other bad payload."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def invalid_body(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request body{f' at {where}' if where else ''}: {first.get('msg', '')}"
        return JSONResponse(status_code=400, content={"error": one_line(message)})

    async def http_error(_, exc: HTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": one_line(exc.detail)},
                            headers=getattr(exc, "headers", None))  # fmt: skip

    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)


def parser() -> argparse.ArgumentParser:
    from kserve.model_server import parser as kserve_parser

    p = argparse.ArgumentParser(parents=[kserve_parser], description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="MLflow model folder, checkpoint or URI")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/OpenCV threads for inference (0: the CPUs this process may use)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    import kserve
    from kserve.model_server import app

    from cellseg.runtime import set_inference_threads

    args = parser().parse_args(argv)
    set_inference_threads(args.threads)
    try:
        model = load_kserve_model(args.model_name, args.model_dir, args.device)
    except CellsegError as err:
        raise SystemExit(f"cellseg serve: error: {one_line(err)}") from None
    one_line_errors(app)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                       enable_grpc=args.enable_grpc).start([model])  # fmt: skip
