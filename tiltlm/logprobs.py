"""Completion log-probabilities: hidden states -> summed log pi(y|x) per sequence, and token counts.

A causal LM's logits are ``hidden @ W_vocab.T``; at float32 the full [batch, length, vocab] tensor of a
DPO step is gigabytes (8 pairs x 2 x 512 positions x 49k vocab = 1.6 GB), and most of it belongs to
prompt and padding positions whose log-probs DPO never uses. So we:

1. gather the hidden states at the positions whose next token is a completion token (nothing else
   is ever projected to the vocabulary);
2. project them in chunks of ``chunk_size`` positions, log-softmax in float32, pick the target
   token's log-prob, and
3. wrap each chunk in activation checkpointing, so the chunk's logits are freed after the forward
   and recomputed in the backward: the logits (and their gradient) never exist beyond one chunk.

Where positions sit is described by a :class:`~tiltlm.data.collate.Batch` (``target_rows``,
``target_cols``, ``target_ids``, ``target_seq``), so the same function serves every batch layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tiltlm.data.collate import Batch


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] in float32, one value per row: ``logit[t] - logsumexp(logits)``."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
             softcap: float | None, scale: float | None) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    if scale is not None:  # Cohere-style models multiply their logits by a constant
        logits = logits * scale
    if softcap is not None:  # Gemma-2/3: logits = cap * tanh(logits / cap)
        logits = softcap * torch.tanh(logits.float() / softcap)
    return token_logps(logits, targets)


def chunked_token_logps(hidden: Tensor, head: nn.Linear, targets: Tensor, chunk_size: int = 1024,
                        softcap: float | None = None, scale: float | None = None) -> Tensor:
    """log pi(target | prefix) for each row of ``hidden`` ([M, H]), projecting ``chunk_size`` rows at a time.

    Peak memory for logits is ``chunk_size x vocab`` floats in the forward and in the backward,
    whatever M is.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start:start + chunk_size], head.weight, head.bias, targets[start:start + chunk_size],
                softcap, scale)
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            pieces.append(checkpoint(_project, *args, use_reentrant=False))
        else:
            pieces.append(_project(*args))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def per_sequence(values: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Sum per-token values into their sequences: (sums [2P], token counts [2P]).

    Sequences ``0..P-1`` are the chosen completions of pairs ``0..P-1``, ``P..2P-1`` the rejected.
    """
    sequences = 2 * batch.num_pairs
    sums = torch.zeros(sequences, dtype=torch.float32, device=values.device).index_add(0, batch.target_seq, values)
    counts = torch.bincount(batch.target_seq, minlength=sequences)
    return sums, counts


def logit_modifiers(config) -> tuple[float | None, float | None]:
    """(final logit softcap, logit scale) of a model config, for the architectures that have them."""
    return getattr(config, "final_logit_softcapping", None), getattr(config, "logit_scale", None)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The transformer body (input ids -> last hidden states) and the vocabulary projection of a
    causal LM, also when it is wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class CompletionLogps(nn.Module):
    """Policy forward for DPO: a :class:`Batch` in, summed completion log-probs and counts out.

    An ``nn.Module`` so that DistributedDataParallel can wrap it (DDP synchronises the gradients of
    what runs inside its ``forward``).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        backbone, head = backbone_and_head(self.model)
        hidden = backbone(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False,
        ).last_hidden_state
        selected = hidden[batch.target_rows, batch.target_cols]
        softcap, scale = logit_modifiers(self.model.config)
        values = chunked_token_logps(selected, head, batch.target_ids, self.chunk_size, softcap, scale)
        return per_sequence(values, batch)


def naive_sequence_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """The textbook computation, for tests and the benchmark's baseline: full float32 logits at every
    position, log-softmax, gather, mask, sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits.float()
    all_logps = torch.log_softmax(logits, dim=-1)
    values = all_logps[batch.target_rows, batch.target_cols].gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    return per_sequence(values, batch)


def sequence_logps(model: nn.Module, batch: Batch, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed log pi(completion | prompt) for every sequence of ``batch`` and its completion token count."""
    return CompletionLogps(model, chunk_size)(batch)
