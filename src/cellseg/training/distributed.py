"""Process-group set-up for torchrun and PyTorchJob pods (both set WORLD_SIZE, RANK, MASTER_*)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cellseg.runtime import resolve_device


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_preference: str) -> World:
    """Join the process group when launched distributed (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, device)


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's decision, on every rank (early stopping must stop all ranks together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=world.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _GlobalSum(torch.autograd.Function):
    """Sum over ranks in the forward; in the backward, the incoming gradient times the world
    size. Every rank's loss is the same function f of the global sums S, and DDP averages the
    ranks' gradients: rank r contributes W·f'(S)·ds_r/dθ, so the average is f'(S)·dS/dθ, the
    gradient one process would compute on the whole batch (the backward of a sum over ranks,
    as ``torch.distributed.nn.all_reduce`` has it, without its second collective)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.world_size, None


def global_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the ranks, differentiably (the ranks' shares of one batch).

    Every rank must call it as often as the others (training batches, not validation shards).
    """
    if not world.distributed:
        return values
    return _GlobalSum.apply(values, world.world_size)


def gather_objects(obj, world: World) -> list:
    """Every rank's ``obj``, in rank order (one collective; all ranks call it)."""
    if not world.distributed:
        return [obj]
    found = [None] * world.world_size
    dist.all_gather_object(found, obj)
    return found


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
