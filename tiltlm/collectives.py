"""Every collective the library calls, by name. Each is the identity in one process.

Under torchrun every rank must reach each collective in the same order, so callers name them where they
are called (``collectives.sum_over_ranks(sums)``), never behind a helper's side effect. The tensors
travel on the backend's device (the rank's GPU for NCCL, the CPU for gloo) and come back where they were.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    """A reduced copy of ``tensor`` (``op``: SUM, MAX or MIN), on ``tensor``'s device."""
    if world()[1] == 1:
        return tensor.clone()
    moved = tensor.to(_backend_device(), copy=True)
    dist.all_reduce(moved, op=getattr(dist.ReduceOp, op))
    return moved.to(tensor.device)


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """all-reduce (sum)."""
    return _all_reduce(tensor, "SUM")


def any_rank(flag: bool) -> bool:
    """all-reduce (max): true on every rank when ``flag`` is true on any (a signal may reach only some)."""
    return bool(_all_reduce(torch.tensor([float(flag)]), "MAX").item())


def every_rank(flag: bool) -> bool:
    """all-reduce (min): true on every rank when ``flag`` is true on all of them."""
    return bool(_all_reduce(torch.tensor([float(flag)]), "MIN").item())


def gather_rows(rows: Tensor, width: int) -> list[Tensor]:
    """all-gather: every rank's ``rows`` ([n_r, ...], n_r <= ``width``), each padded to ``width`` rows on
    the wire (gloo wants equal shapes) and returned on the CPU, indexed by rank."""
    if world()[1] == 1:
        return [rows]
    padded = torch.zeros((width,) + tuple(rows.shape[1:]), dtype=rows.dtype)
    padded[:len(rows)] = rows
    device = _backend_device()
    shards = [torch.zeros_like(padded, device=device) for _ in range(world()[1])]
    dist.all_gather(shards, padded.to(device))
    return [shard.cpu() for shard in shards]


def broadcast_object(obj: object) -> object:
    """broadcast (pickled): rank 0's ``obj`` on every rank. Pickle runs only between the job's own ranks."""
    if world()[1] == 1:
        return obj
    carried = [obj]
    dist.broadcast_object_list(carried, src=0)
    return carried[0]


def full_tensor(tensor: Tensor) -> Tensor:
    """all-gather: the whole value of a sharded tensor (a DTensor) on every rank; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def barrier() -> None:
    """Wait for every rank."""
    if world()[1] > 1:
        dist.barrier()
