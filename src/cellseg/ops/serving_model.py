"""The registered model's code, logged with MLflow's models-from-code (never pickled).

MLflow copies this file into each model version and runs it when the model is loaded or served;
cellseg never imports it. Loading reads the checkpoint artifact with ``weights_only`` (no code in
it), so writing to the registry cannot make a loader run anything but this file and cellseg.
"""

from pathlib import Path

import mlflow
import numpy as np


class CellSegServing(mlflow.pyfunc.PythonModel):
    """``predict(image)``: an RGB uint8 (H, W, 3) array -> a DataFrame with one row per cell."""

    def load_context(self, context):
        from cellseg.evaluation.inference import Predictor

        self.predictor = Predictor.from_checkpoint(Path(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from cellseg.ops.registry import instances_table

        image = np.asarray(model_input, dtype=np.uint8)
        return instances_table(self.predictor(image), pd)


mlflow.models.set_model(CellSegServing())
