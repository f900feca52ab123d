"""Where the tests find the pinned upstream CRDs: ``CELLSEG_CRDS`` (``.ci/run`` points it at
``../shared/schemas``), else the cache ``make crds`` fills (``~/.cache/cellseg/crds``).

A missing CRD skips its test with the way to get it, or fails it where ``CELLSEG_CRDS`` is
set (there the CRDs were promised)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellseg.cluster.crds import K8S_120, default_cache

HOW_TO_GET = "run `make crds` (downloads the pinned CRDs) or export CELLSEG_CRDS=DIR"


def crds_dir() -> Path:
    return Path(os.environ.get("CELLSEG_CRDS") or default_cache())


def crd(path: str, k8s_120: bool = False) -> Path:
    """The CRD file ``path`` (e.g. ``kueue/kueue.x-k8s.io_localqueues.yaml``); with ``k8s_120``
    its copy a Kubernetes 1.20 API server accepts."""
    found = crds_dir() / (f"{K8S_120}/{Path(path).name}" if k8s_120 else path)
    if not found.is_file():
        message = f"{found} not found: {HOW_TO_GET}"
        if os.environ.get("CELLSEG_CRDS"):
            pytest.fail(message)
        pytest.skip(message)
    return found
