"""How training and validation split a dataset over DDP ranks."""

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from cellseg.training.dataset import EpochSampler, ShardSampler


def test_validation_shards_hold_each_image_once_without_padding():
    shards = [list(ShardSampler(5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3, 4]
    assert [len(ShardSampler(5, 2, r)) for r in (0, 1)] == [3, 2]
    # what DistributedSampler would do: pad rank 1 with an image rank 0 already holds
    padded = [list(DistributedSampler(range(5), 2, r, shuffle=False)) for r in (0, 1)]
    assert len(padded[0] + padded[1]) == 6


def test_epoch_sampler_carries_the_epoch_with_each_validation_index():
    sampler = EpochSampler(ShardSampler(3))
    sampler.set_epoch(4)
    assert list(sampler) == [(4, 0), (4, 1), (4, 2)] and len(sampler) == 3


def test_cuda_rng_state_is_saved_and_restored():
    from cellseg.training.loop import rng_state, set_rng_state

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)
