"""Model shapes, the registry, and loading backbone weights from a local file."""

import pytest
import torch
from safetensors.torch import save_file

from cellseg.errors import CheckpointError
from cellseg.model.factory import create_model, list_models, skip_indices

pytestmark = pytest.mark.model


def test_skip_features_come_from_four_evenly_spaced_blocks():
    assert skip_indices(24) == [5, 11, 17, 23]  # blocks 6/12/18/24 of ViT-L
    assert skip_indices(12) == [2, 5, 8, 11]
    assert create_model("test_vit").skip_indices == [0, 1, 2, 3]


@pytest.mark.parametrize("size", [(64, 96), (480, 640)])
def test_outputs_have_the_input_size_for_any_multiple_of_16(size):
    model = create_model("test_vit").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "np": (1, 2, *size),
        "hv": (1, 2, *size),
        "nc": (1, 4, *size),
    }


def test_sides_that_are_not_multiples_of_16_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        create_model("test_vit")(torch.rand(1, 3, 64, 90))


@pytest.mark.parametrize(
    ("name", "embed_dim", "depth"),
    [("vit_tiny", 192, 12), ("vit_small", 384, 12), ("uni", 1024, 24)],
)
def test_every_registered_backbone_size_builds_and_runs(name, embed_dim, depth):
    model = create_model(name, weights=None).eval()  # random init: UNI is gated
    assert (model.backbone.embed_dim, len(model.backbone.blocks)) == (embed_dim, depth)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 48))
    assert out["nc"].shape == (1, 4, 32, 48)


def test_any_timm_vit_by_name():
    model = create_model("vit_tiny_patch16_224", weights=None, decoder_width=32)
    assert model.backbone.embed_dim == 192 and "test_vit" in list_models()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_load_from_a_local_file(tmp_path, suffix):
    source = create_model("test_vit")
    path = tmp_path / f"backbone{suffix}"
    state = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = create_model("test_vit", weights=str(path))
    for k, v in loaded.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_weights_file_for_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(create_model("vit_tiny", weights=None).backbone.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"small\.pth: does not fit the backbone"):
        create_model("test_vit", weights=str(path))


def test_a_shared_decoder_is_one_path_split_into_the_branches_and_rebuilds_from_its_name(
    tmp_path,
):
    from cellseg.model.checkpoint import CheckpointMeta, model_from_checkpoint, save_checkpoint

    torch.manual_seed(0)
    separate = create_model("vit_tiny", weights=None, decoder_width=64).eval()
    shared = create_model("vit_tiny_shared", weights=None, decoder_width=64).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = separate(x), shared(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # one upsampling path instead of three (the skip paths were shared already)
    assert n_params(shared.decoder.trunk) < n_params(separate.decoder.branches) / 2.5
    meta = CheckpointMeta(1, "vit_tiny_shared", 64, (64, 96), (64, 96), None, {})
    save_checkpoint(tmp_path / "best_phase1.pt", shared, meta, 1, 0.0)
    rebuilt, _ = model_from_checkpoint(tmp_path / "best_phase1.pt")
    assert rebuilt.decoder.shared
    with torch.no_grad():
        assert all(torch.equal(v, rebuilt(x)[k]) for k, v in b.items())


@pytest.mark.parametrize("image_skips", [False, True])
def test_image_skips_carry_the_image_to_every_skip_scale(image_skips):
    """With the ViT's features held fixed, the image reaches the skips at 1/2, 1/4 and 1/8 only
    through the image skips' encoder (without it, they are upsampled ViT features alone)."""
    from cellseg.model.decoder import HoverDecoder

    torch.manual_seed(0)
    decoder = HoverDecoder([(32, 16)] * 4, 64, shared=True, image_skips=image_skips).eval()
    features = [torch.randn(1, 32, 4, 4) for _ in range(4)]
    with torch.no_grad():
        a = decoder.skips(torch.rand(1, 3, 64, 64), features)
        b = decoder.skips(torch.rand(1, 3, 64, 64), features)
    assert [tuple(s.shape[-2:]) for s in a] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert not torch.equal(a[0], b[0])  # 1/1 always sees the image
    assert [not torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True)] == [image_skips] * 3


def test_the_local_models_image_skips_rebuild_from_the_checkpoint(tmp_path):
    from cellseg.model.checkpoint import CheckpointMeta, model_from_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("vit_tiny_image_skips", weights=None, decoder_width=64).eval()
    plain = create_model("vit_tiny_shared", weights=None, decoder_width=64)
    extra = {k for k in model.state_dict()} - {k for k in plain.state_dict()}
    assert extra and all(k.startswith("decoder.image_path.") for k in extra)
    meta = CheckpointMeta(1, "vit_tiny_image_skips", 64, (64, 96), (64, 96), None, {})
    save_checkpoint(tmp_path / "best_phase1.pt", model, meta, 1, 0.0)
    rebuilt, _ = model_from_checkpoint(tmp_path / "best_phase1.pt")
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = model(x), rebuilt(x)
    assert all(torch.equal(v, got[k]) for k, v in expected.items())
