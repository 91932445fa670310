"""The reference policy pi_ref behind one small interface: ``reference(batch) -> (logps, counts) | None``.

Strategies (``--ref-mode``):

``online``        a frozen model (no grad, eval mode) run on every batch: the policy's starting weights
                  loaded a second time, or the model named by ``--ref``.
``precompute``    one no-grad pass over the data before training (or a cache hit: see refcache.py); each
                  batch then reads its pairs' rows of the table. The reference forward is paid once per
                  dataset instead of once per step and epoch, and no second model stays in memory.
``adapters-off``  with LoRA, the policy itself with its adapters disabled: the same base weights, no
                  second copy in memory. Chosen by ``auto`` under LoRA with no ``--ref`` when the run is
                  shorter than an epoch (else ``precompute``).
``none``          reference-free losses (SimPO, ORPO): nothing is loaded or run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from tiltlm.data.collate import Batch
from tiltlm.data.types import TokenizedPair
from tiltlm.logprobs import CompletionLogps
from tiltlm.refcache import cached_reference_table, lookup_reference

Reference = Callable[[Batch], Optional[tuple[Tensor, Tensor]]]
Collate = Callable[[list[TokenizedPair]], Batch]


def choose_mode(ref_mode: str, lora: bool, ref_model: str | None, reference_free: bool,
                covers_data: bool = False) -> str:
    """Resolve ``auto``: none for reference-free losses; precompute when the run scores every pair at
    least once (``covers_data``: a full epoch or more), since it then never does more reference work than
    an online reference; else adapters-off under LoRA, else online."""
    if ref_mode != "auto":
        return ref_mode
    if reference_free:
        return "none"
    if covers_data:
        return "precompute"
    if lora and ref_model is None:
        return "adapters-off"
    return "online"


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring grad."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode (no LoRA dropout), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def online_reference(model: nn.Module, chunk_size: int) -> Reference:
    scorer = CompletionLogps(frozen(model), chunk_size)

    @torch.no_grad()
    def reference(batch: Batch) -> tuple[Tensor, Tensor]:
        return scorer(batch)

    return reference


def adapters_off_reference(peft_model: nn.Module, chunk_size: int) -> Reference:
    scorer = CompletionLogps(peft_model, chunk_size)

    @torch.no_grad()
    def reference(batch: Batch) -> tuple[Tensor, Tensor]:
        with peft_model.disable_adapter(), eval_mode(peft_model):
            return scorer(batch)

    return reference


def no_reference(batch: Batch) -> None:
    return None


def precomputed_reference(model: nn.Module, tokenizer, pairs: Sequence[TokenizedPair], collate: Collate,
                          batch_size: int, device: torch.device, chunk_size: int, cache_dir: str | None = None,
                          extra: dict | None = None, name: str = "data", log=print) -> Reference:
    """The reference's log-probs of every pair of ``pairs``, from the cache or one pass, behind the
    reference interface (batches must carry ``Batch.indices``). ``model`` is the reference itself, or a
    peft model whose adapters are switched off for the pass."""
    peft = hasattr(model, "disable_adapter")
    scorer = adapters_off_reference(model, chunk_size) if peft else CompletionLogps(model, chunk_size)
    started = time.perf_counter()
    table, path, hit = cached_reference_table(model, tokenizer, pairs, collate, batch_size, device, chunk_size,
                                              cache_dir, name=name, extra=extra, scorer=scorer)
    how = "read" if hit else f"computed in {time.perf_counter() - started:.1f} s and saved"
    log(f"reference log-probs of {len(pairs)} pairs ({name}): {how}: {path}")
    return lookup_reference(table)
