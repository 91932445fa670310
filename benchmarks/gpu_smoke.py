"""GPU smoke test of the attention kernels: a tiny model, a few DPO steps in every batch layout.

    python benchmarks/gpu_smoke.py            # CUDA, bfloat16, FlexAttention (fallback forbidden)
    python benchmarks/gpu_smoke.py --cpu      # CPU, float32, the block kernel (--bf16: CPU bf16 autocast)

For each layout (concatenated rows, prompt-shared rows, packed rows) the same random Llama (grouped-query
attention) trains a few steps on the same pairs, with a frozen copy of itself as the reference. Checks:
the kernel asked for is the one that runs (no fallback); the step-0 loss is log 2 (policy = reference);
every layout gives the same losses, step by step. Prints the kernel, peak memory and tokens/s per layout;
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiltlm.attention import kernel_of  # noqa: E402
from tiltlm.data.collate import collate_concatenated, collate_shared  # noqa: E402
from tiltlm.data.types import TokenizedPair  # noqa: E402
from tiltlm.logprobs import CompletionLogps  # noqa: E402
from tiltlm.losses import LossParams, PairLogps, preference_loss  # noqa: E402
from tiltlm.models import choose_attention, set_attention, tiny_llama  # noqa: E402
from tiltlm.reference import frozen  # noqa: E402

VOCAB = 512
LAYOUTS = {
    "concatenated": lambda pairs: collate_concatenated(pairs, 0),
    "shared": lambda pairs: collate_shared(pairs, 0),
    "packed": lambda pairs: collate_shared(pairs, 0, row_tokens=256),
}


def random_pairs(count: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    return [TokenizedPair(ids(rng.randint(8, 60)), ids(rng.randint(4, 40)), ids(rng.randint(4, 40)))
            for _ in range(count)]


def split(logps: torch.Tensor, counts: torch.Tensor, pairs: int) -> PairLogps:
    return PairLogps(logps[:pairs], logps[pairs:], counts[:pairs], counts[pairs:])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's, all layouts so far


def train_layout(base, layout: str, batches: list[list[TokenizedPair]], device, kernel: str, autocast) -> dict:
    """A few steps of one layout from the same starting weights: losses, kernel, memory, tokens/s."""
    policy = copy.deepcopy(base).to(device)
    set_attention(policy, choose_attention(policy, kernel, device))  # raises rather than fall back
    reference = frozen(copy.deepcopy(policy))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    score, score_reference = CompletionLogps(policy), torch.no_grad()(CompletionLogps(reference))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, tokens, seconds = [], 0, 0.0
    for pairs in batches:
        batch = LAYOUTS[layout](pairs).to(device)
        start = time.perf_counter()
        with autocast():
            policy_logps, reference_logps = score(batch), score_reference(batch)
        out = preference_loss(split(*policy_logps, len(pairs)), split(*reference_logps, len(pairs)),
                              LossParams(beta=0.1))
        loss = out.losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises: the step's time is complete
        seconds += time.perf_counter() - start
        tokens += batch.real_tokens
    return {"layout": layout, "kernel": kernel_of(policy.config), "losses": losses,
            "peak_mb": peak_memory_mb(device), "tokens_per_s": tokens / seconds}


def check(results: list[dict], kernel: str, tolerance: float) -> list[str]:
    problems = []
    for r in results:
        if r["kernel"] != kernel:
            problems.append(f"{r['layout']}: ran {r['kernel']}, not {kernel}")
        if abs(r["losses"][0] - math.log(2)) > 1e-4:
            problems.append(f"{r['layout']}: step-0 loss {r['losses'][0]:.6f} != log 2")
    first = results[0]
    for r in results[1:]:
        for step, (a, b) in enumerate(zip(first["losses"], r["losses"])):
            if abs(a - b) > tolerance * max(abs(a), 1e-3):
                problems.append(f"step {step}: {first['layout']} loss {a:.6f} != {r['layout']} loss {b:.6f}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU with the block kernel")
    parser.add_argument("--bf16", action="store_true", help="on CPU: bfloat16 autocast (GPU runs bf16 weights)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    kernel = "blocks" if args.cpu else "flex"
    base = tiny_llama(vocab_size=VOCAB, hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate_size=256, seed=0)
    if not args.cpu:
        base = base.to(torch.bfloat16)  # the dtype a GPU run trains in
    autocast = contextlib.nullcontext
    if args.cpu and args.bf16:
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    pairs = random_pairs(args.steps * args.pairs)
    batches = [pairs[i * args.pairs:(i + 1) * args.pairs] for i in range(args.steps)]
    results = [train_layout(base, layout, batches, device, kernel, autocast) for layout in LAYOUTS]
    for r in results:
        print(f"{r['layout']:>12}: kernel {r['kernel']}, losses {' '.join(f'{x:.5f}' for x in r['losses'])}, "
              f"peak {r['peak_mb']:.0f} MiB, {r['tokens_per_s']:.0f} tokens/s")
    low_precision = args.bf16 or not args.cpu
    problems = check(results, kernel, tolerance=3e-2 if low_precision else 1e-4)
    for problem in problems:
        print("FAIL", problem)
    print("ok" if not problems else f"{len(problems)} check(s) failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
