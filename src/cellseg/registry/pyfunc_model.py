"""The registered model's code, logged with MLflow's models-from-code (never pickled).

MLflow copies this file into each model version and runs it when the model is loaded or served;
cellseg never imports it. Loading reads the checkpoint artifact with ``weights_only`` (no code in
it), so writing to the registry cannot make a loader run anything but this file and cellseg.
"""

from pathlib import Path

import mlflow


class CellSegServing(mlflow.pyfunc.PythonModel):
    """``predict(images)`` -> a DataFrame with one row per cell, ``image`` its image's index.

    ``images``: an RGB uint8 (H, W, 3) array (pixel values, as JSON lists over HTTP), or
    encoded images (JPEG/PNG), base64 strings or bytes, one or several: ``{"inputs": ["..."]}``.
    """

    def load_context(self, context):
        from cellseg.evaluation.inference import Predictor

        self.predictor = Predictor.from_checkpoint(Path(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from cellseg.evaluation.inference import predict_batch
        from cellseg.serving.payload import CELL_COLUMNS, instance_rows, mlflow_images

        results = predict_batch(self.predictor, mlflow_images(model_input))
        rows = [{**r, "image": i} for i, inst in enumerate(results) for r in instance_rows(inst)]
        return pd.DataFrame(rows, columns=[*CELL_COLUMNS, "image"])


mlflow.models.set_model(CellSegServing())
