"""Where the run executes: device, process group under torchrun, seeds, autocast."""

from __future__ import annotations

import contextlib
import gc
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tiltlm.models import parse_device, parse_dtype


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # start() created the process group, so stop() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


pick_device = parse_device  # ``auto`` (CUDA when there is one, else CPU) or a device this machine has


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Have glibc serve allocations above ``threshold`` bytes with mmap, and so give them back to the
    system when freed; False where there is no glibc (macOS, musl), which changes nothing else.

    By default glibc raises that threshold after the first large free (up to 32 MiB) and then serves
    activation-sized tensors from its heap, which fragments and stays resident: a CPU run's RSS climbs
    above its live memory. The price of this setting is that every large tensor is mapped and zeroed
    afresh by the kernel: in the 20M-parameter benchmark (with gradient checkpointing) peak RSS falls
    from 1.12 to 0.86 GB and a step takes ~30% longer. The same as ``MALLOC_MMAP_THRESHOLD_=65536`` in
    the environment; ``--release-memory`` in the trainer.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD is -3 in glibc's malloc.h
    except (OSError, AttributeError):
        return False


def start(device: str = "auto") -> Runtime:
    """One process, or one rank of a ``torchrun`` job (RANK/WORLD_SIZE/LOCAL_RANK in the environment):
    NCCL on GPUs, gloo on CPU; each rank on its own GPU."""
    chosen = pick_device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Runtime(chosen)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    owns_group = not dist.is_initialized()  # a caller's group is used as it is, and left to the caller
    if owns_group:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(chosen, dist.get_rank(), dist.get_world_size(), local_rank, owns_group)


def stop(runtime: Runtime) -> None:
    if runtime.owns_group and dist.is_initialized():
        # FSDP's hooks keep a run's modules in reference cycles; freed at interpreter exit instead, their
        # tensors can still be held by gloo's worker threads, which then abort the process
        gc.collect()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # every device's generator, CUDA's included


def set_deterministic(on: bool) -> None:
    """PyTorch's deterministic algorithms (``--deterministic``): on GPUs, index_add_ and the attention
    backward otherwise use atomics whose order varies, so two runs differ in the last bits. CUDA's
    cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first call."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=False)


@dataclass(frozen=True)
class Precision:
    """How a run computes: master weights (and optimizer state) in ``weights``, matmuls under autocast in
    ``compute``. ``bf16`` on a GPU means float32 weights and bf16 compute: at DPO's learning rates most
    Adam updates are below what a bf16 weight can resolve, so bf16 weights would silently drop them.
    Log-probs, losses and metrics are float32 whatever the compute dtype (see logprobs.py)."""

    device: torch.device
    compute: torch.dtype = torch.float32
    weights: torch.dtype = torch.float32

    def autocast(self):
        """Autocast to ``compute`` on this device (CPU autocast too: slow, but the same mixed path, so
        tests exercise it); nothing when computing in the weights' own dtype."""
        if self.compute == self.weights:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)


def training_precision(dtype: str, bf16_weights: bool, device: torch.device) -> Precision:
    """The run's :class:`Precision` from ``--dtype`` and ``--bf16-weights``: float32 master weights unless
    bf16 weights are asked for explicitly."""
    compute = parse_dtype(dtype, device)
    return Precision(device, compute, compute if bf16_weights else torch.float32)


def lost_update_fraction(parameters, lr: float) -> float:
    """The fraction of the bf16 weights in ``parameters`` that an update of size ``lr`` cannot change.

    Adam's normalised update moves a weight by about ``lr`` per step. A bf16 number keeps 8 significant
    bits, so next to ``w`` representable values are ``2**(floor(log2|w|) - 7)`` apart, and round-to-
    nearest drops any change below half of that: ``lr < 2**(floor(log2|w|) - 8)``."""
    lost, total = 0, 0
    for p in parameters:
        w = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()  # FSDP: the whole weight
        w = w.float().abs()
        exponent = torch.floor(torch.log2(w.clamp(min=torch.finfo(torch.float32).tiny)))
        lost += int((lr < torch.exp2(exponent - 8)).sum())
        total += w.numel()
    return lost / max(total, 1)
