"""Checkpoints that are either whole or ignored, and resume that reaches the same weights.

A checkpoint ``OUTPUT/checkpoints/step-N/`` holds the trainable weights (safetensors), the optimizer and
scheduler states and the RNG states (``torch.save``, read back with ``weights_only=True``: no pickle
from a file is ever executed), ``state.json`` (step and pairs per step; the data position follows from
them, since the data order is a function of seed and epoch) and, written last, ``manifest.json`` with the
SHA-256 of every file. It is written in a hidden temporary directory and renamed into place, so a crash
mid-save leaves the previous checkpoints as they were and no ``step-N`` directory without a manifest.
This module writes and reads one process's checkpoints; distributed.py the sharded ones (the same
staging, seal and manifest) and either into any layout.

Model directories (``final/``, ``merged/``) are written atomically too: by ``save_pretrained``, or under
FSDP by :func:`save_streamed`, which writes each weight as it arrives.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tiltlm.models import canonical_name, save_options

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted, naming the file."""


class SaveError(OSError):
    """A checkpoint or model directory that could not be written (full disk, I/O error), naming it."""


# What writers raise when the disk fails them: Python's OSError, torch.save's RuntimeError, safetensors'.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class TrainingState:
    step: int
    pairs_per_step: int | None = None  # batch_size x grad_accum x processes; None in older checkpoints


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    """This process's random states: the CPU's, Python's, and its own GPU's only (a rank's device is
    the current one), so a resume that sees a different number of GPUs still restores."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda if cuda.dim() == 1 else cuda[0])  # [devices, n]: an older checkpoint


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, write) -> None:
    """Call ``write(tmp_dir)``, then :func:`seal` it as ``final``. If writing fails (a full disk, say),
    the temporary directory is removed, nothing else changes, and a :class:`SaveError` names ``final``."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        seal(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, WRITE_ERRORS):
            raise save_error(final, error) from error
        raise


def seal(tmp: Path, final: Path) -> None:
    """Add a manifest of the checksums of ``tmp``'s files, flush everything to disk, rename ``tmp`` to
    ``final``: a reader finds either the whole directory or none."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): sha256(p) for p in files}
    for path in files:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_directory(tmp)
    if final.exists():  # re-saving a step after a resume from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_directory(final.parent)


def save_error(final: Path, error: BaseException) -> "SaveError":
    """A one-line error naming what could not be written, with the free space: torch.save reports a
    full disk only as "unexpected pos ..."."""
    try:
        free = f"{shutil.disk_usage(final.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    message = " ".join(str(error).split())
    return SaveError(f"could not write {final} ({type(error).__name__}: {message}; {free}); "
                     f"earlier checkpoints are unchanged")


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, state: TrainingState,
                    keep: int) -> Path:
    """Write ``directory/step-N`` atomically and delete all but the newest ``keep`` checkpoints."""
    final = directory / f"step-{state.step}"

    def write(tmp: Path) -> None:
        trainable = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))

    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(final, write)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """``step-N`` directories, oldest first (hidden temporary directories are not checkpoints)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def verify(checkpoint: Path) -> None:
    """Raise CheckpointError naming the first missing or altered file."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{checkpoint}: no {MANIFEST}; the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({error})") from None
    for name, digest in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch; the file is corrupted")


def latest_checkpoint(directory: Path, allow_fallback: bool = False, log=print) -> Path | None:
    """The newest intact checkpoint. A corrupted newest one is an error unless ``allow_fallback``."""
    for hidden in directory.glob(".step-*.tmp-*") if directory.is_dir() else []:
        log(f"ignoring {hidden}: a checkpoint that was being written when the run stopped")
    for checkpoint in reversed(list_checkpoints(directory)):
        try:
            verify(checkpoint)
            return checkpoint
        except CheckpointError as error:
            if not allow_fallback:
                raise CheckpointError(f"{error}\n(resume_fallback=true resumes from the newest intact "
                                      f"checkpoint instead)") from None
            log(f"skipping {checkpoint.name}: {error}")
    return None


def read_tensors(path: Path):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only. A file that needs
    anything else (a pickle that could run code) is refused with a CheckpointError naming it."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain data, and "
                              f"loading them could run code ({' '.join(str(error).split())[:200]})") from None


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer, scheduler) -> TrainingState:
    """Restore weights, optimizer, scheduler and RNG from a verified checkpoint."""
    verify(checkpoint)
    weights = load_file(checkpoint / "trainable.safetensors")
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    missing = sorted({name for name, p in model.named_parameters() if p.requires_grad} - set(weights))
    if unexpected or missing:
        raise CheckpointError(f"{checkpoint}: its weights do not match this model "
                              f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
    optimizer.load_state_dict(read_tensors(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(read_tensors(checkpoint / "scheduler.pt"))
    set_rng_state(read_tensors(checkpoint / "rng.pt"))
    return TrainingState(**saved_state(checkpoint))


def saved_state(checkpoint: Path) -> dict:
    """The :class:`TrainingState` fields of a checkpoint's ``state.json``."""
    state = json.loads((checkpoint / "state.json").read_text())
    return {field.name: state[field.name] for field in fields(TrainingState) if field.name in state}


# --- model directories ---------------------------------------------------------------------------------


def save_pretrained_atomically(directory: Path, model, tokenizer, weights: dict | None = None,
                               dtype: torch.dtype | None = None) -> None:
    """``model.save_pretrained`` (safetensors) and the tokenizer into ``directory``, atomically.
    ``weights``: the state dict to save instead of the model's own (cast); ``dtype``: what config.json
    then says they are (transformers writes the dtype of the model in memory)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights, **save_options(model))
        tokenizer.save_pretrained(tmp)
        if dtype is not None:
            _declare_dtype(tmp, dtype)

    write_atomically(directory, write)


def _declare_dtype(directory: Path, dtype: torch.dtype) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(out: Path, policy, tokenizer, base_model: str, dtype: torch.dtype, merge_lora: bool = False,
               adapter_weights: dict[str, torch.Tensor] | None = None) -> None:
    """``final/``: a transformers model directory in ``dtype`` (the dtype of the checkpoint the run
    started from: float32 master weights are a training device, not a format change), or with LoRA a peft
    adapter directory (and with ``merge_lora`` also ``merged/``, the adapters folded into the base
    weights, in ``dtype``). ``adapter_weights``: a sharded peft policy's adapters, gathered whole; a sharded
    policy without adapters goes through :func:`save_streamed` instead."""
    for config in getattr(policy, "peft_config", {}).values():
        config.base_model_name_or_path = canonical_name(base_model)  # an alias stays one; a path, absolute
    peft = hasattr(policy, "peft_config")
    weights = adapter_weights if peft else cast(policy.state_dict(), dtype)
    save_pretrained_atomically(out / "final", policy, tokenizer, weights, None if peft else dtype)
    if merge_lora and peft:
        merged = policy.merge_and_unload()
        save_pretrained_atomically(out / "merged", merged, tokenizer, cast(merged.state_dict(), dtype), dtype)


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors of ``state`` in ``dtype`` (tensors already in it stay the same objects, so
    tied weights stay tied)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


# --- model directories written one tensor at a time ------------------------------------------------------

SHARD_BYTES = 5 * 10**9  # the largest weights file of a streamed model directory
INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), in the order they come


def save_streamed(directory: Path, model, tokenizer, dtype: torch.dtype, specs: Specs,
                  tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """A transformers model directory, atomically, whose weights arrive one at a time from ``tensors``
    (in the order of ``specs``) and are written as they come: memory holds one tensor, never the model.
    The layout is save_pretrained's: ``model.safetensors``, or past :data:`SHARD_BYTES`
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``; config.json says ``dtype``."""
    shards = _plan_shards(specs)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])

    def write(tmp: Path) -> None:
        for file, names in zip(files, shards):
            _write_safetensors(tmp / file, {name: specs[name] for name in names}, tensors)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(*spec) for spec in specs.values())},
                     "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        _declare_dtype(tmp, dtype)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_atomically(directory, write)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _plan_shards(specs: Specs) -> list[list[str]]:
    """Consecutive names in files of at most SHARD_BYTES each (a larger tensor alone in its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + _nbytes(*spec) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(*spec)
    return shards


def _write_safetensors(path: Path, specs: Specs, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file: its header (known from the shapes alone), then each tensor's bytes as it
    arrives from ``tensors``."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + _nbytes(shape, dtype)]}
        offset += _nbytes(shape, dtype)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, (shape, dtype) in specs.items():
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"{path}: expected {name} {shape} {dtype}, got {got} {tuple(tensor.shape)} "
                                 f"{tensor.dtype}")
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as on disk
