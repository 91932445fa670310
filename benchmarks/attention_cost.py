"""What attention costs per packed row, before (dense mask) and after (segment metadata), from the code.

    python benchmarks/attention_cost.py [--rows-tokens 4096 8192]

Rows are packed with ~500-token pairs (prompt 200, chosen 150, rejected 150, as tiltlm packs them), at
SmolLM2-135M's attention shape (9 query heads of 64, 3 key/value heads, 30 layers). For each row length:

* mask bytes: the dense [1, 1, L, L] mask per row (float32 0/-inf on CPU, bool on GPU), and what the
  block kernel holds instead (its gathered blocks' masks), per row; the dense mask is one tensor shared by
  all layers (tiltlm converts it once); handed to CPU SDPA as bool it was converted in every layer;
* bytes SDPA keeps for the backward per layer: its inputs and output (q, k, v, out; the mask is one
  tensor for all layers) per row;
* attention FLOPs per layer (QK^T and PV, 2 x 2 x head_dim x heads per visible query-key pair):
  needed (visible pairs), dense SDPA (every pair), CPU blocks (the gathered calls: causal prompt blocks
  count their lower triangle), FlexAttention (visited 128 x 128 tiles).

Sizes come from tiltlm's own collate, block plan and mask rule (no model is run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiltlm import attention  # noqa: E402
from tiltlm.data.collate import collate_shared, segment_mask  # noqa: E402
from tiltlm.data.types import TokenizedPair  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
PAIR = (200, 150, 150)


def row(tokens: int) -> attention.Segments:
    pairs = [TokenizedPair([5] * PAIR[0], [6] * PAIR[1], [7] * PAIR[2]) for _ in range(tokens // sum(PAIR))]
    batch = collate_shared(pairs, pad_id=0, row_tokens=tokens)
    assert batch.input_ids.shape[0] == 1
    return attention.segments_of(batch, multiple=tokens)[2]


def figures(tokens: int) -> dict:
    segments = row(tokens)
    length = segments.segment_ids.shape[1]
    dense = segment_mask(segments.segment_ids, segments.part_ids)[0, 0]
    real = segments.segment_ids[0] >= 0
    needed_pairs = int(dense[real][:, real].sum())
    gathered = attention.gather_plan(attention.block_plan(segments), segments, None, torch.float32)
    block_pairs, block_mask_bytes, block_io = 0, 0, 0
    for group in gathered.groups:
        n, q = group.queries.shape
        k = group.keys.shape[1]
        block_pairs += n * (q * (q + 1) // 2 if group.mask is None else q * k)
        block_mask_bytes += 0 if group.mask is None else group.mask.numel() * 4
        block_io += n * HEAD_DIM * (2 * q * HEADS + 2 * k * KV_HEADS) * 4  # q, out, k, v gathered
    tile = attention.FLEX_MULTIPLE
    tiles = int(dense.view(length // tile, tile, length // tile, tile).any(dim=(1, 3)).sum())
    flops = 2 * 2 * HEAD_DIM * HEADS
    io = length * HEAD_DIM * (2 * HEADS + 2 * KV_HEADS) * 4  # q, out, k, v of the row, float32
    return {"tokens": tokens, "pairs": tokens // sum(PAIR),
            "dense_mask_float": length * length * 4, "dense_mask_bool": length * length,
            "block_mask": block_mask_bytes, "dense_saved": io, "block_saved": block_io,
            "flops_needed": flops * needed_pairs, "flops_dense": flops * length * length,
            "flops_blocks": flops * block_pairs, "flops_flex": flops * tiles * tile * tile}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def gflop(n: float) -> str:
    return f"{n / 1e9:,.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-tokens", type=int, nargs="*", default=[4096, 8192])
    args = parser.parse_args()
    rows = [figures(t) for t in args.rows_tokens]
    print("| per row, per layer | " + " | ".join(f"{r['tokens']} tokens ({r['pairs']} pairs)" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    lines = [
        ("dense mask, float32 (CPU)", lambda r: mib(r["dense_mask_float"])),
        ("dense mask, bool (GPU SDPA)", lambda r: mib(r["dense_mask_bool"])),
        ("dense mask as bool to CPU SDPA: float copies kept, 30 layers", lambda r: mib(r["dense_mask_float"] * LAYERS)),
        ("block kernel masks (all layers share them, like the dense float mask)", lambda r: mib(r["block_mask"])),
        ("FlexAttention block mask", lambda r: "tile indices only (KiB)"),
        ("q, k, v, out kept for backward per layer, dense SDPA (+ the mask above)", lambda r: mib(r["dense_saved"])),
        ("q, k, v, out kept for backward per layer, blocks (gathered; + their masks)", lambda r: mib(r["block_saved"])),
        ("attention GFLOP needed", lambda r: gflop(r["flops_needed"])),
        ("attention GFLOP, dense SDPA", lambda r: gflop(r["flops_dense"])),
        ("attention GFLOP, CPU blocks", lambda r: gflop(r["flops_blocks"])),
        ("attention GFLOP, FlexAttention (visited tiles)", lambda r: gflop(r["flops_flex"])),
    ]
    for name, value in lines:
        print(f"| {name} | " + " | ".join(value(r) for r in rows) + " |")


if __name__ == "__main__":
    main()
