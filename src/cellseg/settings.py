"""Every default a user may change, in one place: cluster names (shared with ``manifests/base``),
the training job's shape, the promotion gate's tolerance, the registered model's name.

The pipeline's signature, the ``train`` step, the job specs, the CLI and ``cellseg doctor`` read
their defaults from here (``tests/unit/test_settings.py`` checks that none spells its own). Change
a cluster name here and in the manifests together; ``tests/unit/test_images_manifests.py`` checks
that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE = "cellseg-kfp:0.1.0"  # `make compile IMAGE=...` points a compiled pipeline elsewhere
NAMESPACE = "cellseg"

ACCELERATOR = "nvidia.com/gpu"  # the extended resource GPU nodes advertise
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # NVIDIA GPU feature discovery's label
GPU_TOLERATIONS = ({"effect": "NoSchedule", "key": ACCELERATOR, "operator": "Exists"},)
INFERENCE_GPUS = 1  # evaluate and score-champion run one model on one device, as the predictor

DATASETS_PVC, DATASETS_MOUNT = "cellseg-datasets", "/mnt/datasets"
DVC_PULLS = f"{DATASETS_MOUNT}/dvc"  # data pulled by revision, one folder per DVC md5
# the DVC remote's credentials for the data-version step (optional: a public or local remote)
DVC_REMOTE_SECRET = "cellseg-dvc-remote"
DVC_REMOTE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CHECKPOINTS_PVC, CHECKPOINTS_MOUNT = "cellseg-checkpoints", "/mnt/checkpoints"
HF_CACHE_PVC, HF_CACHE_MOUNT = "cellseg-hf-cache", "/cache/huggingface"
HF_TOKEN_SECRET = "cellseg-hf-token"  # key HF_TOKEN; optional (UNI is gated)
MLFLOW_AUTH_SECRET = "cellseg-mlflow-auth"  # optional; its keys are the env vars MLflow reads
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PIPELINE_SERVICE_ACCOUNT = "cellseg-pipeline"  # the runs' account (manifests/base/rbac.yaml)
TRAIN_SERVICE_ACCOUNT = "cellseg-train"  # the training pods' account: no API rights
MLFLOW_URI = "http://mlflow.cellseg.svc.cluster.local:5000"

# Training profiles (src/cellseg/training/profiles): what a cluster run and a laptop run train.
CLUSTER_PROFILE, LOCAL_PROFILE = "uni-gpu", "local"

# Training engines: Training Operator v1 PyTorchJob (the default: most clusters still run it)
# or Kubeflow Trainer v2 TrainJob.
PYTORCHJOB, TRAINJOB = "pytorchjob", "trainjob"
TRAINING_ENGINES = (PYTORCHJOB, TRAINJOB)


# The training steps' retries. Argo measures a retry strategy's maxDuration from the first
# attempt's start and gives later attempts' pods what is left as their deadline, so the window
# must cover every attempt waiting in the queue and training to its deadline
# (tests/unit/test_pipeline_spec.py cites the upstream code).
TRAIN_RETRIES = 2
TRAIN_RETRY_BACKOFF_SECONDS, TRAIN_RETRY_BACKOFF_FACTOR = 120, 2.0
MAX_TRAIN_TIMEOUT_HOURS = 168.0  # the largest train_timeout_hours a run may ask for


@dataclass(frozen=True, kw_only=True)
class TrainingJobSettings:
    """The shape of one phase's training job on a cluster. Each field is a pipeline parameter
    of the same name (``pipelines/cellseg_pipeline.py``) and a ``cellseg launch`` flag."""

    training_engine: str = PYTORCHJOB
    image: str = IMAGE
    num_nodes: int = 1
    gpus_per_node: int = 1  # processes per node (torchrun's --nproc_per_node)
    node_selector: dict = field(default_factory=lambda: dict(GPU_NODE_SELECTOR))
    tolerations: tuple[dict, ...] = GPU_TOLERATIONS
    queue_name: str = ""  # a Kueue LocalQueue; "" = none
    train_cpu_per_node: str = "8"
    train_memory_per_node: str = "64Gi"
    train_shm_per_node: str = "16Gi"  # /dev/shm, where DataLoader workers pass tensors
    train_timeout_hours: float = 72.0  # running, counted from the last admission
    queue_timeout_hours: float = 168.0  # waiting in the queue, from the last suspension
    pending_timeout_minutes: float = 30.0  # a pod no node can take fails the step after this

    def __post_init__(self):
        if self.training_engine not in TRAINING_ENGINES:
            raise ValueError(
                f"training engine {self.training_engine!r}: expected one of "
                f"{', '.join(TRAINING_ENGINES)}"
            )
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("num_nodes and gpus_per_node must be >= 1")
        if not 0 < self.train_timeout_hours <= MAX_TRAIN_TIMEOUT_HOURS:
            raise ValueError(
                f"train_timeout_hours {self.train_timeout_hours:g}: expected more than 0 and at "
                f"most {MAX_TRAIN_TIMEOUT_HOURS:g} (the compiled retry window covers that)"
            )


TRAINING_JOB = TrainingJobSettings()  # the defaults, as one object


def train_retry_window_seconds() -> int:
    """Argo's ``backoff.maxDuration`` for a training step: every attempt queued and training
    to its deadline, plus the backoffs between them."""
    attempts = TRAIN_RETRIES + 1
    per_attempt = (TRAINING_JOB.queue_timeout_hours + MAX_TRAIN_TIMEOUT_HOURS) * 3600
    backoffs = sum(
        TRAIN_RETRY_BACKOFF_SECONDS * TRAIN_RETRY_BACKOFF_FACTOR**i for i in range(TRAIN_RETRIES)
    )
    return int(attempts * per_attempt + backoffs)


# The promotion gate: the largest drop of one class's PQ a better challenger may bring.
PROMOTION_TOLERANCE = 0.02
REGISTERED_MODEL = "cellseg"  # the MLflow registered model (aliases champion, challenger)
INFERENCE_SERVICE = "cellseg"  # the KServe InferenceService in manifests/components/kserve
