"""The uni-gpu recipe's mechanics, on CPU with the test ViT (its figures wait for a GPU): the
heads' last layer in float32 under bf16 autocast, a frozen backbone in eval mode while the
decoder trains, blur and noise on the image only, and a profile whose post-processing is not
HoVer-Net's 40x nuclei defaults."""

from __future__ import annotations

import pytest
import torch

from cellseg.model.factory import create_model
from cellseg.model.postprocess_params import PostprocessParams
from cellseg.training import loop
from cellseg.training.config import load_config
from cellseg.training.dataset import CellDataset
from cellseg.training.loop import train
from tests.conftest import TINY

pytestmark = pytest.mark.model


def test_under_bf16_autocast_the_heads_write_float32_maps():
    """bf16 keeps 8 bits of mantissa: just below +-1 its step is 2**-8 = 0.004, a fifth of the
    ~0.02 per pixel an HV map rises by inside a red cell; the last 1x1 conv runs in float32."""
    torch.manual_seed(0)
    model = create_model("test_vit", weights=None).eval()
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(image)
    assert {k: v.dtype for k, v in outputs.items()} == dict.fromkeys(outputs, torch.float32)
    hv = outputs["hv"].flatten()
    assert not torch.equal(hv, hv.to(torch.bfloat16).float())  # finer than bf16's grid
    with torch.no_grad():
        plain = model(image)  # outside autocast: the same layers, the same float32 maths
    assert plain["hv"].dtype == torch.float32


def test_a_frozen_pretrained_backbone_stays_in_eval_mode_while_the_decoder_trains(
    dataset, tmp_path, monkeypatch
):
    weights = tmp_path / "backbone.pt"
    torch.save(create_model("test_vit", weights=None).backbone.state_dict(), weights)
    seen = []
    step = loop.batch_step

    def batch_step(run, model, batch, training, *args):
        if training:
            seen.append((run.model.backbone.training, run.model.decoder.training))
        return step(run, model, batch, training, *args)

    monkeypatch.setattr(loop, "batch_step", batch_step)
    frozen = load_config("local", 1, [*TINY, "epochs=1", f"weights={weights}"])
    train(1, dataset, tmp_path / "frozen", frozen)
    assert seen and set(seen) == {(False, True)}
    seen.clear()
    trained = load_config("local", 1, [*TINY, "epochs=1"])  # random init: the backbone trains
    train(1, dataset, tmp_path / "trained", trained)
    assert seen and set(seen) == {(True, True)}


def test_blur_and_noise_change_the_image_only(dataset):
    plain = CellDataset(dataset, "train", (64, 96), augment=True, seed=5, crop=48)
    degraded = CellDataset(dataset, "train", (64, 96), augment=True, seed=5, crop=48, degrade=1.0)
    changed = 0
    for index in range(len(plain)):
        a, b = plain[0, index], degraded[0, index]
        for key in ("np", "hv", "nc", "ignore"):
            assert torch.equal(a[key], b[key]), key  # geometry as before: targets untouched
        changed += not torch.equal(a["image"], b["image"])
    assert changed == len(plain)


def test_uni_gpu_trains_at_the_inference_scale_with_bccd_post_processing():
    defaults = PostprocessParams()
    for phase in (1, 2):
        config = load_config("uni-gpu", phase, [])
        assert config.train_crop and config.image_size == (480, 640)  # crops at 1.0x
        assert config.crop_focus > 0 and config.degrade > 0
        assert config.markers == "slope" != defaults.markers
        assert config.min_marker_area > 10 * 6 and config.min_instance_area > 10
        assert config.merge_touching == ("WBC",) and config.border_score < 1.0
