"""A ranked list of K = 4 completions against the same data as its 6 pairs: time and peak RSS per prompt.

    python benchmarks/bench_ranked.py [--prompts-per-step 2] [--warmup 1] [--steps 4] [--repeats 2]

The workload is the 20M-parameter model of ``workload.py`` and its HH-RLHF pairs. Each prompt gets four
completions: its pair's chosen and rejected and the next pair's (stand-ins of realistic lengths: the
timing depends on lengths, not on which text is better), ranked in that order. ``ranked`` trains them
as one Plackett-Luce row per prompt (objectives.ListObjective: the prompt once, four completions);
``pairs`` trains the 6 pairs the ranking implies (``--pairs all``: the prompt laid out once per pair,
objectives.PairObjective). Both run what the trainer runs for a step (collate, policy forward, online
reference, loss, backward, clip, fused AdamW) in float32 on 2 threads, packed rows of up to 1024 tokens.
Each measurement is a process of its own (its peak RSS is its own), ranked and pairs interleaved
``--repeats`` times; the table gives medians over processes of the per-step medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import peak_rss_mb  # noqa: E402
from workload import load_workload, model_dir, prepare  # noqa: E402

MODEL = "tiny20m"
PACK_TOKENS = 1024
LR = 1e-5


def ranked_lists(data: dict, count: int) -> list:
    """``count`` lists of 4: pair i's chosen and rejected, then pair i+1's, ranked in that order."""
    from tiltlm.data.types import TokenizedList

    pairs = data["pairs"]
    return [TokenizedList(pairs[i]["prompt_ids"],
                          [pairs[i]["chosen_ids"], pairs[i]["rejected_ids"], pairs[i + 1]["chosen_ids"],
                           pairs[i + 1]["rejected_ids"]], ranking=[0, 1, 2, 3])
            for i in range(count)]


def measure(mode: str, prompts_per_step: int, warmup: int, steps: int) -> dict:
    """One process: ``warmup + steps`` optimizer steps of ``prompts_per_step`` prompts each."""
    from transformers import AutoModelForCausalLM

    from tiltlm.data.tokenize import expand_ranking_to_pairs
    from tiltlm.logprobs import CompletionLogps
    from tiltlm.losses import LossParams
    from tiltlm.models import choose_attention, disable_dropout, frozen, set_attention
    from tiltlm.objectives import ListObjective, PairObjective, collate_weighted, make_collate

    data = load_workload(MODEL)
    lists = ranked_lists(data, prompts_per_step * (warmup + steps))
    policy = AutoModelForCausalLM.from_pretrained(model_dir(MODEL), dtype=torch.float32)
    disable_dropout(policy)
    set_attention(policy, choose_attention(policy, "auto", "cpu"))
    reference = CompletionLogps(frozen(copy.deepcopy(policy)))
    if mode == "ranked":
        objective, examples = ListObjective(data["pad_id"], 0.1, "packed", PACK_TOKENS), [[item] for item in lists]
    else:
        collate = make_collate("packed", data["pad_id"], PACK_TOKENS)
        objective = PairObjective(lambda rows: collate_weighted(rows, collate), LossParams(beta=0.1))
        examples = [expand_ranking_to_pairs(item) for item in lists]
    scorer = objective.scorer(policy.train())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, fused=True)
    times, sequences = [], 0
    for step in range(warmup + steps):
        started = time.perf_counter()
        rows = [row for group in examples[step * prompts_per_step:(step + 1) * prompts_per_step] for row in group]
        batch = objective.collate(rows)
        with torch.no_grad():
            reference_scores = reference(batch)
        scored = objective(scorer(batch), reference_scores, batch)
        (scored.losses.sum() / len(rows)).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        sequences = batch.sequences
    measured = times[warmup:]
    return {"mode": mode, "seconds_per_prompt": statistics.median(measured) / prompts_per_step,
            "rows_per_step": len(rows), "sequences_per_step": sequences, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=["ranked", "pairs"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.prompts_per_step, args.warmup, args.steps)))
        return
    prepare(MODEL)
    results: dict[str, list[dict]] = {"ranked": [], "pairs": []}
    for _ in range(args.repeats):
        for mode in ("ranked", "pairs"):  # interleaved: a slow spell of the machine hits both
            child = [sys.executable, __file__, "--one", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in
                     vars(args).items() if k not in ("one", "repeats")]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"`python benchmarks/bench_ranked.py {' '.join(sys.argv[1:])}` (tiny20m, float32, {args.threads} threads, "
          f"{args.prompts_per_step} prompts per step, median of {args.repeats} processes x {args.steps} steps)\n")
    print("| K = 4 per prompt as | rows per step | sequences per step | s per prompt | peak RSS MB |")
    print("|---|---|---|---|---|")
    for mode, label in (("ranked", "one ranked list (Plackett-Luce)"), ("pairs", "its 6 pairs (--pairs all)")):
        runs = results[mode]
        print(f"| {label} | {runs[0]['rows_per_step']} | {runs[0]['sequences_per_step']} | "
              f"{statistics.median(r['seconds_per_prompt'] for r in runs):.3f} | "
              f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
