"""``tiltlm frontier``: the reward / KL frontier of the DPO paper's controlled-sentiment experiment, in
miniature (Rafailov et al. 2023, "Direct Preference Optimization", section 6.1 and Figure 2 left).

Every method trades reward for KL(pi || pi_ref); the better method lies above the others at matching KL.
The reference's samples of the training prompts, labelled by the reward (as in ``tiltlm quickstart``),
train DPO with LoRA at several betas and preferred-FT, the paper's supervised baseline (the length-averaged
NLL of the chosen completions, no reference). Best-of-N keeps the highest-reward of N reference samples;
its KL is known in closed form. Optionally, iterative (online) DPO: each round's policy samples and labels
the training prompts again for the next round, trained against the original reference or the policy it
starts from (``--ref-update fixed|current``).

Every trained policy is measured on the same held-out prompts: its mean reward with a normal 95% interval
over prompts, and KL(pi || pi_ref) estimated from its own samples at temperature 1 as the mean of
``log pi(y|x) - log pi_ref(y|x)``, always against the ORIGINAL reference, so that the points of every
method and round share one x axis. Outputs: see :mod:`tiltlm.frontier_report`; samples/*.jsonl hold every
measured sample with its reward and log-probs, so that every number of the table can be recomputed.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tiltlm.checkpoint import save_pretrained_atomically
from tiltlm.config import ConfigError, TrainConfig, check_options, option, same_as
from tiltlm.experiment import (ExperimentConfig, Labelled, by_prompt, label, lora_run, refuse_existing,
                               rewarded_samples, sample_rows, score_policy, training_shape, write_json, write_jsonl)
from tiltlm.frontier_report import Point, command, interval_dict, render
from tiltlm.generate import read_prompts
from tiltlm.models import ALIASES, load_model, load_tokenizer, parse_dtype, refusing_pickles
from tiltlm.prompts import PROMPTS
from tiltlm.rewards import load_reward
from tiltlm.runtime import pick_device
from tiltlm.stats import format_interval, mean_ci
from tiltlm.train import train


@dataclass
class FrontierConfig(ExperimentConfig):
    output: str = option("runs/frontier", "directory for the report, plot, numbers, samples and runs")
    lr: float = option(7e-4, "learning rate of every training run", above=0)
    prompts: str = option("", "JSONL file, one {\"prompt\": ...} per line (empty: the embedded prompts)")
    train_prompts: int = option(0, "use the first N prompts for preference pairs (0: all that are not held out)",
                                at_least=0)
    heldout: int = option(12, "the last N prompts are held out for measuring", at_least=2)
    betas: str = option("0.05,0.1,0.3,1.0", "comma-separated DPO betas")
    best_of: str = option("1,2,4,8,16", "comma-separated N of the best-of-N baseline")
    eval_samples: int = option(6, "continuations per held-out prompt for each measured policy", at_least=1)
    rounds: int = option(1, "rounds of iterative DPO at --round-beta (1: no iteration)", at_least=1)
    ref_update: str = option("fixed", "reference of rounds 2.. of iterative DPO: fixed (the original model) or "
                                      "current (the policy the round starts from)", choices=("fixed", "current"))
    round_beta: float = option(0.1, "beta of iterative DPO (added to --betas if missing)", above=0)
    gen_batch_size: int = option(16, "sequences per generate call", at_least=1)
    device: str = same_as(TrainConfig, "device")
    dtype: str = same_as(TrainConfig, "dtype")


# Small enough for a tiny test model and a few seconds per training run; explicit options still win.
QUICK = dict(train_prompts=8, heldout=4, samples=2, eval_samples=2, max_new_tokens=8, epochs=1,
             batch_size=4, best_of="1,2,4")


def parse_numbers(text: str, kind: type, name: str) -> tuple:
    """Comma-separated positive numbers, sorted and without repeats; a clear error otherwise."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{name} = {text!r}: expected comma-separated {kind.__name__} values, "
                          f"e.g. {'0.1,0.5' if kind is float else '1,4,16'}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"{name} = {text!r}: expected one or more positive numbers")
    return tuple(sorted(set(values)))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || pi_ref) = log N - (N - 1) / N, in nats.

    With the reference's outputs ranked by reward and F(y) the reference's probability of doing no
    better than y, best-of-N picks y with probability F(y)^N - F(y-)^N, which is N F^(N-1) pi_ref(y)
    when no output carries much mass (distinct samples). Then log(pi_N / pi_ref) = log N + (N - 1) log F
    and, since F is uniform under pi_ref, E_{pi_N}[log F] = -1/N. With ties or heavy outputs the true
    KL is smaller: the formula is an upper bound (Beirami et al. 2024, "Theoretical guarantees on the
    best-of-n alignment policy")."""
    return math.log(n) - (n - 1) / n


def best_of_n_rewards(rewards_by_prompt: list[list[float]], n: int) -> list[float]:
    """Per prompt, the mean over disjoint groups of ``n`` draws (in draw order) of each group's highest
    reward: every group is one independent best-of-N sample, and using all groups lowers the variance.
    Draws beyond the last whole group are left out."""
    for draws in rewards_by_prompt:
        if len(draws) < n:
            raise ValueError(f"best-of-{n} needs at least {n} draws per prompt; got {len(draws)}")
    return [sum(max(draws[g:g + n]) for g in range(0, len(draws) - n + 1, n)) / (len(draws) // n)
            for draws in rewards_by_prompt]


class RunStopped(RuntimeError):
    """A training run ended before its last step (preemption): the frontier cannot go on."""


def train_run(config: FrontierConfig, start: str, labelled: Labelled, run_dir: Path, beta: float,
              loss: str = "sigmoid", ref: str | None = None, merge: bool = False) -> tuple[Path, float]:
    """One LoRA training run from the model ``start``; (its adapter directory, seconds). DPO trains on the
    ``--preferences`` of ``labelled`` with ``ref`` as reference when given, else ``start`` itself (adapters
    off); preferred-FT (loss nll, no reference) on the best completion of each prompt (its pairs' chosen)."""
    started = time.perf_counter()
    ref_mode = "none" if loss == "nll" else ("online" if ref else "adapters-off")
    # preferred-FT reads pairs; a later round may label fewer prompts than a batch holds (ties give none)
    shaped = replace(config, preferences="pair") if loss == "nll" else config
    train(lora_run(config, start, labelled.training(shaped), run_dir, loss=loss, beta=beta, ref=ref,
                   ref_mode=ref_mode, merge_lora=merge, device=config.device, dtype=config.dtype,
                   **training_shape(shaped, labelled.count)))
    if not (run_dir / "final").is_dir():  # train() returns early, with a checkpoint, on SIGTERM
        raise RunStopped(f"training in {run_dir} stopped before its last step (SIGTERM?); nothing after it "
                         f"was measured. Run tiltlm frontier again (with --overwrite) to redo the frontier")
    return run_dir / "final", time.perf_counter() - started


class Frontier:
    """What every step of a run shares; ``reference`` is the original model (KL is always taken against it)."""

    def __init__(self, config: FrontierConfig) -> None:
        """Every user mistake found first, then the reward, tokenizer and reference loaded; the output
        directory is made only after all of that succeeded, so a mistake leaves nothing behind."""
        refuse_existing(config, "report.md", "frontier.json")
        self.config, self.stage = config, 0
        self.betas = parse_numbers(config.betas, float, "betas")
        self.best_of = parse_numbers(config.best_of, int, "best_of")
        if config.samples < 2:
            raise ConfigError(f"samples = {config.samples}: a preference pair needs at least 2 continuations "
                              f"per prompt")
        check_options(config)
        if config.rounds > 1:
            self.betas = parse_numbers(f"{config.betas},{config.round_beta}", float, "round_beta")
        prompts = read_prompts(config.prompts) if config.prompts else list(PROMPTS)
        available = len(prompts) - config.heldout
        wanted = config.train_prompts or available
        if wanted > available or wanted < 1:
            raise ConfigError(f"{len(prompts)} prompts cannot give {wanted} training prompts and "
                              f"{config.heldout} held-out ones; lower --train-prompts or --heldout")
        self.train_prompts, self.heldout = prompts[:wanted], prompts[len(prompts) - config.heldout:]
        torch.manual_seed(config.seed)
        device = pick_device(config.device)
        self.dtype = parse_dtype(config.dtype, device)
        self.reward = load_reward(config.reward, device)
        self.tokenizer = load_tokenizer(config.model)
        self.reference = load_model(config.model, self.dtype).to(device).eval()
        self.out, self.start = Path(config.output), config.model  # start: the model of every run of round 1
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        if config.model in ALIASES:  # a GGUF file, slow to de-quantize: saved once as a plain model directory
            self.start = str(self.out / "runs" / "reference")
            if not (Path(self.start) / "config.json").is_file():
                save_pretrained_atomically(Path(self.start), self.reference, self.tokenizer)
        self.eval_seed = config.seed + 1  # every measured policy samples the held-out prompts with it, as best-of-N

    def announce(self, text: str) -> None:
        self.stage += 1
        print(f"[{self.stage}/{len(self.betas) + self.config.rounds + 2}] {text}")

    def best_of_n_points(self) -> list[Point]:
        """The best-of-N baseline: max(N) draws per held-out prompt from the reference, shared by every N."""
        started, config = time.perf_counter(), self.config
        samples, rewards = rewarded_samples(self.reference, self.tokenizer, self.heldout, self.reward,
                                            max(self.best_of), config.max_new_tokens, self.eval_seed,
                                            config.gen_batch_size)
        write_jsonl(self.out / "samples" / "reference-draws.jsonl", sample_rows(samples, rewards))
        draws = [[reward for reward, _ in scored] for scored in by_prompt(samples, rewards)]
        seconds = time.perf_counter() - started
        return [Point(name=f"best-of-{n}", method="best-of-n", n=n, kl=(best_of_n_kl(n),) * 3,
                      kl_source="analytic: log N - (N-1)/N", reward=mean_ci(best_of_n_rewards(draws, n)),
                      samples_file="samples/reference-draws.jsonl", measure_seconds=seconds) for n in self.best_of]

    def measure(self, name: str, method: str, adapter: Path, train_seconds: float, base,
                **labels) -> tuple[Point, object]:
        """The point of the policy ``base`` + ``adapter`` (merged into ``base`` in place), and that policy.
        Its samples, with their rewards and log-probs, are saved beside the report."""
        from peft import PeftModel

        started, config = time.perf_counter(), self.config
        with refusing_pickles(str(adapter)):
            policy = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()  # one plain model to sample
        run_name = adapter.parent.name
        score = score_policy(policy, self.tokenizer, self.heldout, self.reward, config.eval_samples,
                             config.max_new_tokens, self.eval_seed, config.gen_batch_size, reference=self.reference)
        write_jsonl(self.out / "samples" / f"{run_name}.jsonl", score.rows)
        point = Point(name=name, method=method, reward=score.reward, kl=score.kl, kl_source="samples",
                      samples_file=f"samples/{run_name}.jsonl", run_dir=f"runs/{run_name}",
                      train_seconds=train_seconds, measure_seconds=time.perf_counter() - started, **labels)
        print(f"      {name}: reward {format_interval(point.reward)}, KL {format_interval(point.kl)}")
        return point, policy

    def one_shot_points(self, pairs: Labelled) -> list[Point]:
        """DPO at every beta and preferred-FT, each trained on ``pairs`` from the reference."""
        config, runs, points = self.config, self.out / "runs", []
        for beta in self.betas:
            self.announce(f"DPO, beta = {beta:g}")
            # the run iterative DPO continues from is also saved merged, as the start of round 2
            adapter, seconds = train_run(config, self.start, pairs, runs / f"dpo-beta{beta:g}", beta,
                                         merge=config.rounds > 1 and beta == config.round_beta)
            points.append(self.measure(f"DPO beta={beta:g}", "dpo", adapter, seconds, copy.deepcopy(self.reference),
                                       beta=beta, round=1)[0])
            gc.collect()  # one trained policy in memory at a time
        self.announce("preferred-FT (NLL of the chosen completions, no reference)")
        adapter, seconds = train_run(config, self.start, pairs, runs / "preferred-ft", beta=0.1, loss="nll")
        points.append(self.measure("preferred-FT", "preferred-ft", adapter, seconds, copy.deepcopy(self.reference))[0])
        gc.collect()
        return points

    def iterative_points(self) -> list[Point]:
        """Rounds 2.. of iterative DPO: each round's policy labels new pairs and the next round trains from it."""
        config, out, beta, points = self.config, self.out, self.config.round_beta, []
        previous = out / "runs" / f"dpo-beta{beta:g}"
        if config.rounds > 1:
            policy = load_model(str(previous / "merged"), self.dtype).to(self.reference.device)
        for k in range(2, config.rounds + 1):
            self.announce(f"iterative DPO round {k} of {config.rounds} (beta {beta:g}, reference {config.ref_update})")
            round_pairs = label(policy, self.tokenizer, self.train_prompts, self.reward, config.samples,
                                config.max_new_tokens, config.seed + 100 + k, config.gen_batch_size,
                                out / f"pairs-round{k}.jsonl")
            run_dir = out / "runs" / f"dpo-beta{beta:g}-round{k}"
            adapter, seconds = train_run(config, str(previous / "merged"), round_pairs, run_dir, beta,
                                         ref=self.start if config.ref_update == "fixed" else None,
                                         merge=k < config.rounds)
            point, policy = self.measure(f"DPO beta={beta:g} round {k}", "iterative-dpo", adapter, seconds, policy,
                                         beta=beta, round=k, extra={"ref_update": config.ref_update})
            points.append(point)
            previous = run_dir
        return points


def run_frontier(config: FrontierConfig) -> Path:
    """Run the experiment (see the module docstring); returns the output directory."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    run = Frontier(config)
    run.announce(f"preference pairs from the reference ({len(run.train_prompts)} prompts, "
                 f"{config.samples} continuations each)")
    pairs = label(run.reference, run.tokenizer, run.train_prompts, run.reward, config.samples, config.max_new_tokens,
                  config.seed, config.gen_batch_size, run.out / "pairs-round1.jsonl")
    run.announce(f"best-of-N from the reference, N in {list(run.best_of)}")
    points = run.best_of_n_points() + run.one_shot_points(pairs) + run.iterative_points()
    machine = {"device": str(run.reference.device), "torch_threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_at_start,
               "load_average_end": os.getloadavg()[0]}
    write_json(run.out / "frontier.json", {
        "command": command(config), "config": asdict(config), "betas": list(run.betas), "best_of": list(run.best_of),
        "train_prompts": len(run.train_prompts), "heldout_prompts": run.heldout, "eval_seed": run.eval_seed,
        "pairs_seed_round1": config.seed, "wall_seconds": time.perf_counter() - started, "machine": machine,
        "points": [{**asdict(p), "reward": interval_dict(p.reward), "kl": interval_dict(p.kl)} for p in points]})
    print(render(run.out).read_text(encoding="utf-8"))
    return run.out
