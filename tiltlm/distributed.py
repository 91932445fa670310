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

FSDP checkpoints are sharded: every rank writes ``trainable-rank{r}.safetensors`` and
``optimizer-rank{r}.safetensors`` (its slice of each weight and AdamW moment, the slice's offset in the
file's JSON header), rank 0 the scheduler, RNG, state (with the optimizer's param_groups) and manifest
files, all into one hidden staging directory that rank 0 renames into place once every rank has
written, so a crash leaves at most a hidden directory that resume ignores. Any layout resumes any
checkpoint: N sharded processes, M sharded ones, or one process (either way round). Each rank reads only
the slices it needs, planned by ``torch.distributed.checkpoint`` with its safetensors reader
(``HuggingFaceStorageReader``: the layout comes from the files' headers; DCP's default reader would
unpickle a ``.metadata`` file without restriction, and no checkpoint file of ours is ever unpickled that
way). The RNG states are rank 0's, restored on every rank whatever their number (training draws no
random numbers with dropout off; the data order is a function of seed and step). ``final/`` is
written one weight at a time: gathered (``full_tensor``), cast, appended by rank 0 to its file of Hugging
Face's sharded layout; no host ever holds the whole model.

Not supported with FSDP (a clear :class:`ConfigError`): ``merge_lora`` (merging needs the whole model on
one host; ``final/`` is the adapter, whose weights alone are gathered).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint._hf_utils import CUSTOM_METADATA_KEY, SAVED_OFFSETS_KEY
from torch.nn.parallel import DistributedDataParallel

from tiltlm import checkpoint as ckpt
from tiltlm import collectives
from tiltlm.config import ConfigError, TrainConfig
from tiltlm.logprobs import CompletionLogps, backbone_and_head
from tiltlm.runtime import Runtime


def uses_fsdp(config: TrainConfig, runtime: Runtime) -> bool:
    """Whether this run shards with FSDP: ``parallel = fsdp`` (a choice ``config.validate`` checked) and more
    than one process. Raises ConfigError for settings FSDP does not support, before anything is loaded."""
    if config.parallel != "fsdp":
        return False
    if config.lora_r > 0 and config.merge_lora:
        raise ConfigError("parallel = fsdp with merge_lora is not supported: merging needs the whole model on one "
                          "host; train without merge_lora and merge final/ (a peft adapter) on a host that holds the model")
    return runtime.distributed


# --- wrapping ----------------------------------------------------------------------------------------


def shard(scorer: CompletionLogps, runtime: Runtime, compute_dtype: Optional[torch.dtype] = None,
          offload: bool = False) -> CompletionLogps:
    """``fully_shard`` each decoder layer of ``scorer.model``, then ``scorer`` itself (the root), in place.
    ``offload``: shards, gradients and so the optimizer state in host memory (pinned on CUDA, for
    asynchronous copies)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    mixed = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
             if compute_dtype not in (None, torch.float32) else MixedPrecisionPolicy())
    policy = CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda") if offload else OffloadPolicy()
    for module in [*decoder_layers(scorer.model), scorer]:  # the layers first: the root takes what is left
        fully_shard(module, mesh=mesh, mp_policy=mixed, offload_policy=policy)
    return scorer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes transformers declares unsplittable
    (``_no_split_modules``), else the entries of the body's largest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in backbone_and_head(model)[0].modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len, default=[]))


def wrap(scorer: CompletionLogps, parallel: str, runtime: Runtime, compute_dtype: torch.dtype,
         offload: bool = False) -> nn.Module:
    """What the loop calls for the policy's log-probs: ``scorer`` in one process, else DDP or FSDP."""
    if not runtime.distributed:
        return scorer
    if parallel == "fsdp":
        return shard(scorer, runtime, compute_dtype, offload)
    return DistributedDataParallel(scorer)


@contextlib.contextmanager
def accumulating(model: nn.Module, active: bool) -> Iterator[None]:
    """While ``active`` (every micro-batch of a step but the last), backward passes accumulate gradients.

    DDP accumulates locally (``no_sync``) and all-reduces the sum once, after the last micro-batch. FSDP
    reduce-scatters every micro-batch instead and accumulates the *sharded* gradients: with its sync
    turned off it would keep an unsharded float32 gradient of every parameter between micro-batches
    (~32 GB per GPU for an 8B model), more than the whole sharded training state. The sum of the shards of
    each micro-batch's reduced gradient is the shard of the reduced sum."""
    with model.no_sync() if active and isinstance(model, DistributedDataParallel) else contextlib.nullcontext():
        yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm (over all ranks' shards under FSDP); the norm as a plain tensor."""
    return collectives.full_tensor(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# --- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, state: ckpt.TrainingState,
                    keep: int, runtime: Runtime) -> None:
    """Called on every rank: rank 0 writes an unsharded model's, every rank its shard of a sharded one."""
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
    weights, moments = _local_slices(model, optimizer, rank)
    try:
        _save_slices(weights, staging / f"trainable-rank{rank}.safetensors")
        _save_slices(moments, staging / f"optimizer-rank{rank}.safetensors")
    except ckpt.WRITE_ERRORS as error:
        raise ckpt.save_error(final, error) from error
    # A rank that failed to write raises above and never arrives here: torchrun then stops the job and
    # the staging directory stays hidden, never a checkpoint.
    collectives.barrier()
    if runtime.is_main:
        try:
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            torch.save(ckpt.rng_state(), staging / "rng.pt")
            groups = optimizer.state_dict()["param_groups"]  # plain numbers and flags: JSON holds them
            (staging / "state.json").write_text(json.dumps({**asdict(state), "world_size": runtime.world_size,
                                                            "param_groups": groups}))
            ckpt.seal(staging, final)
        except ckpt.WRITE_ERRORS as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise ckpt.save_error(final, error) from error
        for old in ckpt.list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


Slices = dict[str, tuple[torch.Tensor, list[int]]]  # name -> (this rank's slice, where it starts in the whole)


def _local_slices(model: nn.Module, optimizer, rank: int) -> tuple[Slices, Slices]:
    """This rank's slice of every trainable weight and of its optimizer state (``NAME.exp_avg``, ...),
    each with its offset in the whole tensor. The step counts, equal on every rank, come from rank 0."""
    weights, moments = {}, {}
    for name, p in trainable(model):
        offsets = list(p.__create_chunk_list__()[0].offsets)  # the chunk protocol DCP itself uses
        weights[name] = (p.detach().to_local(), offsets)
        for key, value in optimizer.state.get(p, {}).items():
            if value.dim() > 0:
                moments[f"{name}.{key}"] = (value.to_local(), offsets)
            elif rank == 0:
                moments[f"{name}.{key}"] = (value, [])
    return weights, moments


def _save_slices(slices: Slices, path: Path) -> None:
    """A safetensors file of slices, their offsets in its header where DCP's HuggingFaceStorageReader
    looks for them (JSON, like the rest of the header)."""
    # an empty slice (more ranks than rows) holds nothing, and its offset could be a real slice's
    slices = {name: (tensor, offset) for name, (tensor, offset) in slices.items() if tensor.numel() > 0}
    offsets = {name: {SAVED_OFFSETS_KEY: offset} for name, (_, offset) in slices.items()}
    save_file({name: tensor.detach().cpu().contiguous() for name, (tensor, _) in slices.items()}, path,
              metadata={CUSTOM_METADATA_KEY: json.dumps(offsets)})


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer, scheduler) -> ckpt.TrainingState:
    """Called on every rank: restore a checkpoint that any number of processes wrote, sharded or not,
    into this run's model, sharded or not (see the module docstring)."""
    ckpt.verify(checkpoint)
    whole = (checkpoint / "trainable.safetensors").is_file()  # written by one process (or DDP's rank 0)
    if whole and not is_sharded(model):
        return ckpt.load_checkpoint(checkpoint, model, optimizer, scheduler)
    params = dict(trainable(model))
    if whole:  # a checkpoint one process wrote fits one host: read it whole, keep this rank's slices
        saved, groups = _whole_state(checkpoint, optimizer, params)
        targets = _targets(checkpoint, {key: tuple(value.shape) for key, value in saved.items()}, params)
        with torch.no_grad():
            for key, target in targets.items():
                _copy_slice(saved[key], target)
    else:
        targets = _targets(checkpoint, _shard_keys(checkpoint), params)
        _read_slices(checkpoint, targets)
        groups = json.loads((checkpoint / "state.json").read_text())["param_groups"]
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state: dict[int, dict] = {}
    for key, value in targets.items():
        if key not in params:  # NAME.step, NAME.exp_avg, ...: the optimizer's state of weight NAME
            name, _, entry = key.rpartition(".")
            state.setdefault(index[id(params[name])], {})[entry] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(ckpt.read_tensors(checkpoint / "scheduler.pt"))
    ckpt.set_rng_state(ckpt.read_tensors(checkpoint / "rng.pt"))
    return ckpt.TrainingState(**ckpt.saved_state(checkpoint))


def _whole_state(checkpoint: Path, optimizer, params: dict[str, nn.Parameter]) -> tuple[dict, list]:
    """An unsharded checkpoint's weights and optimizer state by name (``NAME``, ``NAME.exp_avg``, ...),
    and its optimizer's param_groups."""
    saved = load_file(checkpoint / "trainable.safetensors")
    optimizer_state = ckpt.read_tensors(checkpoint / "optimizer.pt")
    names = {id(p): name for name, p in params.items()}
    order = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    for index, entries in optimizer_state["state"].items():
        if index >= len(order) or order[index] is None:
            raise ckpt.CheckpointError(f"{checkpoint / 'optimizer.pt'}: state for parameter {index}, which this "
                                       f"model's optimizer does not have")
        saved.update({f"{order[index]}.{key}": value for key, value in entries.items()})
    return saved, optimizer_state["param_groups"]


def _shard_keys(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Name -> whole shape of every tensor in a sharded checkpoint, from the files' headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(checkpoint.glob("*-rank*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            offsets = json.loads(handle.metadata()[CUSTOM_METADATA_KEY])
            for key in handle.keys():
                end = [o + n for o, n in zip(offsets[key][SAVED_OFFSETS_KEY], handle.get_slice(key).get_shape())]
                shapes[key] = tuple(max(pair) for pair in zip(shapes.get(key, end), end))
    return shapes


def _targets(checkpoint: Path, shapes: dict[str, tuple[int, ...]],
             params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Where each saved tensor goes: a weight into its parameter (this rank's shard of it, in place), an
    optimizer state entry into a new tensor laid out like its parameter (a 0-d one for step counts)."""
    missing = sorted(set(params) - set(shapes))
    if missing:
        raise ckpt.CheckpointError(f"{checkpoint}: no saved weights for {missing[:3]}; it is not a checkpoint "
                                   f"of this model")
    targets = {}
    for key, shape in shapes.items():
        name = key if key in params else key.rpartition(".")[0]
        if name not in params or shape != tuple(params[name].shape) and (key in params or shape != ()):
            raise ckpt.CheckpointError(f"{checkpoint}: {key} {list(shape)} fits no trainable weight of this model")
        param = params[name].detach()
        targets[key] = param if key in params else torch.zeros_like(param) if shape else torch.zeros(())
    return targets


def _read_slices(checkpoint: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` (whole tensors or DTensors) in place from a sharded checkpoint, whatever number
    of ranks wrote it, with no file unpickled (see the module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:  # no_dist: every rank plans its own reads; they need nothing from one another
        with warnings.catch_warnings():  # ... which DCP warns of, as if it could be a mistake
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(checkpoint)), no_dist=True)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise ckpt.CheckpointError(f"{checkpoint}: its shards do not fit this model "
                                   f"({' '.join(str(error).split())[:300]})") from None


def _copy_slice(whole: torch.Tensor, target: torch.Tensor) -> None:
    """Copy into ``target`` its part of ``whole`` (shaped alike: :func:`_targets` made it so): all of it, or
    a DTensor's local chunk."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        target.copy_(whole)
        return
    chunk = target.__create_chunk_list__()[0]
    target.to_local().copy_(whole[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))])


def adapter_weights(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Called on every rank: a sharded peft model's adapter weights, gathered whole (small: the base's
    weights are never gathered); None for any other model."""
    if not (is_sharded(model) and hasattr(model, "peft_config")):
        return None
    return {name: collectives.full_tensor(p.detach()).cpu() for name, p in trainable(model)}


def save_final(out: Path, model: nn.Module, tokenizer, dtype: torch.dtype, runtime: Runtime) -> None:
    """Called on every rank, for a sharded model: ``final/`` as :func:`checkpoint.save_final` writes it, one
    weight at a time (see the module docstring), every rank joining each gather in the same order."""
    names = set(model.state_dict())  # persistent buffers too; without tied duplicates (named_* drop them)
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if name in names}
    specs = {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()}

    def gathered() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors.items():
            yield name, collectives.full_tensor(tensor.detach()).to("cpu", specs[name][1])

    if runtime.is_main:
        ckpt.save_streamed(out / "final", model, tokenizer, dtype, specs, gathered())
    else:
        for _ in gathered():
            pass
