"""The real `hf-hub:MahmoodLab/UNI` loading path (timm + huggingface_hub), offline: a small
stand-in checkpoint sits in a Hugging Face cache exactly where the gated download would put it."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.model

SMALL_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}


def fake_hub_cache(root, state):
    repo = root / "hub" / "models--MahmoodLab--UNI"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    config = {
        "architecture": "vit_large_patch16_224",
        "num_classes": 0,
        "model_args": SMALL_VIT,  # the real UNI has none: ViT-L defaults
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    save_file(state, str(snapshot / "model.safetensors"))


LOAD = """
import sys, torch
from cellseg.model.factory import create_model
model = create_model("uni")  # weights: the registry default, hf-hub:MahmoodLab/UNI
torch.save({k: v for k, v in model.backbone.state_dict().items()}, sys.argv[1])
print(type(model.backbone).__name__, model.skip_indices)
"""


def test_uni_loads_from_the_hugging_face_cache_offline(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5, **SMALL_VIT
    )
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    fake_hub_cache(tmp_path / "hf", state)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",  # fail rather than reach for the network
        "HF_TOKEN": "hf_test_token_never_sent",
    }
    out = tmp_path / "loaded.pt"
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(out)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "VisionTransformer [0, 1, 2, 3]" in result.stdout
    assert "hf_test_token" not in result.stdout + result.stderr  # never logged
    loaded = torch.load(out, weights_only=True)
    for key, value in loaded.items():  # norm and head are pruned; the blocks are UNI's
        assert torch.equal(value, state[key]), key
    assert "blocks.0.ls1.gamma" in loaded  # init_values=1e-5: LayerScale, as UNI has
