"""`tiltlm plan` against the peak RSS of the real run, for a model of your choice (default SmolLM2-135M).

    python benchmarks/plan_check.py [--model smollm2-135m] [--pairs 24]

The same check as tests/test_plan.py runs on the 20M model, on a real model (too slow for the suite): the
first ``--pairs`` HH-RLHF pairs (../shared/data), 8 a step, rows up to 512 tokens, reference precomputed,
freed memory returned to the system (``--release-memory``: the plan predicts live memory); full and LoRA,
with and without gradient checkpointing. Each run is a process of its own; its peak is its own VmHWM.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
PEAK = "print('MAXRSS', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
CONFIGS = {"full": [], "full+gc": ["--gradient-checkpointing"], "lora": ["--lora-r", "16"],
           "lora+gc": ["--lora-r", "16", "--gradient-checkpointing"]}


def measured_peak(model: str, data: Path, out: Path, extra: list[str]) -> int:
    script = "import sys; from tiltlm.cli import main; code = main(sys.argv[1:]); " + PEAK + "; sys.exit(code)"
    args = ["train", "--model", model, "--data", str(data), "--output", str(out), "--batch-size", "8",
            "--grad-accum", "1", "--max-length", "512", "--max-prompt-length", "300", "--no-progress",
            "--no-tensorboard", "--release-memory", "--ref-cache", str(out.parent / "refcache"), *extra]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return int(done.stdout.split("MAXRSS")[-1]) * 1024


def main() -> None:
    from tiltlm.plan import Setup, longest_pairs, plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=24)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plan-check-"))
    data = work / "pairs.jsonl"
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        data.write_text("".join(line for _, line in zip(range(args.pairs), handle)))
    lengths = longest_pairs(args.model, str(data), 512, 300, 8)
    print("| run | planned | measured (peak RSS) | planned / measured |\n|---|---|---|---|")
    for name, extra in CONFIGS.items():
        lora = 16 if "--lora-r" in extra else 0
        setup = Setup(model=args.model, seq_len=512, batch_size=8, pair_lengths=lengths, device="cpu", lora_r=lora,
                      gradient_checkpointing="--gradient-checkpointing" in extra)
        planned = plan(setup).peak_bytes
        measured = measured_peak(args.model, data, work / name, extra)
        print(f"| {name} | {planned / 1e6:,.0f} MB | {measured / 1e6:,.0f} MB | {planned / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
