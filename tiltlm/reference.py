"""The reference policy pi_ref behind one small interface: ``reference(batch) -> (logps, counts) | None``.

Strategies (``--ref-mode``):

``online``        a frozen model (no grad, eval mode) run on every batch: the policy's starting weights
                  loaded a second time, or the model named by ``--ref``.
``adapters-off``  with LoRA, the policy itself with its adapters disabled: the same base weights, no
                  second copy in memory. Chosen by ``auto`` whenever LoRA is on and no ``--ref`` is given.
``none``          reference-free losses (SimPO, ORPO): nothing is loaded or run.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from tiltlm.data.collate import Batch
from tiltlm.logprobs import CompletionLogps

Reference = Callable[[Batch], Optional[tuple[Tensor, Tensor]]]


def choose_mode(ref_mode: str, lora: bool, ref_model: str | None, reference_free: bool) -> str:
    """Resolve ``auto``: none for reference-free losses, adapters-off under LoRA, else online."""
    if ref_mode != "auto":
        return ref_mode
    if reference_free:
        return "none"
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
