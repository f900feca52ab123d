"""LoRA on qkv, and checkpoints loading in all four LoRA / non-LoRA combinations."""

import pickle

import pytest
import torch

from cellseg.errors import CheckpointError
from cellseg.model.checkpoint import (
    CheckpointMeta,
    find_checkpoint,
    load_checkpoint,
    load_model_state,
    lora_scaling,
    model_from_checkpoint,
    save_checkpoint,
)
from cellseg.model.factory import create_model
from cellseg.model.lora import add_lora

pytestmark = pytest.mark.model
RANK, ALPHA = 4, 8.0


def plain():
    torch.manual_seed(0)
    return create_model("test_vit").eval()


def with_lora(trained_adapters: bool = False):
    model = add_lora(plain(), RANK, ALPHA, dropout=0.0).eval()
    if trained_adapters:  # B = 0 at init; make the adapters matter
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


def outputs(model, x):
    with torch.no_grad():
        return model(x)["nc"]


X = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))


def test_lora_wraps_every_qkv_and_only_adapters_and_decoder_get_gradients():
    model = with_lora()
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * 4  # A and B in each of the 4 blocks
    assert all(".attn.qkv." in n for n in lora_names)
    base_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sum(o.square().mean() for o in model(X).values()).backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        if name.startswith("backbone.") and "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
        elif "lora_A" not in name:  # lora_A has zero gradient while B is still 0
            assert has_grad, name
    opt.step()
    for name, p in model.backbone.named_parameters():
        changed = not torch.equal(p, base_before[name])
        assert changed == ("lora_" in name), name  # base weights untouched


def test_plain_checkpoint_into_plain_model():
    source, target = plain(), create_model("test_vit").eval()
    load_model_state(target, source.state_dict(), None, "ckpt")
    assert torch.equal(outputs(source, X), outputs(target, X))


def test_plain_checkpoint_into_lora_model_keeps_the_function():
    source = plain()
    target = add_lora(create_model("test_vit"), RANK, ALPHA, 0.0).eval()
    load_model_state(target, source.state_dict(), None, "ckpt")
    assert torch.allclose(outputs(source, X), outputs(target, X), atol=1e-6)


def test_lora_checkpoint_into_lora_model_restores_the_adapters():
    source = with_lora(trained_adapters=True)
    target = add_lora(create_model("test_vit"), RANK, ALPHA, 0.0).eval()
    load_model_state(target, source.state_dict(), lora_scaling(RANK, ALPHA), "ckpt")
    assert torch.equal(outputs(source, X), outputs(target, X))


def test_lora_checkpoint_into_plain_model_merges_the_adapters():
    source = with_lora(trained_adapters=True)
    target = create_model("test_vit").eval()
    load_model_state(target, source.state_dict(), lora_scaling(RANK, ALPHA), "ckpt")
    assert not torch.allclose(outputs(plain(), X), outputs(source, X), atol=1e-4)
    assert torch.allclose(outputs(source, X), outputs(target, X), atol=1e-5)


def test_a_checkpoint_of_another_model_is_a_clear_error():
    with pytest.raises(CheckpointError, match=r"best\.pt: does not fit the model"):
        load_model_state(
            plain(), create_model("vit_tiny", weights=None).state_dict(), None, "best.pt"
        )


META = CheckpointMeta(
    phase=2,
    model_name="test_vit",
    decoder_width=32,
    image_size=(64, 96),
    native_size=(96, 128),
    lora={"rank": RANK, "alpha": ALPHA},
    config={},
)


def test_checkpoints_are_written_atomically_and_read_safely(tmp_path):
    path = tmp_path / "latest_phase2.pt"
    save_checkpoint(path, with_lora(trained_adapters=True), META, epoch=3, best_metric=0.5)
    assert [p.name for p in tmp_path.iterdir()] == ["latest_phase2.pt"]
    assert load_checkpoint(path)["epoch"] == 3
    model, meta = model_from_checkpoint(path)  # LoRA merged: a plain model comes back
    assert meta == META and meta.scale == 64 / 96
    assert not any("lora_" in k for k in model.state_dict())

    class Payload:  # arbitrary pickled objects are refused by weights_only loading
        def __reduce__(self):
            return (print, ("side effect",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a checkpoint this tool can load"):
        load_checkpoint(evil)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        load_checkpoint(truncated)


def test_the_format_tag_is_checked_on_read(tmp_path):
    """A foreign torch file (here: a bare state dict, as a backbone weights file is) is refused
    with a line that names it and says what it is not, instead of failing later on a key."""
    path = tmp_path / "backbone.pt"
    torch.save(plain().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"backbone\.pt: checkpoint format None, this"):
        load_checkpoint(path)


def test_a_training_folder_resolves_to_its_most_advanced_checkpoint(tmp_path):
    for name in ("latest_phase1.pt", "best_phase1.pt", "latest_phase2.pt"):
        (tmp_path / name).write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "latest_phase2.pt"  # no best of Phase 2 yet
    assert find_checkpoint(tmp_path, phases=(1,)).name == "best_phase1.pt"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty")


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    import os

    from cellseg.cli import main

    class Payload:  # unpickled without weights_only, it would run a shell command
        def __reduce__(self):
            return (os.system, ("exit 0",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    assert main(["predict", str(tmp_path / "x.png"), "--model", str(evil), "--out", "o"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"cellseg predict: error: {evil}: not a checkpoint this tool can load safely: "
        "it holds code (posix.system)"
    ]
