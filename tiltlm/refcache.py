"""Precomputed reference (``--ref-mode precompute``): score every pair with the reference once, before
training, keep the numbers on disk, and look them up instead of running the reference at every step.

The reference is frozen: an online one spends a no-grad forward per batch (a quarter of a step's compute)
recomputing the same numbers every epoch, and keeps a second copy of the weights. One pass (larger batches:
no activations kept) fills a float32 table ``[num_pairs, 4]``, row ``i`` for ``pairs[i]`` (``Batch.indices``)::

    column 0  summed log pi_ref(chosen | prompt)      column 2  chosen completion tokens
    column 1  summed log pi_ref(rejected | prompt)    column 3  rejected completion tokens

Ranked lists use width ``2 K``: column ``k`` is completion k's log-prob, ``K + k`` its token count (0 past a
shorter list's own: every kept completion has a token). A pair is a list of two, byte for byte, so the format
version did not change. Sequences are numbered as collates do: chosen of every pair then rejected, lists
one after another.

The cache: safetensors (nothing executed on load, unlike pickle) at ``<cache dir>/<fingerprint>.safetensors``,
the fingerprint a sha256 of everything the numbers depend on (:func:`reference_fingerprint`); the directory
is ``$TILTLM_CACHE/reference`` when set, else ``~/.cache/tiltlm/reference``, unless given.

Under torchrun each rank scores every ``world_size``-th pair and the shards are all-gathered (no shared file
system needed); rank 0 writes the file. A sharded (FSDP) reference is fingerprinted whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from tiltlm import collectives
from tiltlm.data.collate import Batch
from tiltlm.data.tokenize import completion_ids
from tiltlm.data.types import TokenizedPair
from tiltlm.logprobs import CompletionLogps
from tiltlm.models import eval_mode

FORMAT = "tiltlm-reference-v1"  # bump when the table's meaning changes: old files are then never read
TABLE = "reference"  # the tensor's name inside the safetensors file

Scorer = Callable[[Batch], tuple[Tensor, Tensor]]
Collate = Callable[[list[TokenizedPair]], Batch]


# --- fingerprints ----------------------------------------------------------------------------------


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes (bytes alone would let two layouts of the same
    bytes collide), and of the model's config.

    The tensors in memory, not the files on disk, because they are exactly what computes the numbers,
    whatever they were loaded from and in; hashing costs about what reading the files would (~0.3 s for
    SmolLM2-135M in float32, against minutes to hours for the pass it saves). The config enters because
    some settings change the outputs without touching a weight (rope scaling, logit softcapping)."""
    digest = hashlib.sha256()
    for name, tensor in reference_state(model):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():  # uint8 view: numpy has no bfloat16, and the bytes are what we hash anyway
            digest.update(memoryview(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # dropout rates are left out: the reference scores in eval mode, where they change nothing
        # (and the trainer zeroes them in the policy it may score the reference with)
        settings = {k: v for k, v in config.to_dict().items()
                    if k not in ("_name_or_path", "transformers_version", "_commit_hash")
                    and "dropout" not in k and "pdrop" not in k}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def reference_state(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """The state dict of the model that scores, with peft's wrapping undone: adapters left out and
    ``base_layer`` names read as the plain model's, so a base model and the same base under (disabled)
    adapters have one fingerprint, and a table computed before LoRA was added is found again by an
    evaluation of the adapter. A sharded (FSDP) model's tensors are gathered one at a time (every rank
    must iterate to the end)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, tensor in base.state_dict().items():
        if ".lora_" not in name:
            yield name.replace(".base_layer.", "."), collectives.full_tensor(tensor)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a fast tokenizer's full serialization (else its vocabulary), its special tokens and
    chat template. The numbers depend on the token ids only, which :func:`data_fingerprint` covers; this
    is a cheap second lock against a tokenizer swapped under an unchanged id list (a bug elsewhere)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest = hashlib.sha256(backend.to_str().encode() if backend is not None
                            else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {"special": getattr(tokenizer, "special_tokens_map", {}),
                "chat_template": getattr(tokenizer, "chat_template", None),
                "class": type(tokenizer).__name__}
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def data_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of the token ids of every pair (or ranked list), in order: whatever changes what the model
    scores (data, template, length limits) changes them. Lengths are hashed too, so ``[1, 2] + [3]`` and
    ``[1] + [2, 3]`` differ, and so is the number of parts of a row that is not a pair."""
    digest = hashlib.sha256()
    for pair in pairs:
        parts = (pair.prompt_ids, *completion_ids(pair))
        if len(parts) != 3:
            digest.update(torch.tensor([-len(parts)], dtype=torch.int64).numpy().tobytes())
        digest.update(torch.tensor([len(part) for part in parts], dtype=torch.int64).numpy().tobytes())
        digest.update(torch.tensor([t for part in parts for t in part], dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def reference_fingerprint(model: nn.Module, tokenizer, pairs: Sequence[TokenizedPair],
                          extra: dict[str, Any] | None = None) -> str:
    """The cache key: sha256 over the format version, the weights, the tokenizer, the data and ``extra``
    (anything else the caller knows to matter, e.g. an autocast dtype)."""
    parts = {"format": FORMAT, "weights": weights_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
             "data": data_fingerprint(pairs), "extra": extra or {}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("TILTLM_CACHE")
    return Path(root).expanduser() / "reference" if root else Path.home() / ".cache" / "tiltlm" / "reference"


# --- computing the table -----------------------------------------------------------------------------


def width_of(examples: Sequence) -> int:
    return 2 * max((len(completion_ids(e)) for e in examples), default=2)


def sequence_slots(batch: Batch, examples: Sequence) -> tuple[list[int], list[int]]:
    """For each sequence of ``batch`` (of ``examples``, or their table rows), which example it belongs to and
    which completion of it: the collate's numbering (module docstring), for the table's writer and reader."""
    counts = getattr(batch, "counts", ())
    if not counts:  # pairs: chosen of every pair, then rejected
        n = len(examples)
        return [s % n for s in range(2 * n)], [s // n for s in range(2 * n)]
    return [j for j, k in enumerate(counts) for _ in range(k)], [i for k in counts for i in range(k)]


@torch.no_grad()
def precompute_reference(scorer: Scorer, pairs: Sequence[TokenizedPair], collate: Collate, batch_size: int,
                         device: torch.device | str = "cpu", progress: bool = True) -> Tensor:
    """The table of :mod:`this module <tiltlm.refcache>`, on the CPU, ``scorer`` mapping a Batch to (summed
    log-probs, token counts) per sequence. Examples are scored in order of length (little padding, tight
    packing); under torchrun each rank scores every ``world_size``-th of that order (similar work)."""
    rank, world = collectives.world()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + sum(map(len, completion_ids(pairs[i]))))
    mine = order[rank::world]
    width = width_of(pairs)
    rows = torch.zeros(len(mine), width, dtype=torch.float32)
    # Every rank runs as many forwards as rank 0, which has the most examples: a sharded (FSDP) forward is a
    # collective. A rank out of examples scores the first one again and drops its row.
    starts = range(0, len(order[::world]), batch_size)
    for start in tqdm(starts, desc="reference", disable=not progress or rank != 0, leave=False):
        chunk = [pairs[i] for i in mine[start:start + batch_size]]
        batch = collate(chunk or [pairs[order[0]]])
        logps, counts = scorer(batch.to(device))
        if not chunk:
            continue
        example, completion = (torch.tensor(v, dtype=torch.long) for v in sequence_slots(batch, chunk))
        rows[start + example, completion] = logps.float().cpu()
        rows[start + example, width // 2 + completion] = counts.float().cpu()
    table = torch.zeros(len(pairs), width, dtype=torch.float32)
    shards = collectives.gather_rows(rows, width=-(-len(pairs) // world))  # ranks differ by <= 1 row
    for r, shard in enumerate(shards):
        theirs = order[r::world]
        table[theirs] = shard[:len(theirs)]
    return table


def save_table(path: Path, table: Tensor, metadata: dict[str, str]) -> None:
    """Write ``table`` to ``path`` through a temporary file renamed into place, so a crash or a concurrent
    reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file({TABLE: table.contiguous()}, tmp, metadata={"format": FORMAT, **metadata})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_table(path: Path, num_pairs: int, width: int = 4) -> Tensor | None:
    """The table stored at ``path``, or None (the caller recomputes) when there is none or it does not fit."""
    try:
        table = load_file(str(path))[TABLE]
    except Exception:  # a missing, truncated or foreign file is a cache miss, not an error
        return None
    return table if table.shape == (num_pairs, width) and table.dtype == torch.float32 else None


def cached_reference_table(model: nn.Module, tokenizer, pairs: Sequence[TokenizedPair], collate: Collate,
                           batch_size: int, device: torch.device | str = "cpu", chunk_size: int = 1024,
                           cache_dir: str | Path | None = None, name: str = "",
                           extra: dict[str, Any] | None = None, progress: bool = True,
                           scorer: Optional[Scorer] = None) -> tuple[Tensor, Path, bool]:
    """``(table, cache file, hit)``: the reference table of ``pairs``, read from the cache or computed and
    written. ``model`` is the frozen reference (fingerprinted); ``scorer`` defaults to
    ``CompletionLogps(model, chunk_size)``; ``name`` only goes into the file's metadata. Under torchrun
    every rank calls this."""
    key = reference_fingerprint(model, tokenizer, pairs, extra)
    path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / f"{key}.safetensors"
    table = load_table(path, len(pairs), width_of(pairs))
    if collectives.every_rank(table is not None):  # all read the file, or all take part in computing it
        return table, path, True
    scorer = scorer if scorer is not None else CompletionLogps(model, chunk_size)
    with eval_mode(model):
        table = precompute_reference(scorer, pairs, collate, batch_size, device, progress)
    if collectives.world()[0] == 0:
        save_table(path, table, {"model": name, "pairs": str(len(pairs))})
    collectives.barrier()  # the file exists before any rank goes on (a later run may read it at once)
    return table, path, False


# --- using the table ---------------------------------------------------------------------------------


def lookup_reference(table: Tensor) -> Callable[..., tuple[Tensor, Tensor]]:
    """A reference that reads the table instead of running a model: ``reference(batch, indices=None) ->
    (logps, counts)`` per sequence of the batch, in its numbering, on its device (counts int64, like
    ``torch.bincount``'s); ``indices``, the batch's examples' rows, default to ``batch.indices``."""
    half = table.shape[1] // 2
    logps_table = table[:, :half].contiguous()
    counts_table = table[:, half:].round().long()

    def reference(batch: Batch, indices: Iterable[int] | None = None) -> tuple[Tensor, Tensor]:
        indices = indices if indices is not None else getattr(batch, "indices", None)
        if indices is None or len(tuple(indices)) != batch.num_pairs:
            raise ValueError(f"precomputed reference: the batch holds {batch.num_pairs} pairs but says which "
                             f"ones by {indices!r}; set Batch.indices to the pairs' positions in the data")
        rows = torch.as_tensor(tuple(indices), dtype=torch.long)
        example, completion = (torch.tensor(v, dtype=torch.long) for v in sequence_slots(batch, rows))
        device = batch.input_ids.device
        return logps_table[rows[example], completion].to(device), counts_table[rows[example], completion].to(device)

    return reference
