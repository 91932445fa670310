"""One training run over several processes: DDP or FSDP2, chosen by ``TrainConfig.parallel``.

``ddp``   every rank holds the whole model and optimizer; gradients are averaged by all-reduce. Rank 0
          writes checkpoints (one file set, as in a single process) while the others wait.
``fsdp``  (``torch.distributed.fsdp.fully_shard``, "FSDP2") every rank holds 1/world_size of each
          weight, gradient and optimizer state, for models whose training state does not fit one
          device. Each decoder layer is a unit of its own (all-gathered just before it runs, freed
          after); the embeddings, final norm and LM head belong to the root unit, the
          :class:`~tiltlm.logprobs.CompletionLogps` around the model, whose ``forward`` is what the loop
          calls. Every forward is a collective, so every rank runs the same number of them (the
          reference pass and evaluation pad a rank that runs out of examples: refcache.py, step.py).
          A separate reference (online, or ``--ref`` scoring the precomputed table) is sharded the
          same way (frozen, in the master weights' dtype, resharded after every call); the policy's
          own table and the adapters-off reference run through the sharded policy (reference.py).
          LoRA adapters are added before sharding. With a reduced ``dtype`` the policy's
          shards stay float32 (master weights) and layers compute in ``dtype``, gradients reduced in
          float32 (``MixedPrecisionPolicy``).

FSDP checkpoints are sharded: ``trainable-rank{r}.safetensors`` and ``optimizer-rank{r}.pt`` (read back
with ``weights_only=True``) per rank, plus the usual scheduler, RNG, state and manifest files, written
into one hidden staging directory and renamed into place by rank 0 once every rank has written, so a
crash leaves at most a hidden directory that resume ignores. They resume only with the same number of
processes. (``torch.distributed.checkpoint`` could reshard, but its reader unpickles its metadata
file without restriction, and no checkpoint file of ours is ever unpickled that way.) ``final/`` is a
plain transformers directory: the full weights are gathered to rank 0's CPU and saved there.

Not supported with FSDP (a clear :class:`ConfigError`): ``merge_lora`` (merging needs the whole model on
one host; ``final/`` is the adapter, whose weights alone are gathered).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tiltlm import checkpoint as ckpt
from tiltlm import collectives
from tiltlm.config import ConfigError, TrainConfig
from tiltlm.logprobs import CompletionLogps, backbone_and_head
from tiltlm.runtime import Runtime

PARALLEL = ("ddp", "fsdp")


def uses_fsdp(config: TrainConfig, runtime: Runtime) -> bool:
    """Whether this run shards with FSDP: ``parallel = fsdp`` and more than one process. Raises
    ConfigError for settings FSDP does not support, before anything is loaded or written."""
    if config.parallel not in PARALLEL:
        raise ConfigError(f"parallel = {config.parallel!r}: expected {' or '.join(PARALLEL)}")
    if config.parallel != "fsdp":
        return False
    if config.lora_r > 0 and config.merge_lora:
        raise ConfigError("parallel = fsdp with merge_lora is not supported: merging needs the whole model on one "
                          "host; train without merge_lora and merge final/ (a peft adapter) on a host that holds the model")
    return runtime.distributed


# --- wrapping ----------------------------------------------------------------------------------------


def shard(scorer: CompletionLogps, runtime: Runtime, compute_dtype: Optional[torch.dtype] = None) -> CompletionLogps:
    """Apply ``fully_shard`` to each decoder layer of ``scorer.model``, then to ``scorer`` (the root: it
    owns the remaining weights and its ``forward`` drives the gathering). Changes ``scorer`` in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    mixed = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
             if compute_dtype not in (None, torch.float32) else MixedPrecisionPolicy())
    for layer in decoder_layers(scorer.model):
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(scorer, mesh=mesh, mp_policy=mixed)
    return scorer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes transformers declares unsplittable
    (``_no_split_modules``), else the entries of the body's largest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    backbone, _ = backbone_and_head(model)
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(scorer: CompletionLogps, parallel: str, runtime: Runtime, compute_dtype: torch.dtype) -> nn.Module:
    """What the loop calls for the policy's log-probs: ``scorer`` itself in one process, DDP around it,
    or ``scorer`` sharded in place (FSDP)."""
    if not runtime.distributed:
        return scorer
    if parallel == "fsdp":
        return shard(scorer, runtime, compute_dtype)
    return DistributedDataParallel(scorer)


@contextlib.contextmanager
def accumulating(model: nn.Module, active: bool) -> Iterator[None]:
    """While ``active`` (every micro-batch of a step but the last), backward passes accumulate gradients.

    DDP accumulates locally (``no_sync``) and all-reduces the sum once, after the last micro-batch. FSDP
    reduce-scatters every micro-batch instead and accumulates the *sharded* gradients: with its sync
    turned off it would keep an unsharded float32 gradient of every parameter between micro-batches
    (~32 GB per GPU for an 8B model), more than the whole sharded training state. The sum of the shards of
    each micro-batch's reduced gradient is the shard of the reduced sum."""
    if active and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm (over all ranks' shards under FSDP); the norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# --- checkpoints -------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, state: ckpt.TrainingState,
                    keep: int, runtime: Runtime) -> None:
    """Called on every rank. Unsharded: rank 0 writes and the others wait. Sharded: every rank writes
    its shard into a staging directory, then rank 0 completes and renames it."""
    if is_sharded(model):
        _save_sharded(directory, model, optimizer, scheduler, state, keep, runtime)
    elif runtime.is_main:
        ckpt.save_checkpoint(directory, model, optimizer, scheduler, state, keep)
    if runtime.distributed:
        collectives.barrier()


def _save_sharded(directory: Path, model: nn.Module, optimizer, scheduler, state: ckpt.TrainingState,
                  keep: int, runtime: Runtime) -> None:
    final = directory / f"step-{state.step}"
    staging = directory / f".step-{state.step}.tmp-sharded"  # one name that every rank knows
    if runtime.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving this step
        staging.mkdir()
    collectives.barrier()
    rank = runtime.rank
    try:
        save_file({name: p.detach().to_local().cpu().contiguous() for name, p in trainable(model)},
                  staging / f"trainable-rank{rank}.safetensors")
        torch.save(_local_optimizer_state(optimizer), staging / f"optimizer-rank{rank}.pt")
    except ckpt.WRITE_ERRORS as error:
        raise ckpt.save_error(final, error) from error
    # A rank that failed to write raises above and never arrives here: torchrun then stops the job and
    # the staging directory stays hidden, never a checkpoint.
    collectives.barrier()
    if runtime.is_main:
        try:
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            torch.save(ckpt.rng_state(), staging / "rng.pt")
            layout = {"step": state.step, "world_size": runtime.world_size}
            (staging / "state.json").write_text(json.dumps(layout))
            ckpt.seal(staging, final)
        except ckpt.WRITE_ERRORS as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise ckpt.save_error(final, error) from error
        for old in ckpt.list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _local_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with each DTensor replaced by this rank's local shard (plain tensors
    only, so that it loads back with ``weights_only=True``)."""
    from torch.distributed.tensor import DTensor

    saved = optimizer.state_dict()
    state = {index: {key: value.to_local() if isinstance(value, DTensor) else value for key, value in entry.items()}
             for index, entry in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer, scheduler) -> ckpt.TrainingState:
    """Restore a checkpoint written by :func:`save_checkpoint` in the same layout as this run's."""
    ckpt.verify(checkpoint)
    saved_sharded = (checkpoint / "trainable-rank0.safetensors").is_file()
    if not is_sharded(model):
        if saved_sharded:
            raise ckpt.CheckpointError(f"{checkpoint}: a sharded (parallel = fsdp) checkpoint; resume it with "
                                       f"parallel = fsdp and the same number of processes")
        return ckpt.load_checkpoint(checkpoint, model, optimizer, scheduler)
    state = json.loads((checkpoint / "state.json").read_text())
    world_size = dist.get_world_size()
    if not saved_sharded or state.get("world_size") != world_size:
        raise ckpt.CheckpointError(f"{checkpoint}: written by {state.get('world_size', 1)} process(es) "
                                   f"({'sharded' if saved_sharded else 'not sharded'}); this FSDP run has "
                                   f"{world_size}: resume with the layout it was saved with")
    rank = dist.get_rank()
    shards = load_file(checkpoint / f"trainable-rank{rank}.safetensors")
    with torch.no_grad():
        for name, p in trainable(model):
            if name not in shards or shards[name].shape != p.to_local().shape:
                raise ckpt.CheckpointError(f"{checkpoint / f'trainable-rank{rank}.safetensors'}: "
                                           f"no shard of shape {tuple(p.to_local().shape)} for {name}")
            p.to_local().copy_(shards[name])
    optimizer.load_state_dict(_global_optimizer_state(ckpt.read_tensors(checkpoint / f"optimizer-rank{rank}.pt"),
                                                      optimizer))
    scheduler.load_state_dict(ckpt.read_tensors(checkpoint / "scheduler.pt"))
    ckpt.set_rng_state(ckpt.read_tensors(checkpoint / "rng.pt"))
    return ckpt.TrainingState(step=state["step"])


def _global_optimizer_state(saved: dict, optimizer) -> dict:
    """Local shards back into DTensors laid out like the parameters they belong to."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def restore(value, param):
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.dim() > 0:
            return DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                      run_check=False, shape=param.shape, stride=param.stride())
        return value

    state = {index: {key: restore(value, params[index]) for key, value in entry.items()}
             for index, entry in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def full_state_dict(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Called on every rank: the whole state dict of a sharded model on rank 0's CPU (``{}`` on other
    ranks; a peft model's adapter weights only, on every rank); None for a model that is not sharded."""
    if not is_sharded(model):
        return None
    if hasattr(model, "peft_config"):  # final/ is the adapter: gather its weights only, never the base's
        return {name: collectives.full_tensor(p.detach()).cpu() for name, p in trainable(model)}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
