"""Where an evaluation runs in a run of several processes: this process's rank, the world size, and whether the
weights are partitioned across the processes (DeepSpeed ZeRO-3), in which case every process must run the same
forwards, each of which gathers the weights."""

from __future__ import annotations

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def partitioned(model: torch.nn.Module) -> bool:
    """True where DeepSpeed ZeRO-3 partitions the model's parameters (its `ds_id` mark on each)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
