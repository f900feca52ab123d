"""A batch of images in one forward pass per size gives each image what it gets alone."""

import numpy as np
import pytest

from cellseg.errors import InputError
from cellseg.evaluation.inference import Predictor, predict_batch

pytestmark = pytest.mark.model


class CountingModel:
    """The real model, counting its forward passes and the images in each."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x):
        self.batches.append(x.shape[0])
        return self.model(x)


def test_a_batch_is_one_forward_pass_per_size_with_each_images_own_result(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in
              [(96, 128, 3), (100, 130, 3), (96, 128, 3), (96, 128, 3)]]  # fmt: skip
    alone = [predictor.probabilities(im) for im in images]
    predictor.model = CountingModel(predictor.model)
    results = predict_batch(predictor, images)
    assert sorted(predictor.model.batches) == [1, 3]  # two sizes: two forward passes
    batched = predictor.probabilities_batch([images[0], images[2], images[3]])
    for one, many in zip([alone[0], alone[2], alone[3]], batched, strict=True):
        for a, b in zip(one, many, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert [r.labels.shape for r in results] == [im.shape[:2] for im in images]


def test_one_bad_image_fails_the_batch_before_any_forward_pass(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    predictor.model = CountingModel(predictor.model)
    good, tiny = np.zeros((64, 64, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)
    with pytest.raises(InputError, match="1x1"):
        predict_batch(predictor, [good, tiny])
    assert predictor.model.batches == []
