"""Cluster settings the pipeline, the job launcher and the CLI share (names in manifests/base).

Change a name here and in the manifests together; `tests/unit/test_images_manifests.py` checks
that they agree.
"""

IMAGE = "cellseg-kfp:0.1.0"  # `make compile IMAGE=...` points a compiled pipeline elsewhere
NAMESPACE = "cellseg"

ACCELERATOR = "nvidia.com/gpu"  # the extended resource GPU nodes advertise
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # NVIDIA GPU feature discovery's label
GPU_TOLERATIONS = ({"effect": "NoSchedule", "key": ACCELERATOR, "operator": "Exists"},)

DATASETS_PVC, DATASETS_MOUNT = "cellseg-datasets", "/mnt/datasets"
CHECKPOINTS_PVC, CHECKPOINTS_MOUNT = "cellseg-checkpoints", "/mnt/checkpoints"
HF_CACHE_PVC, HF_CACHE_MOUNT = "cellseg-hf-cache", "/cache/huggingface"
HF_TOKEN_SECRET = "cellseg-hf-token"  # key HF_TOKEN; optional (UNI is gated)
MLFLOW_AUTH_SECRET = "cellseg-mlflow-auth"  # MLFLOW_TRACKING_USERNAME/PASSWORD; optional
PIPELINE_SERVICE_ACCOUNT = "cellseg-pipeline"  # the runs' account (manifests/base/rbac.yaml)
TRAIN_SERVICE_ACCOUNT = "cellseg-train"  # the training pods' account: no API rights
MLFLOW_URI = "http://mlflow.cellseg.svc.cluster.local:5000"
