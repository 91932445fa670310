"""Candidate optimisations of tiltlm, measured by the benchmark before they are proposed for the library.

Each candidate is a monkeypatch of one tiltlm function, applied in a benchmark process only
(``bench_step.py`` configurations whose name ends in ``+opt``); ``RESULTS.md`` gives the exact change
each one would make in tiltlm.

``fused-logprobs``
    The completion log-prob head as one autograd function with a hand-written backward, instead of
    ``checkpoint(linear -> logsumexp -> gather)``. The profile of tiltlm's current head shows the
    vocabulary-wide elementwise passes costing as much as the head's matmuls: logsumexp makes
    max/sub/exp/sum passes over the [chunk, vocab] logits, and in the backward the checkpoint replays
    all of them before autograd runs LogsumexpBackward (another exp) and GatherBackward (a zero-filled
    [chunk, vocab] tensor plus a scatter), holding four or five [chunk, vocab] tensors at once. The
    gradient of ``logp[t] = z[t] - logsumexp(z)`` is known in closed form,
    ``d logp / dz = onehot(t) - softmax(z)``, so the backward recomputes ``z`` (one matmul), turns it
    into ``g * (onehot - softmax)`` in place (one exp pass), and ends with two matmuls: one
    [chunk, vocab] buffer, and the log-sum-exp of each row is the only thing saved from the forward.
``mmap-threshold``
    ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` at start-up. glibc serves large allocations with mmap and
    returns them to the system on free, but after the first such free it raises its threshold (up to
    32 MiB) and serves later ones from its heap, which fragments and keeps the freed activations of
    every step resident: the process's RSS climbs far above what is live. A fixed threshold keeps
    tensors in mmap: RSS then follows the live memory. (Same effect: ``MALLOC_MMAP_THRESHOLD_=65536``
    in the environment.)
``float-mask``
    Hand the model an additive float mask (0 / -inf) instead of the boolean [rows, 1, L, L] mask of
    prefix-shared and packed batches. With a boolean mask, PyTorch's CPU SDPA converts it to a float
    mask inside every attention layer and saves that copy for the backward: one [rows, L, L] float32
    tensor per layer (SmolLM2: 30 copies, 9.7 MB each for 8 rows of 551 tokens). Converted once, all
    layers share it. Same numbers (the test in the benchmark checks the losses).
``chunk-256``
    Project 256 completion positions at a time instead of 1024: the [chunk, vocab] buffer is 33 MB
    instead of 131 MB at vocab 32,000 (float32), and matmuls of 256 rows are still efficient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(hidden @ weight.T + bias)[target]`` per row, ``chunk`` rows at a time, float32."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        rows = hidden.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            logits = _logits(hidden[start:end], weight, bias)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            # in place: the chunk's logits are not needed once their log-sum-exp is known
            total = logits.sub_(top).exp_().sum(dim=1)
            lse[start:end] = top.squeeze(1) + total.log()
            out[start:end] = picked - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            g = grad_out[start:end].float()
            # d logp[t] / d z = onehot(t) - softmax(z): G = g * (onehot - softmax), built in place
            grad_logits = _logits(hidden[start:end], weight, bias)
            grad_logits.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[start:end].float())
            if need_bias:
                grad_bias.add_(grad_logits.sum(dim=0))
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(hidden, weight, bias).float()


def fused_chunked_token_logps(hidden: Tensor, head: nn.Linear, targets: Tensor, chunk_size: int = 1024,
                              softcap: float | None = None, scale: float | None = None) -> Tensor:
    """Drop-in for ``tiltlm.logprobs.chunked_token_logps`` (logit softcap/scale: the original path)."""
    if softcap is not None or scale is not None:
        return _ORIGINAL["chunked_token_logps"](hidden, head, targets, chunk_size, softcap, scale)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True = may attend) as 0 / -inf in ``dtype``; other masks unchanged."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _forward_with_float_mask(forward):
    import dataclasses

    def patched(self, batch):
        if batch.attention_mask.dim() == 4:
            dtype = next(self.model.parameters()).dtype
            batch = dataclasses.replace(batch, attention_mask=additive_mask(batch.attention_mask, dtype))
        return forward(self, batch)

    return patched


def set_mmap_threshold(size: int) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, size)``; False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, size))  # M_MMAP_THRESHOLD = -3 in malloc.h
    except (OSError, AttributeError):
        return False


_ORIGINAL: dict = {}


def apply(names: tuple[str, ...]) -> None:
    """Apply the named candidates to the tiltlm modules of this process."""
    import tiltlm.logprobs as logprobs

    _ORIGINAL.setdefault("chunked_token_logps", logprobs.chunked_token_logps)
    for name in names:
        if name == "fused-logprobs":
            logprobs.chunked_token_logps = fused_chunked_token_logps
        elif name == "float-mask":
            logprobs.CompletionLogps.forward = _forward_with_float_mask(logprobs.CompletionLogps.forward)
        elif name == "mmap-threshold":
            set_mmap_threshold(64 * 1024)
        elif name == "chunk-256":
            init = logprobs.CompletionLogps.__init__

            def small_chunks(self, model, chunk_size=256, _init=init):
                _init(self, model, min(chunk_size, 256))

            logprobs.CompletionLogps.__init__ = small_chunks
        else:
            raise ValueError(f"unknown candidate {name!r}")
