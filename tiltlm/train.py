"""The training recipe: ``setup(config) -> Run``, then ``loop(run)``; one process or a torchrun job.

``setup`` checks every setting and loads data and models before anything is written. Per optimizer step
the loop makes micro-batches of its objective (step.py), backpropagates, clips, steps, logs, evaluates and
checkpoints; exact resume; SIGTERM saves a checkpoint and stops cleanly; non-finite steps are skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from tiltlm import checkpoint as ckpt
from tiltlm import collectives, distributed, rundir, step
from tiltlm.config import ConfigError, TrainConfig, validate
from tiltlm.data.order import DataOrder
from tiltlm.loading import load_sharded
from tiltlm.metrics import MetricSums, MetricsWriter, displacement_warning, truncate_metrics
from tiltlm.models import add_lora, check_same_tokenizer, disable_dropout, load_tokenizer, saved_dtype
from tiltlm.objectives import PairObjective, data_kind, make_objective
from tiltlm.reference import (AdaptersOffReference, OnlineReference, PrecomputedReference, Reference,
                              choose_mode)
from tiltlm.runtime import (Precision, Runtime, lost_update_fraction, return_freed_memory, seed_everything,
                            set_deterministic, start, stop, training_precision)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and where."""


@dataclass
class Run:
    """Everything the loop needs, built by :func:`setup`."""

    config: TrainConfig
    runtime: Runtime
    precision: Precision
    out: Path
    tokenizer: object
    objective: PairObjective  # or another objective of objectives.py: the same interface
    datasets: dict[str, list]  # "train" (and "eval" when given) -> tokenized examples
    order: DataOrder
    total_steps: int
    model: torch.nn.Module  # the policy as trained: a transformers model, or its peft wrapper
    forward: torch.nn.Module  # what computes the policy's scores: CompletionLogps, under DDP or FSDP
    reference: Reference
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_step: int
    log: Callable[[str], None]


@dataclass
class Outcome:
    output: Path
    finished: bool  # the last step is done (else SIGTERM stopped the run)


def train(config: TrainConfig) -> Path:
    """Train a policy with the configured objective; returns the output directory."""
    return run_training(config).output


def run_training(config: TrainConfig) -> Outcome:
    runtime = start(config.device)
    try:
        # one run at a time in an output directory: a second is refused with this one's pid
        with rundir.locked(config.output) if runtime.is_main else contextlib.nullcontext():
            outcome = loop(setup(config, runtime))
        collectives.barrier()  # every rank done (rank 0 saved final/) before the process group is torn down
        return outcome
    finally:
        stop(runtime)


# --- setup -------------------------------------------------------------------------------------------------


def setup(config: TrainConfig, runtime: Runtime) -> Run:
    """Check, load and build everything; write to the output directory only once all of it succeeded."""
    log = print if runtime.is_main else (lambda *args, **kwargs: None)
    validate(config)  # the command line validated already; a config built in Python is checked here
    if config.release_memory:
        return_freed_memory()
    seed_everything(config.seed)
    set_deterministic(config.deterministic)
    out = rundir.check(config)
    sharded = distributed.uses_fsdp(config, runtime)  # also refuses settings FSDP cannot run, before loading
    precision = training_precision(config.dtype, config.bf16_weights, runtime.device)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    if config.ref:  # the reference scores the policy's token ids: they must name the same strings
        check_same_tokenizer(tokenizer, load_tokenizer(config.ref, config.trust_remote_code), (config.model, config.ref))
    datasets = {role: step.read_examples(source, tokenizer, config, log)
                for role, source in (("train", config.data), ("eval", config.eval_data)) if source}
    objective = make_objective(config, tokenizer, one_kind(datasets, config))
    order, total_steps = data_order(config, datasets["train"], objective, runtime)
    reference = make_reference(config, runtime, precision, objective, tokenizer, sharded, log,
                               covers_data=total_steps >= order.steps_per_epoch)
    model, forward = build_policy(config, precision, runtime, reference, datasets, objective, sharded)
    if precision.weights == torch.bfloat16:
        lost = lost_update_fraction((p for p in model.parameters() if p.requires_grad), config.lr)
        log(f"warning: bf16 weights: at lr {config.lr:g}, {lost:.0%} of the trained weights are too large for an "
            f"update of that size to change them; without --bf16-weights they train in float32")
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  fused=runtime.device.type in ("cpu", "cuda"))
    scheduler = get_scheduler("constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
                              optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    start_step = resume(config, out, model, optimizer, scheduler, runtime, order, total_steps, log)
    log(f"policy {config.model} ({'LoRA r=%d' % config.lora_r if config.lora_r else 'full'}, weights "
        f"{precision.weights}, compute {precision.compute}), reference: {reference.mode}, "
        f"objective: {config.loss if isinstance(objective, PairObjective) else type(objective).__name__}, "
        f"layout: {config.layout}, processes: {runtime.world_size}")
    if runtime.is_main:
        rundir.start(config)  # only now, so a mistake found above leaves the directory as it was
    return Run(config, runtime, precision, out, tokenizer, objective, datasets, order, total_steps, model, forward,
               reference, optimizer, scheduler, start_step, log)


def one_kind(datasets: dict[str, list], config: TrainConfig) -> str:
    """The kind of row the run trains on (objectives.data_kind); an eval set of another kind is an error."""
    kind = data_kind(datasets["train"])
    if "eval" in datasets and data_kind(datasets["eval"]) != kind:
        raise ConfigError(f"eval_data {config.eval_data}: {data_kind(datasets['eval'])} rows, but data "
                          f"{config.data} holds {kind}; expected the same kind")
    return kind


def data_order(config: TrainConfig, examples: list, objective, runtime: Runtime) -> tuple[DataOrder, int]:
    lengths = tuple(objective.length(example) for example in examples)
    order = DataOrder(len(examples), config.batch_size, config.grad_accum, runtime.world_size, config.seed,
                      lengths=lengths if config.group_by_length else ())
    if order.steps_per_epoch == 0:
        raise ConfigError(f"data {config.data}: {len(examples)} pairs are fewer than one optimizer step "
                          f"(batch_size x grad_accum x processes = {order.pairs_per_step}); lower batch_size or grad_accum")
    return order, config.max_steps if config.max_steps > 0 else order.steps_per_epoch * config.epochs


def make_reference(config: TrainConfig, runtime: Runtime, precision: Precision, objective, tokenizer,
                   sharded: bool, log, covers_data: bool) -> Reference:
    """The reference strategy of ``config.ref_mode``. A separate reference model is loaded like the policy
    (same dtype, same autocast), so that at step 0 both compute the same numbers: the loss is exactly log 2."""
    mode = choose_mode(config.ref_mode, config.lora_r > 0, config.ref, not objective.needs_reference,
                       covers_data and objective.precomputable)
    if mode == "precompute" and not objective.precomputable:
        raise ConfigError("ref_mode = precompute: KTO's reference point scores mismatched rows that depend on "
                          "the micro-batch, so no table can hold them; use ref_mode online (or adapters-off with LoRA)")
    load = partial(objective.load, config.ref or config.model, precision.weights, config.trust_remote_code,
                   config.attention, precision.device)
    wrap = (lambda scorer: distributed.shard(scorer, runtime)) if sharded else None
    if mode == "precompute":  # without --ref: the policy's own starting weights, no second copy
        return PrecomputedReference(tokenizer, precision, config.logprob_chunk, 4 * config.batch_size,
                                    config.ref_cache, load=load if config.ref else None, wrap=wrap, log=log)
    if mode == "online":
        return OnlineReference(load, precision, config.logprob_chunk, wrap)
    if mode == "adapters-off":
        return AdaptersOffReference(precision, config.logprob_chunk)
    return Reference()


def build_policy(config: TrainConfig, precision: Precision, runtime: Runtime, reference: Reference, datasets: dict,
                 objective, sharded: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The policy and what computes its scores: loaded (dropout off), reference prepared from its starting
    weights, gradient checkpointing, LoRA, placed, wrapped (DDP or FSDP), reference attached. Under FSDP
    rank 0 alone reads the weights (loading.py) and the reference is prepared after, so that rank 0 never
    holds two whole models, and attached to the sharded root, since every sharded forward is a collective."""
    def load() -> torch.nn.Module:
        model = objective.load(config.model, precision.weights, config.trust_remote_code, config.attention,
                               precision.device)
        disable_dropout(model)
        return model

    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora_r > 0:
            model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets,
                             "SEQ_CLS" if config.objective == "reward-model" else "CAUSAL_LM")
        return model.train()

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return distributed.wrap(objective.scorer(model), config.parallel, runtime, precision.compute,
                                config.cpu_offload)

    if sharded:  # LoRA's starting weights (A random, B zero) travel from rank 0 with the base's
        forward = load_sharded(lambda: prepare(load()), wrap, torch.device("cpu") if config.cpu_offload
                               else precision.device)
        model = forward.model
        reference.prepare(model, datasets, objective.collate)
    else:
        model = load()
        reference.prepare(model, datasets, objective.collate)
        model = prepare(model).to(precision.device)
        forward = wrap(model)
    reference.attach(model, forward if sharded else None)
    return model, forward


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (1-D), as common practice
    applies Loshchilov & Hutter's decoupled decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def resume(config: TrainConfig, out: Path, model, optimizer, scheduler, runtime: Runtime, order: DataOrder,
           total_steps: int, log) -> int:
    """The step to start from: 0, or the newest intact checkpoint's step (its state restored). Any number
    of processes may resume it (the checkpoint reshards) if a step takes the same number of pairs: the data
    position is a function of the step."""
    if not config.resume:
        return 0
    latest = ckpt.latest_checkpoint(out / "checkpoints", config.resume_fallback, log)
    done = 0
    if latest is not None:
        state = distributed.load_checkpoint(latest, model, optimizer, scheduler)
        if state.pairs_per_step not in (None, order.pairs_per_step):
            raise ConfigError(f"resume: {latest} was written at {state.pairs_per_step} pairs a step, this run "
                              f"takes {order.pairs_per_step} (batch_size {config.batch_size} x grad_accum "
                              f"{config.grad_accum} x {runtime.world_size} processes); choose batch_size and "
                              f"grad_accum to make {state.pairs_per_step}")
        done = state.step
        log(f"resumed from {latest} (step {done} of {total_steps})")
    if runtime.is_main:
        truncate_metrics(out / "metrics.jsonl", done)
    return done


# --- the loop ----------------------------------------------------------------------------------------------


def loop(run: Run) -> Outcome:
    """Optimizer steps from ``run.start_step`` to ``run.total_steps``, or a checkpoint and a stop on SIGTERM."""
    config, runtime = run.config, run.runtime
    writer = MetricsWriter(run.out, config.tensorboard) if runtime.is_main else None
    stop_requested = []  # SIGTERM (preemption): finish the step, checkpoint, stop
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    health, done = StepHealth(config.max_bad_steps, run.log), run.start_step
    bar = tqdm(range(run.start_step, run.total_steps), initial=run.start_step, total=run.total_steps, desc="train",
               disable=not (runtime.is_main and config.progress))
    try:
        for index in bar:
            row = train_step(run, index, health)
            done = index + 1
            if writer is not None and (done % config.log_every == 0 or done == run.total_steps):
                writer.write(row)
                bar.set_postfix({"loss": f"{row['loss']:.4f}",
                                 **{key.split("/")[-1]: f"{row[key]:.3f}" for key in run.objective.progress_keys}})
            if "eval" in run.datasets and (done % config.eval_every == 0 or done == run.total_steps):
                eval_row = evaluate(run)
                if writer is not None:
                    writer.write({"step": done, "epoch": done / run.order.steps_per_epoch, **eval_row})
            preempted = collectives.any_rank(bool(stop_requested))  # every rank stops at the same step
            if done % config.save_every == 0 or preempted:
                state = ckpt.TrainingState(done, run.order.pairs_per_step)
                distributed.save_checkpoint(run.out / "checkpoints", run.model, run.optimizer, run.scheduler, state,
                                            config.keep_checkpoints, runtime)
            if preempted and done < run.total_steps:
                break
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
        if writer is not None:
            writer.close()
    finish(run, done)
    return Outcome(run.out, done == run.total_steps)


def train_step(run: Run, index: int, health: "StepHealth") -> dict:
    """One optimizer step (skipped if non-finite) on this rank's micro-batches; the row logged for it."""
    config, started, sums, tokens = run.config, time.perf_counter(), MetricSums(), 0
    micro_batches = run.order.micro_batches(index, run.runtime.rank)
    for i, indices in enumerate(micro_batches):
        batch = step.make_batch(run.objective, run.datasets["train"], indices, run.precision.device)
        with distributed.accumulating(run.forward, i < len(micro_batches) - 1):  # DDP: one all-reduce, after the last
            scored = step.score(run.forward, run.reference, run.objective, batch, "train", run.precision)
            # the gradient of the step's mean loss: every micro-batch on every rank holds the same count
            (scored.losses.sum() / (config.batch_size * config.grad_accum)).backward()
        sums.add(scored.metrics)
        tokens += batch.real_tokens
    trainable = [p for group in run.optimizer.param_groups for p in group["params"]]
    grad_norm = distributed.clip_grad_norm(trainable, config.max_grad_norm)
    totals = collectives.sum_over_ranks(sums.totals())  # metrics of all ranks, so every rank agrees
    # the step's one read-back from the device: every metric and the gradient norm together
    values = torch.cat([totals, grad_norm.detach().reshape(1).to(totals)]).tolist()
    row = {"step": index + 1, "epoch": (index + 1) / run.order.steps_per_epoch, **sums.means(values[:-1]),
           "grad_norm": values[-1], "lr": run.scheduler.get_last_lr()[0]}
    if health.accept(row, lambda: step_sources(run, index)):
        run.optimizer.step()  # gradients and metrics are the same on every rank, so all skip together
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    row["tokens_per_second"] = tokens * run.runtime.world_size / (time.perf_counter() - started)
    return row


class StepHealth:
    """Skips non-finite steps (the run stops, naming the step's pairs, past ``limit`` of them) and warns
    once of likelihood displacement (see metrics.displacement_warning)."""

    def __init__(self, limit: int, log) -> None:
        self.limit, self.log, self.bad, self.warned, self.last_finite = limit, log, 0, False, None

    def accept(self, row: dict, sources: Callable[[], list[str]]) -> bool:
        if math.isfinite(row["grad_norm"]) and math.isfinite(row["loss"]):
            self.last_finite = row
            message = displacement_warning(row.get("logps/chosen_change", 0.0), row["rewards/margins"])
            if message and not self.warned:
                self.warned = True
                self.log(f"\nwarning (step {row['step']}): {message}")
            return True
        self.bad += 1
        self.log(f"step {row['step']}: non-finite loss or gradients, step skipped ({self.bad} so far)")
        if self.bad > self.limit:
            raise TrainingError(f"{self.bad} steps with non-finite loss or gradients (limit max_bad_steps = "
                                f"{self.limit}); step {row['step']}'s pairs: {', '.join(sources())}; "
                                f"last finite metrics: {json.dumps(self.last_finite)}")
        return False


def step_sources(run: Run, index: int) -> list[str]:
    """Where each pair of optimizer step ``index`` came from ("file:line"), on every rank."""
    examples = run.datasets["train"]
    return [examples[j].source for rank in range(run.order.world_size)
            for indices in run.order.micro_batches(index, rank) for j in indices]


def evaluate(run: Run) -> dict[str, float]:
    """The eval set's metrics (``eval/...``) with the policy as it is now (sharded: through its root)."""
    scorer = run.forward if distributed.is_sharded(run.forward) else run.objective.scorer(run.model)
    return step.evaluate(scorer, run.reference, run.objective,
                         run.datasets["eval"], "eval", run.config.batch_size, run.precision, progress=run.config.progress)


def finish(run: Run, done: int) -> None:
    """``final/`` after the last step (in the starting checkpoint's dtype), or how to continue a stopped run."""
    if done < run.total_steps:
        run.log(f"\nSIGTERM: checkpoint saved at step {done}; continue with --resume: the run stopped at step "
                f"{done} of {run.total_steps}; tiltlm train --resume {run.out} finishes it")
        return
    dtype, adapter = saved_dtype(run.config.model), distributed.adapter_weights(run.model)  # FSDP + LoRA: gathered
    if distributed.is_sharded(run.model) and adapter is None:  # every rank: the weights gathered one at a time
        distributed.save_final(run.out, run.model, run.tokenizer, dtype, run.runtime)
    elif run.runtime.is_main:
        ckpt.save_final(run.out, run.model, run.tokenizer, run.config.model, dtype, run.config.merge_lora, adapter)
    run.log(f"saved {run.out / 'final'}")
