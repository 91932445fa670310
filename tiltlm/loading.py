"""Loading a model once for an FSDP job: rank 0 reads the checkpoint; every rank holds only its shards.

Loading the whole model on every rank and then sharding it costs each rank the full weights in host
memory first (float32: ~32 GB a rank, ~256 GB an 8-GPU node, for an 8B model). :func:`load_sharded`
instead:

1. rank 0 loads the model with the ordinary loader (``load``), so every format, alias (GGUF), objective
   and transformers' own key conversions and weight tying load exactly as in one process;
2. rank 0 sends the other ranks a *skeleton*: a copy of that model whose parameters are on the meta
   device (no memory). Buffers, config, dtypes, attention kernel and tied parameters travel as they are,
   so the non-persistent buffers that no checkpoint holds (rotary ``inv_freq``...) are rank 0's values,
   with no per-family recomputation;
3. every rank shards its skeleton (``shard``, e.g. :func:`tiltlm.distributed.shard`) and allocates its
   own shards (``to_empty``);
4. PyTorch's ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` sends rank 0's
   weights one tensor at a time; each rank keeps its slices.

Reading each rank's slices straight from the safetensors files would spare the broadcast, but would have
to redo what ``from_pretrained`` does between the file and the model (renamed and converted keys, tied
weights, dtype rules, GGUF de-quantization, a reward model's new score head): broadcasting what the
ordinary loader built is exact by construction. Rank 0 alone holds the whole model, while it loads.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from tiltlm import collectives


def load_sharded(load: Callable[[], nn.Module], shard: Callable[[nn.Module], nn.Module],
                 device: torch.device) -> nn.Module:
    """Called on every rank: ``shard(model)`` for the model ``load()`` builds on rank 0, each rank's shards
    on ``device`` holding rank 0's weights. ``shard`` gets the skeleton, shards it in place (``fully_shard``)
    and may wrap it (e.g. in a ``CompletionLogps``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from tiltlm.attention import register

    register()  # the skeleton may name tiltlm's attention kernels, which rank 0's loader registered in its process
    full = load() if collectives.world()[0] == 0 else None
    model = collectives.broadcast_object(skeleton(full) if full is not None else None)
    weights = full.state_dict() if full is not None else {}
    del full  # rank 0's whole model lives on only in ``weights``, freed on return
    sharded = shard(model)
    buffers = dict(model.named_buffers())
    sharded.to_empty(device=device)  # allocates each rank's shards, and new buffers: refilled below
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device; everything else (buffers, config,
    parameters shared between modules) is copied as it is."""
    meta = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo=meta)  # deepcopy takes a parameter found in memo instead of copying it
