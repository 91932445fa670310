"""The DPO training recipe: one process or a torchrun job, one explicit loop.

Supports: full fine-tuning or LoRA (peft); reference precomputed (cached on disk), online,
adapters-off (LoRA) or none (reference-free losses); any loss of :mod:`tiltlm.losses` and weighted
sums of them; packed, prefix-shared or concatenated batches, length-grouped steps; AdamW with warmup and linear/cosine/constant decay; gradient
accumulation and clipping; gradient checkpointing and a low-RSS allocator setting; bf16 autocast on GPU; DDP or FSDP2 under torchrun
(gloo on CPU, NCCL on GPU; see distributed.py); metrics.jsonl, TensorBoard and a progress bar; atomic
checkpoints and exact resume; SIGTERM (preemption) saves a checkpoint and exits cleanly; non-finite
steps are skipped and counted.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from tiltlm import checkpoint as ckpt
from tiltlm import distributed, rundir
from tiltlm.checkpoint import save_pretrained_atomically
from tiltlm.config import ConfigError, TrainConfig, loss_setup
from tiltlm.data import load_pairs, tokenize_pairs
from tiltlm.data.order import DataOrder
from tiltlm.evaluate import evaluate_pairs, make_collate, score_batch
from tiltlm.logprobs import CompletionLogps
from tiltlm.losses import REFERENCE_FREE, displacement_warning
from tiltlm.metrics import MetricSums, MetricsWriter, read_metrics
from tiltlm.models import add_lora, disable_dropout, load_model, load_tokenizer, parse_dtype
from tiltlm.reference import (adapters_off_reference, choose_mode, no_reference, online_reference,
                              precomputed_reference)
from tiltlm.runtime import Runtime, autocast, return_freed_memory, seed_everything, start, stop


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and where."""


def read_pairs(source: str, tokenizer, config: TrainConfig, log) -> list:
    pairs, summary = tokenize_pairs(load_pairs(source), tokenizer, config.max_length, config.max_prompt_length)
    log(f"data {source}:\n{summary.format()}")
    if not pairs:
        raise ConfigError(f"data {source}: no usable pair left after tokenisation (see the summary above)")
    return pairs


def build_models(config: TrainConfig, runtime: Runtime, dtype: torch.dtype, mode: str, tokenizer, collate,
                 datasets: list, log):
    """(policy, one reference function per dataset in ``datasets``). With ``precompute`` the tables are
    filled before LoRA is added and before any checkpoint is loaded, from the policy's own starting
    weights when they are the reference, so no second copy is ever loaded for them."""
    sharded = distributed.uses_fsdp(config, runtime)  # FSDP: float32 master shards, placed by fully_shard
    policy = load_model(config.model, torch.float32 if sharded else dtype, config.trust_remote_code)
    disable_dropout(policy)
    references = [no_reference] * len(datasets)
    if mode == "precompute":
        own = config.ref is None and not sharded
        ref_model = policy if own else load_model(config.ref or config.model, dtype, config.trust_remote_code)
        ref_model.to(runtime.device)
        references = [precomputed_reference(ref_model, tokenizer, pairs, collate, 4 * config.batch_size,
                                            runtime.device, config.logprob_chunk, config.ref_cache,
                                            {"dtype": str(dtype)}, name, log) for name, pairs in datasets]
        del ref_model  # a separately loaded reference is freed here
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r > 0:
        policy = add_lora(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    policy.to("cpu" if sharded else runtime.device).train()
    if mode == "adapters-off":
        references = [adapters_off_reference(policy, config.logprob_chunk)] * len(datasets)
    elif mode == "online":
        ref_model = load_model(config.ref or config.model, dtype, config.trust_remote_code)
        online = (distributed.sharded_reference(ref_model, config.logprob_chunk, runtime) if sharded
                  else online_reference(ref_model.to(runtime.device), config.logprob_chunk))
        references = [online] * len(datasets)
    return policy, references


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step``: a resumed run logs those steps again."""
    if path.is_file():
        kept = [row for row in read_metrics(path) if row["step"] <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True on every rank when ``flag`` is true on any (a signal may reach only some ranks)."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([float(flag)], device=runtime.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def train(config: TrainConfig) -> Path:
    """Train a policy with the configured preference loss; returns the output directory."""
    runtime = start(config.device)
    try:
        return _train(config, runtime)
    finally:
        stop(runtime)


def _train(config: TrainConfig, runtime: Runtime) -> Path:
    log = print if runtime.is_main else (lambda *args, **kwargs: None)
    if config.release_memory:
        return_freed_memory()
    seed_everything(config.seed)
    out = rundir.check(config)
    params, loss_names, loss_weights = loss_setup(config)
    sharded = distributed.uses_fsdp(config, runtime)  # also refuses settings FSDP cannot run, before loading
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    train_pairs = read_pairs(config.data, tokenizer, config, log)
    eval_pairs = read_pairs(config.eval_data, tokenizer, config, log) if config.eval_data else None
    collate = make_collate(config.layout, tokenizer.pad_token_id, config.pack_tokens or config.max_length)

    lengths = tuple(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in train_pairs)
    order = DataOrder(len(train_pairs), config.batch_size, config.grad_accum, runtime.world_size, config.seed,
                      lengths=lengths if config.group_by_length else ())
    if order.steps_per_epoch == 0:
        raise ConfigError(f"data {config.data}: {len(train_pairs)} pairs are fewer than one optimizer step "
                          f"(batch_size x grad_accum x processes = {order.pairs_per_step}); lower batch_size or grad_accum")
    total_steps = config.max_steps if config.max_steps > 0 else order.steps_per_epoch * config.epochs

    dtype = parse_dtype(config.dtype, runtime.device)
    ref_mode = choose_mode(config.ref_mode, config.lora_r > 0, config.ref, set(loss_names) <= REFERENCE_FREE,
                           covers_data=total_steps >= order.steps_per_epoch and not sharded)
    datasets = [(config.data, train_pairs)] + ([(config.eval_data, eval_pairs)] if eval_pairs else [])
    policy, references = build_models(config, runtime, dtype, ref_mode, tokenizer, collate, datasets, log)
    reference, eval_reference = references[0], references[-1]
    log(f"policy {config.model} ({dtype}, {'LoRA r=%d' % config.lora_r if config.lora_r else 'full'}), "
        f"reference: {ref_mode}, loss: {config.loss}, layout: {config.layout}, processes: {runtime.world_size}")
    if runtime.is_main:
        rundir.start(config)  # only now, so a mistake found above leaves the directory as it was
    scorer = CompletionLogps(policy, config.logprob_chunk)
    forward = distributed.wrap(scorer, config.parallel, runtime, dtype)
    trainable = [p for p in policy.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=runtime.device.type in ("cpu", "cuda"))
    scheduler = get_scheduler("constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
                              optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    state = ckpt.TrainingState(step=0, extra={})
    checkpoints = out / "checkpoints"
    if config.resume:
        latest = ckpt.latest_checkpoint(checkpoints, config.resume_fallback, log)
        if latest is not None:
            state = distributed.load_checkpoint(latest, policy, optimizer, scheduler)
            log(f"resumed from {latest} (step {state.step} of {total_steps})")
        if runtime.is_main:
            truncate_metrics(out / "metrics.jsonl", state.step)
    writer = MetricsWriter(out, config.tensorboard) if runtime.is_main else None

    stop_requested = []  # SIGTERM (preemption): finish the step, checkpoint, exit 0
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    bad_steps, warned, done, last_finite = 0, False, state.step, None
    pairs_per_micro_batch = config.batch_size * config.grad_accum  # gradient of the step's mean loss
    bar = tqdm(range(state.step, total_steps), initial=state.step, total=total_steps, desc="train",
               disable=not (runtime.is_main and config.progress))
    for step in bar:
        started, sums, tokens = time.perf_counter(), MetricSums(), 0
        micro_batches = order.micro_batches(step, runtime.rank)
        for i, indices in enumerate(micro_batches):
            batch = replace(collate([train_pairs[j] for j in indices]), indices=tuple(indices)).to(runtime.device)
            last = i == len(micro_batches) - 1
            with distributed.accumulating(forward, not last):  # ranks synchronise once, after the last
                with autocast(runtime.device, dtype):
                    loss_out, policy_logps, ref_logps = score_batch(forward, reference, batch, params,
                                                                    loss_names, loss_weights)
                (loss_out.losses.sum() / pairs_per_micro_batch).backward()
            sums.add(loss_out, policy_logps, ref_logps)
            tokens += batch.real_tokens
        grad_norm = distributed.clip_grad_norm(trainable, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        metrics = sums.mean()
        if torch.isfinite(grad_norm) and math.isfinite(metrics["loss"]):
            optimizer.step()
            last_finite = {"step": step + 1, **metrics, "grad_norm": grad_norm.item()}
        else:  # gradients and metrics are all-reduced, so every rank skips together
            bad_steps += 1
            log(f"step {step + 1}: non-finite loss or gradients, step skipped ({bad_steps} so far)")
            if bad_steps > config.max_bad_steps:
                raise TrainingError(f"{bad_steps} steps with non-finite loss or gradients (limit max_bad_steps = "
                                    f"{config.max_bad_steps}); step {step + 1}'s pairs: "
                                    f"{', '.join(step_sources(order, train_pairs, step))}; last finite metrics: "
                                    f"{json.dumps(last_finite)}")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % config.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - started
            row = {"step": done, "epoch": done / order.steps_per_epoch, **metrics, "grad_norm": grad_norm.item(),
                   "lr": lr, "tokens_per_second": tokens * runtime.world_size / elapsed}
            if writer is not None:
                writer.write(row)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                            margin=f"{metrics['rewards/margins']:.3f}")
        message = displacement_warning(metrics.get("logps/chosen_change", 0.0), metrics["rewards/margins"], 1.0)
        if message and not warned:
            warned = True
            log(f"\nwarning (step {done}): {message}")
        if eval_pairs is not None and (done % config.eval_every == 0 or done == total_steps):
            eval_row = {"step": done, "epoch": done / order.steps_per_epoch,
                        **evaluate_pairs(scorer, eval_reference, eval_pairs, collate, params, loss_names, loss_weights,
                                   config.batch_size, runtime.device, progress=config.progress)}
            if writer is not None:
                writer.write(eval_row)
        preempted = any_rank(bool(stop_requested), runtime)
        if done % config.save_every == 0 or preempted:
            distributed.save_checkpoint(checkpoints, policy, optimizer, scheduler, ckpt.TrainingState(done, {}),
                                        config.keep_checkpoints, runtime)
        if preempted and done < total_steps:
            log(f"\nSIGTERM: checkpoint saved at step {done}; continue with --resume")
            break
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    if writer is not None:
        writer.close()
    weights = distributed.full_state_dict(policy) if done == total_steps else None  # FSDP: gathered on rank 0
    if runtime.is_main and done == total_steps:
        save_final(out, policy, tokenizer, config.model, config.merge_lora, weights)
        log(f"saved {out / 'final'}")
    return out


def step_sources(order: DataOrder, pairs: list, step: int) -> list[str]:
    """Where each pair of optimizer step ``step`` came from ("file:line"), on every rank."""
    return [pairs[j].source for rank in range(order.world_size) for indices in order.micro_batches(step, rank)
            for j in indices]


def save_final(out: Path, policy, tokenizer, base_model: str, merge_lora: bool, weights: dict | None = None) -> None:
    """``final/``: a transformers model directory, or with LoRA a peft adapter directory (and with
    ``merge_lora`` also ``merged/``, the adapters folded into the base weights). ``weights``: the full
    state dict of a sharded policy."""
    for adapter in getattr(policy, "peft_config", {}).values():
        adapter.base_model_name_or_path = base_model  # as the user named it: an alias stays loadable
    save_pretrained_atomically(out / "final", policy, tokenizer, weights)
    if merge_lora and hasattr(policy, "merge_and_unload"):
        save_pretrained_atomically(out / "merged", policy.merge_and_unload(), tokenizer)
