"""TRL's DPOTrainer on the benchmark's workload, timed in a process of its own. Runs in
``benchmarks/.venv-trl`` (TRL is never a tiltlm dependency) and imports nothing from tiltlm.

    benchmarks/.venv-trl/bin/python benchmarks/bench_trl.py MODEL {shipped,completion-only} \
        --warmup 2 --steps 6 --out result.json

Same model directory, same token ids in the same order (one batch of 8 pairs a step, no shuffling),
same truncation (the pairs already fit max_length 512, so TRL's own truncation cuts nothing), float32,
2 threads, AdamW (fused, as tiltlm's), constant learning rate 1e-5 without warmup, weight decay 0,
gradient clipping at 1.0, beta 0.1, sigmoid loss, a separate frozen reference model run online.
DPOConfig's bf16 and gradient-checkpointing defaults are switched off.

Two small adaptations, neither of which changes TRL's step: ``_prepare_dataset`` is skipped because
the dataset is already tokenized (TRL would re-tokenize the text; here the ids are given), and the
train sampler is sequential so that every configuration sees the same batches.

``completion-only``: TRL 1.16's fused LM head (``trl.trainer.utils``, the model forward that
``add_fused_lm_head`` installs) projects only the completion positions when
``_use_triton(device)`` is true, i.e. on CUDA/XPU with Triton; elsewhere it projects every position of
every padded row. Patching the name ``_use_triton`` *in trl.trainer.utils only* to return True makes it
take the compact path on CPU; the projection kernel itself still uses its torch code (its own
``_use_triton`` in ``trl.kernels.chunked_logprob`` is untouched).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
LR = 1e-5


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("mode", choices=["shipped", "completion-only"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import trl
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if args.mode == "completion-only":
        trl_utils._use_triton = lambda device: True

    directory = CACHE / args.model
    data = json.loads((CACHE / f"{args.model}-pairs.json").read_text())
    total = args.warmup + args.steps
    needed = [data["pairs"][i % len(data["pairs"])] for i in range(8 * total)]
    dataset = Dataset.from_list(needed)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    policy = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, *_, **__):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *unused, **also_unused):
            return dataset  # already {"prompt_ids", "chosen_ids", "rejected_ids"}

        def _get_train_sampler(self, *unused, **also_unused):
            return SequentialSampler(self.train_dataset)

    config = DPOConfig(
        output_dir=str(HERE / "out" / f"trl-{args.model}-{args.mode}"), per_device_train_batch_size=8,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", beta=0.1,
        loss_type=["sigmoid"], max_length=512, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        disable_tqdm=True, seed=0, data_seed=0, remove_unused_columns=True,
    )
    timer = Timer()
    trainer = PreTokenizedDPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    edges = [timer.start] + timer.ends
    times = [b - a for a, b in zip(edges, edges[1:])]
    cpu_edges = [timer.cpu_start] + timer.cpu_ends
    cpu_times = [b - a for a, b in zip(cpu_edges, cpu_edges[1:])]
    result = {
        "model": args.model, "config": f"trl-{args.mode}", "trl": trl.__version__, "step_seconds": times, "step_cpu_seconds": cpu_times,
        "warmup": args.warmup, "losses": [row["loss"] for row in timer.logs],
        # per-step means over the batch's pairs: compared with tiltlm's sums / 8
        "logps": [[row.get("logps/chosen"), row.get("logps/rejected")] for row in timer.logs],
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
