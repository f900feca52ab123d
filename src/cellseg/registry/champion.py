"""The champion, re-scored: the gate compares like with like.

A champion's stored ``test_pq`` was computed on the data revision and test split it saw; after a
new revision the challenger's test split is another one. So each pipeline run loads the current
champion (its own checkpoint, with the post-processing saved in it) and scores it on this run's
test split, and the gate compares the two fresh results.

The champion is pinned by version number when it is read: promotion later moves ``champion`` only
if it still points to that version (see :func:`cellseg.registry.promotion.promote`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cellseg.errors import one_line

CHAMPION, CHALLENGER = "champion", "challenger"  # the registered model's aliases
SCORE_FILE = "champion_score.json"


@dataclass(frozen=True)
class ChampionScore:
    """The champion a run compares against: which version, and its fresh test metrics."""

    version: str = ""  # "" = no champion when the run looked
    metrics: dict | None = None  # its metrics on this run's test split; None if not scored
    error: str = ""  # why it could not be loaded or scored (one line)

    @property
    def unloadable(self) -> bool:
        return bool(self.version) and self.metrics is None

    def describe(self) -> str:
        if not self.version:
            return "no champion"
        if self.unloadable:
            return f"champion v{self.version} could not be loaded: {self.error}"
        return f"champion v{self.version}: test PQ {self.metrics['pq']:.4f} on this run's split"

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SCORE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, folder: Path) -> ChampionScore:
        return cls(**json.loads((Path(folder) / SCORE_FILE).read_text()))


def champion_version(client, name: str) -> str:
    """The version ``champion`` points to now; "" when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return ""


def score_champion(data: Path, out: Path, name: str, device: str = "auto") -> ChampionScore:
    """Load the current champion and evaluate it on ``data``'s test split (report in ``out``).

    A champion that cannot be loaded (artifact gone, format changed) or scored is returned with
    its error, never raised: the gate then keeps the challenger unless promotion is forced.
    """
    import mlflow

    from cellseg.evaluation.evaluate import evaluate
    from cellseg.evaluation.inference import load_predictor

    version = champion_version(mlflow.MlflowClient(), name)
    if not version:
        return ChampionScore()
    uri = f"models:/{name}/{version}"  # the pinned version, not the alias: it may move meanwhile
    try:
        predictor = load_predictor(uri, device)  # the checkpoint's own post-processing
        metrics = evaluate(Path(data), predictor, Path(out), model_name=uri)
    except Exception as err:  # any failure to load or run the old model: named, not raised
        return ChampionScore(version, None, f"{type(err).__name__}: {one_line(err)[:300]}")
    return ChampionScore(version, metrics)


def storage_uri_of(name: str, alias_or_version: str = CHAMPION, proxied_root: str = "") -> str:
    """The KServe ``storageUri`` of a registered version (by alias, or by number);
    ``proxied_root``: where KServe reads the MLflow server's proxied artifacts ("": the
    default, manifests/base's volume)."""
    import mlflow

    from cellseg.serving.rollout import storage_uri

    client = mlflow.MlflowClient()
    if alias_or_version.isdigit():
        mv = client.get_model_version(name, alias_or_version)
    else:
        mv = client.get_model_version_by_alias(name, alias_or_version)
    if getattr(mv, "model_id", None):  # MLflow 3: the version is a logged model
        location = client.get_logged_model(mv.model_id).artifact_location
    else:
        location = client.get_model_version_download_uri(name, mv.version)
    return storage_uri(location, proxied_root)
