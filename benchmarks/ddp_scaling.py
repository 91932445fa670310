"""DDP throughput on this machine, and the communication it costs; the numbers behind ``DDP.md``.

    python benchmarks/ddp_scaling.py [--steps 8] [--repeats 2] [--out benchmarks/out/ddp_scaling.json]

Runs ``tiltlm train`` (the real loop, under ``torchrun --standalone``) on a 12.6M-parameter random Llama
with synthetic pairs, in three layouts of the same 2 cores:

``1 proc x 2 threads``   the baseline: one process using both cores
``1 proc x 1 thread``    what one rank of the 2-process run has to itself
``2 procs x 1 thread``   DDP (gloo), the same per-rank batch: twice the pairs per step

and reports real tokens/s (the loop's own ``tokens_per_second``, all ranks, median of the steps after
the first two of every run). The layouts take turns (``--repeats`` rounds), so a change in the load of a
shared machine falls on all of them. Then it times a gloo all-reduce of one step's gradients (float32,
all parameters) between two processes, the communication DDP adds to every step, and its share of the
DDP step. Every process is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 1800  # seconds per launch
MODEL = dict(vocab_size=8192, hidden_size=384, layers=4, heads=6, kv_heads=2, intermediate_size=1024)
PAIRS = 64
PER_RANK_BATCH = 4
WORDS = ("the a film movie was is good bad great awful story acting plot music scene actor director ending "
         "slow fast funny sad long short loved hated watched again never always really quite very").split()


def build_inputs(directory: Path) -> tuple[Path, Path]:
    """A random Llama (vocabulary larger than the tokenizer's: the unused rows still cost compute and
    gradient traffic, as a real vocabulary would) and ``PAIRS`` synthetic pairs of ~100-token prompts
    and ~60-token completions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiltlm.models import tiny_llama

    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    pairs = [{"prompt": text(100), "chosen": " " + text(60), "rejected": " " + text(60)} for _ in range(PAIRS)]
    data = directory / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([p["prompt"] for p in pairs], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model = tiny_llama(**MODEL, seed=0)
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def launch(args: list[str], threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])}...: exit {done.returncode}\n"
                           f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


def torchrun(nproc: int) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(nproc)]


def train_rates(model: Path, data: Path, out: Path, nproc: int, threads: int, steps: int) -> list[float]:
    """Real tokens/s (all ranks) of steps 3..``steps`` of one run."""
    launch([*torchrun(nproc), "-m", "tiltlm.cli", "train", "--model", str(model), "--data", str(data),
            "--output", str(out), "--batch-size", str(PER_RANK_BATCH), "--grad-accum", "1", "--max-steps", str(steps),
            "--max-length", "512", "--max-prompt-length", "256", "--lr", "1e-5", "--warmup-ratio", "0",
            "--save-every", "100000", "--no-progress", "--no-tensorboard", "--overwrite"], threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_second"] for r in rows[2:]]


def summary(nproc: int, threads: int, rates: list[float], tokens_per_pair: float) -> dict:
    median = statistics.median(rates)
    return {"processes": nproc, "threads_per_process": threads, "pairs_per_step": nproc * PER_RANK_BATCH,
            "tokens_per_second": median, "min": min(rates), "max": max(rates), "steps": len(rates),
            "seconds_per_step": nproc * PER_RANK_BATCH * tokens_per_pair / median}


def allreduce_seconds(numel: int, repeats: int = 5) -> float:
    """Median time of a float32 all-reduce of ``numel`` elements between 2 gloo processes."""
    output = launch([*torchrun(2), __file__, "--allreduce-worker", str(numel), str(repeats)], threads=1)
    return json.loads(output.strip().splitlines()[-1])["seconds"]


def allreduce_worker(numel: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    buffer = torch.ones(numel)
    dist.all_reduce(buffer)  # warm-up: connections, allocation
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({"seconds": statistics.median(times)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "out" / "ddp_scaling.json"))
    parser.add_argument("--allreduce-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_worker:
        allreduce_worker(*args.allreduce_worker)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build_inputs(work)
        parameters, tokens_per_pair = describe(model, data)
        load = os.getloadavg()
        layouts = [(1, 2), (1, 1), (2, 1)]
        rates: dict = {layout: [] for layout in layouts}
        for round_ in range(args.repeats):
            for n, t in layouts if round_ % 2 == 0 else layouts[::-1]:
                rates[n, t] += train_rates(model, data, work / f"run-{n}x{t}", n, t, args.steps)
        seconds = allreduce_seconds(parameters)
    runs = [summary(n, t, rates[n, t], tokens_per_pair) for n, t in layouts]
    base, single_core, ddp = runs
    result = {
        "model_parameters": parameters, "gradient_bytes_per_step": 4 * parameters, "per_rank_batch": PER_RANK_BATCH,
        "real_tokens_per_pair": tokens_per_pair, "load_average_before": load, "load_average_after": os.getloadavg(),
        "runs": runs, "allreduce_seconds": seconds, "allreduce_GB_per_s": 4 * parameters / seconds / 1e9,
        "allreduce_share_of_ddp_step": seconds / ddp["seconds_per_step"],
        "ddp_step_minus_single_core_step": ddp["seconds_per_step"] - single_core["seconds_per_step"],
        "speedup_vs_1proc_2threads": ddp["tokens_per_second"] / base["tokens_per_second"],
        "speedup_vs_1proc_1thread": ddp["tokens_per_second"] / single_core["tokens_per_second"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def describe(model: Path, data: Path) -> tuple[int, float]:
    """(parameters, mean real tokens a pair: prompt once plus both completions, as the loop counts them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiltlm.data import load_pairs, tokenize_pairs
    from tiltlm.models import load_tokenizer

    architecture = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    parameters = sum(p.numel() for p in architecture.parameters())
    pairs, _ = tokenize_pairs(load_pairs(str(data)), load_tokenizer(str(model)), 512, 256)
    return parameters, statistics.mean(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


if __name__ == "__main__":
    main()
