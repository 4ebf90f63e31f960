"""Which process of a distributed run (torchrun, an initialised process group)
this is, and the one reduction the pruning decisions need: whatever a rank
decides from its own data must be summed over all ranks first, so that every
rank cuts the same channels."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def _group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """The number of processes: the process group's, else torchrun's WORLD_SIZE (before the group starts), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes the run's files: rank 0 of the process group,
    or, with none (before distill starts it, after it ends), of torchrun's RANK."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1): how to
    split work whose results are then summed with all_reduce (unlike `world`,
    never torchrun's WORLD_SIZE while no group runs, as nothing would sum)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_main(value):
    """Rank 0's value on every rank (any picklable object); the value itself
    with one process. A collective: every rank must call it. For decisions
    that only rank 0 makes, such as those timed on the machine."""
    if not _group():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: np.ndarray) -> np.ndarray:
    """values (float64) summed over all ranks, the same result on every rank; the
    values themselves with one process. A collective: every rank must call it."""
    values = np.asarray(values, dtype=np.float64)
    if not _group():
        return values
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    return all_reduce(torch.from_numpy(values.copy()).to(device)).cpu().numpy()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """t summed over all ranks, in place (a collective); t itself with one process."""
    if _group():
        dist.all_reduce(t)
    return t
