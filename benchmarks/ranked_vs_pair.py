"""Every sample or one pair per prompt? The quickstart trained on ranked lists of all N samples (Plackett-Luce)
against one best-vs-worst pair per prompt, at equal training compute, side by side in one run.

    python benchmarks/ranked_vs_pair.py [--seeds 0 1] [--output benchmarks/out/ranked_vs_pair]

Both arms are the quickstart on its embedded default (SmolLM2-135M-Instruct, VADER, the same 36 prompts,
the same samples: the same seed draws them), run as a user runs it (``tiltlm quickstart --preferences X``,
a process each). Equal compute (tiltlm.experiment.training_shape): both take as many optimizer steps and as
many completions per step (6 pairs = 12 completions = 3 lists of 4), so the ranked run sees each list
about 1.5 times where the pair run sees each pair 3 times. Prints a Markdown table for RESULTS.md:
held-out mean reward and KL(policy || reference) with their 95% intervals, and the implicit-reward accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(arm: str, seed: int, out: Path) -> dict:
    target = out / f"{arm}-seed{seed}"
    tiltlm = str(Path(sys.executable).with_name("tiltlm"))
    started = time.perf_counter()
    subprocess.run([tiltlm, "quickstart", "--preferences", arm, "--seed", str(seed), "--output", str(target),
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((target / "summary.json").read_text())
    return {**summary, "arm": arm, "seed": seed, "process_seconds": time.perf_counter() - started}


def interval(values: list[float]) -> str:
    return f"{values[0]:+.3f} ({values[1]:+.3f} to {values[2]:+.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", default="benchmarks/out/ranked_vs_pair")
    args = parser.parse_args()
    out = Path(args.output)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = [run(arm, seed, out) for seed in args.seeds for arm in ("pair", "ranked")]  # interleaved
    print("| preferences | seed | reward before | reward after | KL (nats) | held-out accuracy | steps | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['seed']} | {interval(r['reward_before'])} | {interval(r['reward_after'])} | "
              f"{interval(r['kl'])} | {r['heldout_accuracy']:.3f} | {r['train_steps']} | "
              f"{r['process_seconds'] / 60:.1f} min |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
