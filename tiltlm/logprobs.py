"""Completion log-probabilities: hidden states -> summed log pi(y|x) per sequence, and token counts.

A causal LM's logits are ``hidden @ W_vocab.T``; at float32 the full [batch, length, vocab] tensor of a
DPO step is gigabytes (8 pairs x 2 x 512 positions x 49k vocab = 1.6 GB), and most of it belongs to
prompt and padding positions whose log-probs DPO never uses. So we:

1. gather the hidden states at the positions whose next token is a completion token (nothing else
   is ever projected to the vocabulary);
2. project them in chunks of ``chunk_size`` positions, log-softmax in float32 and pick the target
   token's log-prob, keeping only each row's log-sum-exp;
3. in the backward, recompute each chunk's logits and turn them into their gradient in place, from the
   closed form ``d log p_t / d z = onehot(t) - softmax(z)``: neither the logits nor their gradient ever
   exist beyond one chunk, and no vocabulary-wide pass is spent on autograd's generic path.

Where positions sit is described by a :class:`~tiltlm.data.collate.Batch` (``target_rows``,
``target_cols``, ``target_ids``, ``target_seq``), so the same function serves every batch layout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tiltlm import attention
from tiltlm.data.collate import Batch


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target], one value per row: ``logit[t] - logsumexp(logits)``, in float32
    (float64 stays float64)."""
    logits = logits.to(_exact_dtype(logits))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
             softcap: float | None, scale: float | None) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    if scale is not None:  # Cohere-style models multiply their logits by a constant
        logits = logits * scale
    if softcap is not None:  # Gemma-2/3: logits = cap * tanh(logits / cap)
        logits = softcap * torch.tanh(logits.float() / softcap)
    return token_logps(logits, targets)


def _exact_dtype(weight: Tensor) -> torch.dtype:
    """float32 for the softmax of half-precision and float32 heads; float64 stays float64 (tests)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor) -> Tensor:
    """``hidden @ weight.T + bias`` in the exact dtype, written into the first rows of ``buffer`` when the
    dtypes allow: one chunk-sized buffer serves every chunk of a call, so the allocator does not map
    and zero fresh pages for each chunk (on CPU that page-fault time rivalled the matmul's)."""
    same = hidden.dtype == weight.dtype == buffer.dtype and not torch.is_autocast_enabled(hidden.device.type)
    if not same:
        return F.linear(hidden, weight, bias).to(buffer.dtype)
    out = torch.matmul(hidden, weight.T, out=buffer[:hidden.shape[0]])
    return out.add_(bias) if bias is not None else out


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(hidden @ weight.T + bias)[target]`` per row, ``chunk`` rows at a time, in float32.

    Forward: per chunk, logits z = h W^T + b, then log p_t = z_t - logsumexp(z); only the log-sum-exp
    of each row is kept. Backward: with g the incoming gradient of log p_t, dL/dz = g (onehot(t) -
    softmax(z)) and softmax(z) = exp(z - logsumexp(z)), so one matmul recomputes z, one in-place exp pass
    makes dL/dz, and dL/dh = (dL/dz) W, dL/dW = (dL/dz)^T h, dL/db = sum of rows of dL/dz.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        rows, exact = hidden.shape[0], _exact_dtype(weight)
        logps = torch.empty(rows, dtype=exact, device=hidden.device)
        lse = torch.empty(rows, dtype=exact, device=hidden.device)
        buffer = torch.empty(min(chunk, rows), weight.shape[0], dtype=exact, device=hidden.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            logits = _logits(hidden[start:end], weight, bias, buffer)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            # log-sum-exp in place: the logits are not needed once it is known
            top = logits.amax(dim=1, keepdim=True)
            lse[start:end] = top.squeeze(1) + logits.sub_(top).exp_().sum(dim=1).log()
            logps[start:end] = picked - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        # the backward recomputes the logits, and must do so exactly as here: under the same autocast
        device = hidden.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        exact = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=exact) if need_bias else None
        buffer = torch.empty(min(ctx.chunk, hidden.shape[0]), weight.shape[0], dtype=exact, device=hidden.device)
        with torch.autocast(grad_logps.device.type, dtype=ctx.autocast, enabled=ctx.autocast is not None):
            for start in range(0, hidden.shape[0], ctx.chunk):
                end = min(start + ctx.chunk, hidden.shape[0])
                g = grad_logps[start:end, None].to(exact)
                # dL/dz = g * (onehot(t) - softmax(z)), built in place in the recomputed logits
                grad_z = _logits(hidden[start:end], weight, bias, buffer)
                grad_z.sub_(lse[start:end, None]).exp_().mul_(-g)
                grad_z.scatter_add_(1, targets[start:end, None], g)
                if need_hidden:
                    grad_hidden[start:end] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(grad_z.T, hidden[start:end].to(exact))
                if need_bias:
                    grad_bias.add_(grad_z.sum(dim=0))
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None)


def chunked_token_logps(hidden: Tensor, head: nn.Linear, targets: Tensor, chunk_size: int = 256,
                        softcap: float | None = None, scale: float | None = None) -> Tensor:
    """log pi(target | prefix) for each row of ``hidden`` ([M, H]), projecting ``chunk_size`` rows at a time.

    Memory for logits is ``chunk_size x vocab`` floats in the forward and in the backward, whatever M
    is (256 x 49,152 x 4 bytes = 50 MB for SmolLM2). Heads with a logit scale or softcap take the
    generic path: each chunk under activation checkpointing (same memory bound, autograd's gradient).
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if softcap is None and scale is None:
        return _ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    project = _project
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        project = functools.partial(checkpoint, _project, use_reentrant=False)
    return torch.cat([project(hidden[start:start + chunk_size], head.weight, head.bias,
                              targets[start:start + chunk_size], softcap, scale)
                      for start in range(0, hidden.shape[0], chunk_size)])


def per_sequence(values: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Sum per-token values into their sequences: (sums [2P], token counts [2P]). For pairs, sequences
    ``0..P-1`` are the chosen completions of pairs ``0..P-1``, ``P..2P-1`` the rejected; other batches
    number their sequences themselves (``Batch.num_sequences``)."""
    sequences = batch.sequences
    sums = torch.zeros(sequences, dtype=torch.float32, device=values.device).index_add(0, batch.target_seq, values)
    # index_add, not bincount: its output shape does not depend on the values, so the step also runs on
    # fake tensors (``tiltlm plan``) and under torch.compile
    counts = torch.zeros(sequences, dtype=torch.long, device=values.device).index_add(
        0, batch.target_seq, torch.ones_like(batch.target_seq))
    return sums, counts


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The transformer body (input ids -> last hidden states) and the vocabulary projection of a
    causal LM, also when it is wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def backbone_states(backbone: nn.Module, config, batch: Batch, dtype: torch.dtype) -> Tensor:
    """Last hidden states [rows, L', H] of a batch (L' >= L: FlexAttention pads rows to whole tiles).

    Under tiltlm's attention kernels the batch's segment metadata goes down to attention and no mask is
    built; other kernels get the dense mask of the same rule (:mod:`tiltlm.attention`), and so does the
    block kernel on batches whose rows are too short for blocks to pay off (``blocks_pay_off``)."""
    kernel = attention.kernel_of(config)
    if kernel in ("flex", "blocks"):
        multiple = attention.FLEX_MULTIPLE if kernel == "flex" else 1
        input_ids, position_ids, segments = attention.segments_of(batch, multiple)
        if kernel == "blocks" and batch.segment_ids is not None and not attention.blocks_pay_off(segments):
            kernel = "blocks-dense"  # the block kernel's plain path is SDPA: it takes the dense mask
    attention.log_layout(kernel, batch)
    if kernel in ("flex", "blocks"):
        with attention.segment_forward():
            return backbone(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False,
                            tiltlm_segments=segments).last_hidden_state
    mask = attention.dense_attention_mask(batch, config, "sdpa" if kernel == "blocks-dense" else kernel, dtype)
    return backbone(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                    use_cache=False).last_hidden_state


class CompletionLogps(nn.Module):
    """Policy forward for DPO: a :class:`Batch` in, summed completion log-probs and counts out. An
    ``nn.Module`` so that DistributedDataParallel can wrap it (DDP synchronises the gradients of what runs
    inside its ``forward``)."""

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        backbone, head = backbone_and_head(self.model)
        hidden = backbone_states(backbone, self.model.config, batch, head.weight.dtype)
        selected = hidden[batch.target_rows, batch.target_cols]
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        scale = getattr(self.model.config, "logit_scale", None)
        values = chunked_token_logps(selected, head, batch.target_ids, self.chunk_size, softcap, scale)
        return per_sequence(values, batch)


def naive_sequence_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """The textbook computation, for tests and the benchmark's baseline: full float32 logits at every
    position, log-softmax, gather, mask, sum."""
    mask = attention.dense_attention_mask(batch, model.config, "eager", model.dtype)
    logits = model(input_ids=batch.input_ids, attention_mask=mask,
                   position_ids=batch.position_ids, use_cache=False).logits.float()
    all_logps = torch.log_softmax(logits, dim=-1)
    values = all_logps[batch.target_rows, batch.target_cols].gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    return per_sequence(values, batch)


def sequence_logps(model: nn.Module, batch: Batch, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """Summed log pi(completion | prompt) for every sequence of ``batch`` and its completion token count."""
    return CompletionLogps(model, chunk_size)(batch)
