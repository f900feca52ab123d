"""Where the work runs: the cores this process may use and the threads set to match, the CPU
kernels pinned for portability, and the device chosen.

A container limited by a CFS quota (Kubernetes CPU limits, ``docker run --cpus``) still sees
every core of its host in ``os.cpu_count()`` and in its affinity mask, and torch sizes its
intra-op pool from those: a 2-CPU pod on a 64-core node runs 64 threads. That oversubscribes
the quota, and since a reduction's float rounding depends on how it is split over threads, the
same code on "2 cores" gives different figures on hosts of different sizes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cellseg.errors import ConfigError

CGROUP = Path("/sys/fs/cgroup")
# Read by each library when it first computes, so they must be set before torch runs anything;
# a step subprocess inherits them.
PORTABLE_CPU_KERNELS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
}


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup's CFS quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``); None when unlimited or unknown."""
    root = Path(root)
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" if (root / "cpu").is_dir() else root
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def cpu_budget(root: Path = CGROUP) -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores or 1, math.ceil(quota))
    return max(1, cores or 1)


def match_torch_threads(root: Path = CGROUP) -> int:
    """torch's intra-op threads set to this process's share of :func:`cpu_budget` (the
    processes torchrun starts on a node, ``LOCAL_WORLD_SIZE``, share it); returns the count."""
    import torch

    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, cpu_budget(root) // max(sharing, 1))
    torch.set_num_threads(threads)
    return threads


def portable_cpu_kernels(environ: dict | None = None) -> dict[str, str]:
    """Pin oneDNN's, ATen's and MKL's CPU kernels to AVX2 in this process's environment (and so
    in the processes it starts), unless already set; returns the settings in force.

    Call it before torch computes anything. It costs speed on an AVX-512 machine
    (docs/reproducibility.md), so it is asked for (``--portable-kernels``, ``PORTABLE=1``), never
    by default.
    """
    environ = os.environ if environ is None else environ
    for key, value in PORTABLE_CPU_KERNELS.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in PORTABLE_CPU_KERNELS}


def set_inference_threads(threads: int = 0) -> int:
    """torch's and OpenCV's thread counts for inference: ``threads``, or :func:`cpu_budget`.
    Measured on 2 cores: OpenCV left at its default made a 640x480 prediction take 1.9 s
    against 0.32 s with both set to 2. Returns the count."""
    import cv2
    import torch

    n = threads or cpu_budget()
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    return n


def resolve_device(preference: str = "auto", local_rank: int | None = None):
    """A ``torch.device``: ``auto`` is the GPU when one is visible, else the CPU; ``cpu``,
    ``cuda`` and ``cuda:N`` as given. ``local_rank`` picks a distributed process's GPU when the
    preference names none."""
    import torch

    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={preference} but no CUDA device is visible: use device=cpu (or auto), "
                "or run on a GPU node"
            )
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device


def uses_channels_last(device) -> bool:
    """Whether convolutions on ``device`` take channels-last tensors: on CUDA, where cuDNN's
    tensor-core kernels want NHWC and a contiguous NCHW input costs a transpose per layer; on
    the CPU the layout stays as it is (its oneDNN kernels pick their own)."""
    return device.type == "cuda"


def place_model(model, device):
    """``model`` moved to ``device`` in the layout its convolutions run fastest in there."""
    import torch

    if uses_channels_last(device):
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def place_images(images, device):
    """A (B, 3, H, W) image batch moved to ``device`` in the layout :func:`place_model` chose
    (asynchronously from pinned memory)."""
    import torch

    if uses_channels_last(device):
        return images.to(device, memory_format=torch.channels_last, non_blocking=True)
    return images.to(device, non_blocking=True)


def configure_backends(device, deterministic: bool = False) -> None:
    """cuDNN's autotuner on CUDA: the training shapes repeat every step, so the fastest
    convolution algorithm is found once per shape and reused; not for a ``deterministic`` run
    (the algorithm it picks can differ from run to run)."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
