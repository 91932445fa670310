"""One tiltlm configuration, timed in a process of its own (so its peak RSS is its own).

    python benchmarks/bench_step.py MODEL CONFIG --warmup 2 --steps 6 --out result.json [--profile FILE]

Runs what tiltlm's training loop runs for a step (collate, policy forward, reference, DPO loss,
backward, gradient clipping, fused AdamW step) over the workload's pairs in their fixed order, 8 pairs a
step, float32 on 2 threads, and writes per-step wall times, per-step losses and log-probs, and the peak
RSS as JSON.

Configurations (:data:`CONFIGS`) switch on tiltlm's fast paths one at a time and all together (``all``
is what ``tiltlm train`` does by default: on CPU, attention by blocks from the rows' segment metadata;
``all-dense`` is the same with the former dense-mask SDPA attention, ``all-blocks`` with the block kernel
on every batch, also where the dense mask is faster; ``all-4k``/``all-4k-dense``: one 4096-token row a step,
where the dense mask computes most of its scores for nothing); ``all+gc`` adds gradient checkpointing and ``all+gc+release``
also ``--release-memory``, tiltlm's options for memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import Shape, blocks_params, matmul_peak  # noqa: E402
from workload import load_workload, model_dir  # noqa: E402

PAIRS_PER_STEP = 8
LR = 1e-5


@dataclass(frozen=True)
class Config:
    layout: str  # concatenated | shared | packed
    projection: str  # full (logits at every position) | chunked (completion positions, checkpointed chunks)
    reference: str  # online | precompute
    pack_tokens: int = 512  # packed rows: tiltlm's default, max_length
    gradient_checkpointing: bool = False  # tiltlm's option: recompute each block's activations in the backward
    release_memory: bool = False  # tiltlm's option: glibc returns freed tensors to the system at once
    attention: str = "auto"  # tiltlm's kernel choice (blocks on CPU); "sdpa": the dense [rows, 1, L, L] mask
    dense_advantage: float | None = None  # blocks kernel: 0 = blocks on every batch (default: where they pay off)


CONFIGS = {
    "naive": Config("concatenated", "full", "online"),
    "shared": Config("shared", "full", "online"),
    "packed": Config("packed", "full", "online"),
    "chunked": Config("concatenated", "chunked", "online"),
    "precompute": Config("concatenated", "full", "precompute"),
    "all": Config("packed", "chunked", "precompute"),
    "all-dense": Config("packed", "chunked", "precompute", attention="sdpa"),
    "all-blocks": Config("packed", "chunked", "precompute", attention="blocks", dense_advantage=0.0),
    "all-4k": Config("packed", "chunked", "precompute", pack_tokens=4096),
    "all-4k-dense": Config("packed", "chunked", "precompute", pack_tokens=4096, attention="sdpa"),
    "all+gc": Config("packed", "chunked", "precompute", gradient_checkpointing=True),
    "all+gc+release": Config("packed", "chunked", "precompute", gradient_checkpointing=True, release_memory=True),
}


def peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss as a fallback), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(model_name: str, config: Config):
    from transformers import AutoModelForCausalLM

    from tiltlm.data.types import TokenizedPair
    from tiltlm.objectives import make_collate
    from tiltlm.logprobs import CompletionLogps, naive_sequence_logps
    from tiltlm.models import choose_attention, disable_dropout, frozen, set_attention

    data = load_workload(model_name)
    pairs = [TokenizedPair(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in data["pairs"]]
    policy = AutoModelForCausalLM.from_pretrained(model_dir(model_name), dtype=torch.float32, attn_implementation="sdpa")
    disable_dropout(policy)
    set_attention(policy, choose_attention(policy, config.attention, "cpu"))
    if config.dense_advantage is not None:
        from tiltlm import attention

        attention.DENSE_ADVANTAGE = config.dense_advantage
    reference_model = frozen(copy.deepcopy(policy))  # the policy's starting weights, like tiltlm's online mode
    if config.gradient_checkpointing:  # as tiltlm.train.build_policy does it
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    collate = make_collate(config.layout, data["pad_id"], config.pack_tokens)
    if config.projection == "full":
        policy_fn = lambda batch: naive_sequence_logps(policy, batch)  # noqa: E731
        ref_scorer = torch.no_grad()(lambda batch: naive_sequence_logps(reference_model, batch))
    else:
        policy_fn = CompletionLogps(policy)
        ref_scorer = torch.no_grad()(CompletionLogps(reference_model))
    return pairs, policy, reference_model, collate, policy_fn, ref_scorer


def run(model_name: str, name: str, warmup: int, steps: int, profile: str | None) -> dict:
    from tiltlm.losses import LossParams
    from tiltlm.objectives import PairObjective
    from tiltlm.refcache import cached_reference_table, lookup_reference

    from tiltlm.runtime import return_freed_memory

    config = CONFIGS[name]
    if config.release_memory:  # what tiltlm's trainer does first with --release-memory
        return_freed_memory()
    peak = matmul_peak()  # contemporaneous with this configuration's steps (the machine is shared)
    pairs, policy, reference_model, collate, policy_fn, ref_scorer = build(model_name, config)
    shape = Shape.of(policy.config, blocks_params(policy))
    result: dict = {"model": model_name, "config": name, "setup": config.__dict__, "pairs": len(pairs),
                    "peak_flops": peak, "shape": shape.__dict__}

    if config.reference == "precompute":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir(model_name))
        # the epoch is the run's own pairs: precompute cost is linear in pairs, so pairs/s over an epoch
        # does not depend on how many there are
        pairs = pairs[:PAIRS_PER_STEP * (warmup + steps)]
        result["epoch_pairs"] = len(pairs)
        with tempfile.TemporaryDirectory() as cache:
            start, start_cpu = time.perf_counter(), time.process_time()
            table, path, hit = cached_reference_table(reference_model, tokenizer, pairs, collate,
                                                      4 * PAIRS_PER_STEP, scorer=ref_scorer, cache_dir=cache,
                                                      progress=False)
            result["precompute_seconds"] = time.perf_counter() - start
            result["precompute_cpu_seconds"] = time.process_time() - start_cpu
            assert not hit
            start = time.perf_counter()
            again, _, hit = cached_reference_table(reference_model, tokenizer, pairs, collate, 4 * PAIRS_PER_STEP,
                                                   scorer=ref_scorer, cache_dir=cache, progress=False)
            result["cache_hit_seconds"] = time.perf_counter() - start
            assert hit and torch.equal(again, table)
        result["rss_after_precompute_mb"] = peak_rss_mb()
        del reference_model, ref_scorer  # training needs only the table
        reference = lookup_reference(table)
    else:
        reference = ref_scorer

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0, fused=True)
    objective = PairObjective(collate, LossParams(beta=0.1))
    times, cpu_times, losses, logps, tokens, lengths = [], [], [], [], [], []
    total = warmup + steps
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        profiler = torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    last, last_cpu = time.perf_counter(), time.process_time()
    for step in range(total):
        if profiler is not None and step == warmup:
            profiler.__enter__()
        indices = [(step * PAIRS_PER_STEP + k) % len(pairs) for k in range(PAIRS_PER_STEP)]
        batch = collate([pairs[i] for i in indices])
        batch.indices = tuple(indices)  # what the precomputed reference looks up
        scored = objective(policy_fn(batch), reference(batch), batch)
        loss = scored.losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - last)
        cpu_times.append(now_cpu - last_cpu)  # all threads: robust to time-slicing by other processes
        last, last_cpu = now, now_cpu
        losses.append(loss.item())
        logps.append([scored.metrics["logps/chosen"].sum().item(), scored.metrics["logps/rejected"].sum().item()])
        tokens.append(batch.real_tokens)
        lengths.append([(len(pairs[i].prompt_ids), len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
                        for i in indices])
    if profiler is not None:
        profiler.__exit__(None, None, None)
        table_text = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        Path(profile).write_text(table_text)
    result.update(step_seconds=times, step_cpu_seconds=cpu_times, warmup=warmup, losses=losses, logps=logps, real_tokens=tokens,
                  lengths=lengths, peak_rss_mb=peak_rss_mb())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", default=None, help="write torch.profiler's top operators over the measured steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = run(args.model, args.config, args.warmup, args.steps, args.profile)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
