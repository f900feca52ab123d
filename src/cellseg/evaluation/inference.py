"""A trained model as a function: RGB image (any size) -> classified instances."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cellseg.errors import InputError
from cellseg.evaluation.postprocess import Instances, postprocess
from cellseg.model.checkpoint import model_from_checkpoint
from cellseg.model.factory import CellSegModel
from cellseg.model.postprocess_params import PostprocessParams, postprocess_params
from cellseg.model.reference import resolve_checkpoint
from cellseg.runtime import place_images, place_model, resolve_device

MAX_PIXELS = 4096 * 4096


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grayscale, RGBA and 16-bit images -> (H, W, 3) uint8."""
    if image.dtype == np.uint16:
        image = (image / 257).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InputError(f"unsupported image shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[..., :3]


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (exact for any dtype)."""
    rows = (np.arange(shape[0]) * labels.shape[0] // shape[0]).clip(0, labels.shape[0] - 1)
    cols = (np.arange(shape[1]) * labels.shape[1] // shape[1]).clip(0, labels.shape[1] - 1)
    return labels[rows][:, cols]


@dataclass
class Predictor:
    """``predictor(image)`` or ``predictor.predict_batch(images)``: instances per image.

    Images go through the network ``batch_size`` at a time (images of one padded size share a
    forward pass); on CUDA the forward runs under bf16 autocast in channels-last layout, as
    training does there, on the CPU in fp32, so CPU results do not depend on the batching
    beyond float rounding.
    """

    model: CellSegModel
    scale: float  # working resolution / native resolution
    device: torch.device
    params: PostprocessParams = field(default_factory=PostprocessParams)
    batch_size: int = 8
    chosen_phase: int = 0  # the training phase whose weights these are (0: unknown)

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "auto", batch_size: int = 8) -> Predictor:
        model, meta = model_from_checkpoint(Path(path))
        params = postprocess_params(meta.config)  # as chosen on val when it was trained
        where = resolve_device(device)
        model = place_model(model, where)
        return cls(model, meta.scale, where, params, batch_size, meta.chosen_phase)

    def check(self, image: np.ndarray) -> np.ndarray:
        """``image`` as (H, W, 3) uint8 within the size limits; raises InputError."""
        image = as_rgb_uint8(image)
        h, w = image.shape[:2]
        if h * w > MAX_PIXELS:
            raise InputError(
                f"image is {w}x{h}, above the {MAX_PIXELS:,}-pixel limit; tile it first"
            )
        if min(h, w) < 16:
            raise InputError(f"image is {w}x{h}; sides must be at least 16 pixels")
        return image

    def _working_size(self, image: np.ndarray) -> tuple[int, int]:
        h, w = image.shape[:2]
        return max(16, round(h * self.scale)), max(16, round(w * self.scale))

    def _input(self, image: np.ndarray) -> torch.Tensor:
        """(3, H, W) float in [0, 1] at working resolution, sides padded to multiples of 16."""
        wh, ww = self._working_size(image)
        small = cv2.resize(image, (ww, wh), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(small.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)
        ph, pw = math.ceil(wh / 16) * 16 - wh, math.ceil(ww / 16) * 16 - ww
        return F.pad(x, (0, pw, 0, ph), mode="replicate")[0]  # cropped back after the forward

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def probabilities_batch(self, images: list[np.ndarray]) -> list[tuple]:
        """Per image: NP probability (h, w), HV (2, h, w), NC softmax (4, h, w) at working
        resolution."""
        inputs = [self._input(im) for im in images]
        found: list[tuple | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        for group in by_shape.values():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                x = place_images(torch.stack([inputs[i] for i in chunk]), self.device)
                with self._autocast():
                    out = self.model(x)
                np_prob = out["np"].float().softmax(1)[:, 1].cpu().numpy()
                hv = out["hv"].float().cpu().numpy()
                nc_prob = out["nc"].float().softmax(1).cpu().numpy()
                for k, i in enumerate(chunk):
                    wh, ww = self._working_size(images[i])
                    found[i] = (np_prob[k, :wh, :ww], hv[k, :, :wh, :ww], nc_prob[k, :, :wh, :ww])
        return found

    def probabilities(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """NP probability (h, w), HV (2, h, w), NC softmax (4, h, w) at working resolution."""
        return self.probabilities_batch([image])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[Instances]:
        """Instances of each image at its own resolution (:func:`predict_batch`)."""
        return predict_batch(self, images)

    def __call__(self, image: np.ndarray) -> Instances:
        """Instances at the image's own resolution."""
        return predict_batch(self, [image])[0]


def predict_batch(
    predictor: Predictor,
    images: list[np.ndarray],
    forward_lock: AbstractContextManager | None = None,
) -> list[Instances]:
    """Instances for each image, in order: every image is checked first (one bad image fails
    the batch, before any work), then images of one size share one forward pass, taken while
    holding ``forward_lock`` (a server's threads share the cores that way)."""
    images = [predictor.check(im) for im in images]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape[:2], []).append(i)
    results: list[Instances | None] = [None] * len(images)
    for shape, indices in by_shape.items():
        with forward_lock or nullcontext():
            maps = predictor.probabilities_batch([images[i] for i in indices])
        for i, m in zip(indices, maps, strict=True):
            inst = postprocess(*m, predictor.params)
            inst.labels = resize_labels(inst.labels, shape)
            results[i] = inst
    return results


def load_predictor(model_ref: str | Path, device: str = "auto") -> Predictor:
    """A :class:`Predictor` for a checkpoint, a training folder or an MLflow URI
    (:mod:`cellseg.model.reference`), on ``device`` (``auto``: CUDA when present)."""
    return Predictor.from_checkpoint(resolve_checkpoint(str(model_ref)), device)
