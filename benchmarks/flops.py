"""The work a DPO step must do, in FLOPs, and the machine's float32 matmul peak to divide it by.

Useful FLOPs of one forward over a batch of pairs (the minimum any implementation has to do):

    forward = 2 * N_blocks * T  +  2 * d_model * V * C  +  4 * n_layers * d_attn * A

* ``N_blocks``: parameters of the transformer blocks (attention and MLP projections; norms are noise),
  i.e. everything but the embedding and the LM head;
* ``T``: real tokens, each prompt counted once per pair (no padding, no prompt duplication);
* ``2 * d_model * V * C``: the vocabulary projection at the ``C`` completion positions only (whose
  log-probs DPO uses), tied head or not;
* ``A``: attended (query, key) pairs under the exact DPO mask: for a pair with prompt ``p`` and
  completions ``c``, ``r``: ``p(p+1)/2 + c*p + c(c+1)/2 + r*p + r(r+1)/2``; each costs ``2 * d_attn``
  for QK^T and ``2 * d_attn`` for AV (``d_attn = heads * head_dim``).

A training step costs ``3 * forward`` for the policy (backward = 2x forward) plus ``1 * forward`` for the
reference when it runs online (none when precomputed). Model FLOP utilisation (MFU) = step FLOPs /
(step seconds * peak), with the peak measured on this machine in the same run (:func:`matmul_peak`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    blocks_params: int
    d_model: int
    vocab: int
    layers: int
    d_attn: int

    @classmethod
    def of(cls, config, blocks_params: int) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(blocks_params, config.hidden_size, config.vocab_size, config.num_hidden_layers,
                   config.num_attention_heads * head_dim)


def blocks_params(model) -> int:
    """Parameters of the transformer blocks: all but the input embedding and the output head."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def pair_counts(prompt: int, chosen: int, rejected: int) -> tuple[int, int, int]:
    """(real tokens T, completion tokens C, attended query-key pairs A) of one pair."""
    attended = (prompt * (prompt + 1) // 2 + chosen * prompt + chosen * (chosen + 1) // 2
                + rejected * prompt + rejected * (rejected + 1) // 2)
    return prompt + chosen + rejected, chosen + rejected, attended


def forward_flops(shape: Shape, pairs: list[tuple[int, int, int]]) -> float:
    """Useful FLOPs of one forward over ``pairs`` given as (prompt, chosen, rejected) lengths."""
    total = 0.0
    for lengths in pairs:
        tokens, completion, attended = pair_counts(*lengths)
        total += (2 * shape.blocks_params * tokens + 2 * shape.d_model * shape.vocab * completion
                  + 4 * shape.layers * shape.d_attn * attended)
    return total


def step_flops(shape: Shape, pairs: list[tuple[int, int, int]], online_reference: bool) -> float:
    """3x forward for the policy, +1x for an online reference."""
    return (3 + (1 if online_reference else 0)) * forward_flops(shape, pairs)


def matmul_peak(threads: int = 2, size: int = 2048, repeats: int = 12) -> float:
    """Best observed float32 FLOP/s of a ``size`` x ``size`` matmul on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


if __name__ == "__main__":
    print(f"fp32 matmul peak: {matmul_peak() / 1e9:.1f} GFLOP/s")
