"""``tiltlm frontier``: the reward / KL frontier of the DPO paper's controlled-sentiment experiment, in
miniature (Rafailov et al. 2023, "Direct Preference Optimization", section 6.1 and Figure 2 left).

The paper asks which method gets the most reward for a given divergence from the reference: every
method trades reward for KL(pi || pi_ref), and the better method lies above the others at matching KL.
Here, with the embedded default (SmolLM2-135M-Instruct, VADER, the prompts of :mod:`tiltlm.prompts`):

1. the reference samples continuations of the training prompts; the reward labels them, and the best
   and the worst of each prompt make a preference pair (as in ``tiltlm quickstart``);
2. DPO with LoRA trains on these pairs at several betas;
3. preferred-FT, the paper's supervised baseline, fine-tunes on the chosen completions of the same
   pairs (the length-averaged NLL, no reference);
4. best-of-N samples N continuations of each held-out prompt from the reference and keeps the one with
   the highest reward; its KL to the reference is known in closed form, ``log N - (N - 1) / N``;
5. optionally, iterative (online) DPO: the policy after a round samples the training prompts again,
   the reward labels the new samples, and the next round trains from that policy, against either the
   original reference or the policy it starts from (``--ref-update fixed|current``).

Every trained policy is measured the same way on the same held-out prompts: its mean reward with a
normal 95% interval over prompts, and KL(pi || pi_ref) estimated from its own samples at temperature 1
as the mean of ``log pi(y|x) - log pi_ref(y|x)``, always against the ORIGINAL reference, so that the
points of every method and round share one x axis.

Outputs in ``--output``: report.md (table, plot, exact command, wall time), frontier.png, frontier.json
(every point with its numbers and settings), samples/*.jsonl (every measured sample with its reward and
log-probs, so every number of the table can be recomputed), pairs-round*.jsonl and runs/ (one training
run directory per trained policy).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from matplotlib.figure import Figure

from tiltlm.compare import mean_ci
from tiltlm.config import ConfigError, TrainConfig
from tiltlm.data.types import DataError, Text
from tiltlm.experiment import per_prompt_means, preference_pairs, write_jsonl
from tiltlm.generate import Sample, read_prompts, sample, score_logps
from tiltlm.models import ALIASES, ModelError, load_model, load_tokenizer, parse_dtype
from tiltlm.prompts import PROMPTS
from tiltlm.rewards import RewardError, load_reward
from tiltlm.runtime import pick_device
from tiltlm.checkpoint import save_pretrained_atomically
from tiltlm.train import train


@dataclass
class FrontierConfig:
    model: str = "smollm2-135m"
    reward: str = "vader"
    prompts: str = ""  # JSONL file with a "prompt" per row; empty: the embedded prompts
    train_prompts: int = 0  # the first ones; 0: every prompt that is not held out
    heldout: int = 12  # the last prompts of the list
    betas: str = "0.05,0.1,0.3,1.0"
    best_of: str = "1,2,4,8,16"
    samples: int = 4  # continuations per training prompt, labelled into one pair per prompt
    eval_samples: int = 6  # continuations per held-out prompt, for each measured policy
    max_new_tokens: int = 24
    lr: float = 7e-4
    epochs: int = 3
    batch_size: int = 6
    lora_r: int = 16
    rounds: int = 1  # rounds of iterative DPO at round_beta; 1: none
    ref_update: str = "fixed"  # fixed | current: the reference of rounds 2, 3, ...
    round_beta: float = 0.1
    gen_batch_size: int = 16  # sequences per generate call
    output: str = "runs/frontier"
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


# Small enough for a tiny test model and a few seconds per training run; explicit options still win.
QUICK = dict(train_prompts=8, heldout=4, samples=2, eval_samples=2, max_new_tokens=8, epochs=1,
             batch_size=4, best_of="1,2,4")

HELP = {
    "model": "reference model: directory, hub id or alias",
    "reward": "vader, module:function, file.py:function, or a sequence-classifier directory",
    "prompts": "JSONL file, one {\"prompt\": ...} per line (default: the embedded prompts)",
    "train_prompts": "use the first N prompts for preference pairs (0: all that are not held out)",
    "heldout": "the last N prompts are held out for measuring",
    "betas": "comma-separated DPO betas",
    "best_of": "comma-separated N of the best-of-N baseline",
    "samples": "continuations per training prompt (best and worst make its pair)",
    "eval_samples": "continuations per held-out prompt for each measured policy",
    "rounds": "rounds of iterative DPO at --round-beta (1: no iteration)",
    "ref_update": "reference of rounds 2.. of iterative DPO: fixed (the original model) or current "
                  "(the policy the round starts from)",
    "round_beta": "beta of iterative DPO (added to --betas if missing)",
    "gen_batch_size": "sequences per generate call",
    "output": "directory for the report, plot, numbers, samples and runs",
    "overwrite": "replace a report already in --output",
    "dtype": "auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16",
}


# ------------------------------------------------------------------------------ settings and checks


@dataclass(frozen=True)
class Plan:
    """The checked, parsed settings of a run."""

    betas: tuple[float, ...]
    best_of: tuple[int, ...]
    train_prompts: list[Text]
    heldout: list[Text]


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


def check(config: FrontierConfig) -> Plan:
    """Every user mistake found before anything runs or is written."""
    out = Path(config.output)
    if not config.overwrite:
        existing = [name for name in ("report.md", "frontier.json") if (out / name).exists()]
        if existing:
            raise ConfigError(f"{out} already holds a frontier report ({', '.join(existing)}); use "
                              f"--overwrite or another --output")
    betas = parse_numbers(config.betas, float, "betas")
    best_of = parse_numbers(config.best_of, int, "best_of")
    if config.rounds < 1:
        raise ConfigError(f"rounds = {config.rounds}: expected 1 (no iteration) or more")
    if config.ref_update not in ("fixed", "current"):
        raise ConfigError(f"ref_update = {config.ref_update!r}: expected fixed or current")
    if config.rounds > 1:
        if not config.round_beta > 0:
            raise ConfigError(f"round_beta = {config.round_beta}: expected a positive number")
        betas = parse_numbers(f"{config.betas},{config.round_beta}", float, "round_beta")
    if config.samples < 2:
        raise ConfigError(f"samples = {config.samples}: a preference pair needs at least 2 continuations "
                          f"per prompt")
    for name in ("eval_samples", "max_new_tokens", "epochs", "batch_size", "gen_batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} = {getattr(config, name)}: expected a positive number")
    if not config.lr > 0:
        raise ConfigError(f"lr = {config.lr}: expected a positive learning rate")
    if config.lora_r < 1:
        raise ConfigError(f"lora_r = {config.lora_r}: expected a rank of at least 1 (every policy here trains "
                          f"LoRA adapters, so that one CPU can train several)")
    if config.prompts and not Path(config.prompts).is_file():
        raise ConfigError(f"prompts file {config.prompts}: no such file")
    prompts = read_prompts(config.prompts) if config.prompts else list(PROMPTS)
    if config.heldout < 2:
        raise ConfigError(f"heldout = {config.heldout}: a 95% interval over prompts needs at least 2")
    available = len(prompts) - config.heldout
    wanted = config.train_prompts or available
    if config.train_prompts < 0 or wanted > available or wanted < 1:
        raise ConfigError(f"{len(prompts)} prompts cannot give {wanted} training prompts and "
                          f"{config.heldout} held-out ones; lower --train-prompts or --heldout")
    return Plan(betas, best_of, prompts[:wanted], prompts[len(prompts) - config.heldout:])


# --------------------------------------------------------------------------------------- measuring


@dataclass
class Point:
    """One point of the frontier. ``kl`` is sampled (trained policies) or analytic (best-of-N);
    intervals are (mean, low, high)."""

    name: str
    method: str  # dpo | preferred-ft | best-of-n | iterative-dpo
    reward: tuple[float, float, float]
    kl: tuple[float, float, float]
    kl_source: str
    beta: float | None = None
    round: int | None = None
    n: int | None = None
    samples_file: str = ""
    run_dir: str | None = None
    train_seconds: float = 0.0
    measure_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def sample_rows(samples: list[Sample], rewards: list[float], policy_logps: list[float] | None = None,
                ref_logps: list[float] | None = None) -> list[dict]:
    """Samples as JSONL rows, with the token ids the log-probs were computed on."""
    rows = []
    for i, s in enumerate(samples):
        row = {"index": s.index, "sample": s.sample, "prompt": s.prompt, "completion": s.completion,
               "reward": rewards[i], "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids,
               "finished": s.finished}
        if policy_logps is not None:
            row.update(logp_policy=policy_logps[i], logp_ref=ref_logps[i])
        rows.append(row)
    return rows


def measure(policy, reference, tokenizer, prompts: list[Text], reward: Callable, config: FrontierConfig,
            seed: int, samples_file: Path) -> tuple[tuple, tuple]:
    """Mean reward and sampled KL(pi || pi_ref) of ``policy`` on ``prompts``, each with its 95% interval
    over prompts (a prompt's samples are averaged first: they are not independent); the samples, with
    their rewards and log-probs, are written to ``samples_file``.

    Sampling is at temperature 1 with no top-p or top-k, from the policy itself, so that the mean
    log-ratio is an unbiased estimate of the KL (see :mod:`tiltlm.generate`)."""
    samples = sample(policy, tokenizer, prompts, n=config.eval_samples, max_new_tokens=config.max_new_tokens,
                     temperature=1.0, top_p=1.0, seed=seed, batch_size=config.gen_batch_size, progress=True)
    rewards = reward([s.prompt for s in samples], [s.completion for s in samples])
    policy_logps = score_logps(policy, tokenizer, samples, batch_size=config.gen_batch_size)
    ref_logps = score_logps(reference, tokenizer, samples, batch_size=config.gen_batch_size)
    log_ratios = [p - r for p, r in zip(policy_logps, ref_logps)]
    write_jsonl(samples_file, sample_rows(samples, rewards, policy_logps, ref_logps))
    return mean_ci(per_prompt_means(rewards, samples)), mean_ci(per_prompt_means(log_ratios, samples))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || pi_ref) = log N - (N - 1) / N, in nats.

    With the reference's outputs ranked by reward and F(y) the reference's probability of doing no
    better than y, best-of-N picks y with probability F(y)^N - F(y-)^N, which is N F^(N-1) pi_ref(y)
    when no output carries much mass (distinct samples). Then log(pi_N / pi_ref) = log N + (N - 1) log F
    and, since F is uniform under pi_ref, E_{pi_N}[log F] = -1/N. With ties or heavy outputs the true
    KL is smaller: the formula is an upper bound (Beirami et al. 2024, "Theoretical guarantees on the
    best-of-n alignment policy")."""
    if n < 1:
        raise ValueError(f"N = {n}: expected at least 1")
    return math.log(n) - (n - 1) / n


def best_of_n_rewards(rewards_by_prompt: list[list[float]], n: int) -> list[float]:
    """Per prompt, the mean over disjoint groups of ``n`` draws (in draw order) of each group's highest
    reward: every group is one independent best-of-N sample, and using all groups lowers the variance.
    Draws beyond the last whole group are left out."""
    means = []
    for draws in rewards_by_prompt:
        groups = len(draws) // n
        if groups == 0:
            raise ValueError(f"best-of-{n} needs at least {n} draws per prompt; got {len(draws)}")
        means.append(sum(max(draws[g * n:(g + 1) * n]) for g in range(groups)) / groups)
    return means


def best_of_n_points(reference, tokenizer, plan: Plan, reward: Callable, config: FrontierConfig,
                     out: Path, seed: int) -> list[Point]:
    """The best-of-N baseline: max(N) draws per held-out prompt from the reference, shared by every N."""
    started = time.perf_counter()
    draws = max(plan.best_of)
    samples = sample(reference, tokenizer, plan.heldout, n=draws, max_new_tokens=config.max_new_tokens,
                     temperature=1.0, top_p=1.0, seed=seed, batch_size=config.gen_batch_size, progress=True)
    rewards = reward([s.prompt for s in samples], [s.completion for s in samples])
    samples_file = write_jsonl(out / "samples" / "reference-draws.jsonl", sample_rows(samples, rewards))
    by_prompt: dict[int, list[float]] = {}
    for s, r in sorted(zip(samples, rewards), key=lambda item: (item[0].index, item[0].sample)):
        by_prompt.setdefault(s.index, []).append(r)
    seconds = time.perf_counter() - started
    points = []
    for n in plan.best_of:
        kl = best_of_n_kl(n)
        points.append(Point(name=f"best-of-{n}", method="best-of-n", n=n, kl=(kl, kl, kl),
                            kl_source="analytic: log N - (N-1)/N",
                            reward=mean_ci(best_of_n_rewards(list(by_prompt.values()), n)),
                            samples_file=str(samples_file.relative_to(out)), measure_seconds=seconds))
    return points


# ---------------------------------------------------------------------------------------- training


class RunStopped(RuntimeError):
    """A training run ended before its last step (preemption): the frontier cannot go on."""


def train_run(config: FrontierConfig, start: str, data: Path, run_dir: Path, beta: float, loss: str = "sigmoid",
              ref: str | None = None, merge: bool = False) -> tuple[Path, float]:
    """One LoRA training run from the model ``start``; (its adapter directory, seconds). DPO's reference
    is ``ref`` when given, else ``start`` itself (adapters off); preferred-FT (loss nll) has none."""
    started = time.perf_counter()
    ref_mode = "none" if loss == "nll" else ("online" if ref else "adapters-off")
    # A later round may label fewer pairs than a batch holds (prompts whose samples all tie give none).
    pairs = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
    train(TrainConfig(
        model=start, data=str(data), output=str(run_dir), overwrite=True, loss=loss, beta=beta, ref=ref,
        ref_mode=ref_mode, lr=config.lr, epochs=config.epochs, batch_size=min(config.batch_size, pairs), grad_accum=1,
        lora_r=config.lora_r, merge_lora=merge, warmup_ratio=0.1, max_length=256, max_prompt_length=64,
        save_every=10_000, log_every=1, tensorboard=False, seed=config.seed, device=config.device,
        dtype=config.dtype))
    if not (run_dir / "final").is_dir():  # train() returns early, with a checkpoint, on SIGTERM
        raise RunStopped(f"training in {run_dir} stopped before its last step (SIGTERM?); nothing after it "
                         f"was measured. Run tiltlm frontier again (with --overwrite) to redo the frontier")
    return run_dir / "final", time.perf_counter() - started


def with_adapter(model, adapter_dir: Path):
    """``model`` with the LoRA adapter folded into its weights (in place): one plain model to sample."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def plain_copy(config: FrontierConfig, reference, tokenizer, out: Path) -> str:
    """The model name every training run starts from. An alias is a GGUF file that takes a long time to
    de-quantize: it is saved once as a plain model directory, which loads in seconds."""
    if config.model not in ALIASES:
        return config.model
    directory = out / "runs" / "reference"
    if not (directory / "config.json").is_file():
        save_pretrained_atomically(directory, reference, tokenizer)
    return str(directory)


def label_pairs(policy, tokenizer, plan: Plan, reward: Callable, config: FrontierConfig, seed: int,
                path: Path) -> Path:
    """Continuations of the training prompts from ``policy``, labelled by the reward into pairs."""
    samples = sample(policy, tokenizer, plan.train_prompts, n=config.samples, max_new_tokens=config.max_new_tokens,
                     temperature=1.0, top_p=1.0, seed=seed, batch_size=config.gen_batch_size, progress=True)
    rewards = reward([s.prompt for s in samples], [s.completion for s in samples])
    pairs = preference_pairs(samples, rewards)
    if not pairs:
        raise ConfigError(f"the reward gave every continuation of each training prompt the same score, so "
                          f"there is no preference pair to train on ({path.name}); use more --samples or "
                          f"longer --max-new-tokens")
    print(f"      {len(pairs)} preference pairs -> {path}")
    return write_jsonl(path, pairs)


# ---------------------------------------------------------------------------------------- the run


@dataclass
class Bench:
    """What every measurement shares: the original reference (KL is always taken against it), the
    held-out prompts, the reward and the seed of held-out sampling."""

    reference: object
    tokenizer: object
    plan: Plan
    reward: Callable
    config: FrontierConfig
    out: Path
    eval_seed: int


def measure_trained(bench: Bench, name: str, method: str, adapter: Path, train_seconds: float, base,
                    **labels) -> tuple[Point, object]:
    """The point of the policy ``base`` + ``adapter`` (merged into ``base`` in place), and that policy."""
    started = time.perf_counter()
    policy = with_adapter(base, adapter)
    run_name = adapter.parent.name
    reward_ci, kl_ci = measure(policy, bench.reference, bench.tokenizer, bench.plan.heldout, bench.reward,
                               bench.config, bench.eval_seed, bench.out / "samples" / f"{run_name}.jsonl")
    point = Point(name=name, method=method, reward=reward_ci, kl=kl_ci, kl_source="samples",
                  samples_file=f"samples/{run_name}.jsonl", run_dir=f"runs/{run_name}",
                  train_seconds=train_seconds, measure_seconds=time.perf_counter() - started, **labels)
    print(f"      {name}: reward {fmt(point.reward)}, KL {fmt(point.kl)}")
    return point, policy


def run_frontier(config: FrontierConfig) -> Path:
    """Run the experiment (see the module docstring); returns the output directory."""
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    plan = check(config)
    out = Path(config.output)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    dtype = parse_dtype(config.dtype, device)
    reward = load_reward(config.reward, device)
    tokenizer = load_tokenizer(config.model)
    reference = load_model(config.model, dtype).to(device).eval()
    (out / "samples").mkdir(parents=True, exist_ok=True)  # only now: a mistake above leaves nothing behind
    start = plain_copy(config, reference, tokenizer, out)
    # Every measured policy samples the held-out prompts with one seed, as the best-of-N draws do.
    bench = Bench(reference, tokenizer, plan, reward, config, out, eval_seed=config.seed + 1)
    stages = iter(range(1, len(plan.betas) + config.rounds + 3))
    total = len(plan.betas) + config.rounds + 2

    print(f"[{next(stages)}/{total}] preference pairs from the reference ({len(plan.train_prompts)} prompts, "
          f"{config.samples} continuations each)")
    pairs = label_pairs(reference, tokenizer, plan, reward, config, config.seed, out / "pairs-round1.jsonl")

    print(f"[{next(stages)}/{total}] best-of-N from the reference, N in {list(plan.best_of)}")
    points = best_of_n_points(reference, tokenizer, plan, reward, config, out, bench.eval_seed)

    for beta in plan.betas:
        print(f"[{next(stages)}/{total}] DPO, beta = {beta:g}")
        # the run iterative DPO continues from is also saved merged, as the start of round 2
        adapter, seconds = train_run(config, start, pairs, out / "runs" / f"dpo-beta{beta:g}", beta,
                                     merge=config.rounds > 1 and beta == config.round_beta)
        point, _ = measure_trained(bench, f"DPO beta={beta:g}", "dpo", adapter, seconds, copy.deepcopy(reference),
                                   beta=beta, round=1)
        points.append(point)
        gc.collect()  # one trained policy in memory at a time

    print(f"[{next(stages)}/{total}] preferred-FT (NLL of the chosen completions, no reference)")
    adapter, seconds = train_run(config, start, pairs, out / "runs" / "preferred-ft", beta=0.1, loss="nll")
    point, _ = measure_trained(bench, "preferred-FT", "preferred-ft", adapter, seconds, copy.deepcopy(reference))
    points.append(point)
    gc.collect()

    beta = config.round_beta
    previous = out / "runs" / f"dpo-beta{beta:g}"
    policy = load_model(str(previous / "merged"), dtype).to(device) if config.rounds > 1 else None
    for k in range(2, config.rounds + 1):
        print(f"[{next(stages)}/{total}] iterative DPO round {k} of {config.rounds} (beta {beta:g}, reference "
              f"{config.ref_update})")
        round_pairs = label_pairs(policy, tokenizer, plan, reward, config, config.seed + 100 + k,
                                  out / f"pairs-round{k}.jsonl")
        run_dir = out / "runs" / f"dpo-beta{beta:g}-round{k}"
        adapter, seconds = train_run(config, str(previous / "merged"), round_pairs, run_dir, beta,
                                     ref=start if config.ref_update == "fixed" else None, merge=k < config.rounds)
        point, policy = measure_trained(bench, f"DPO beta={beta:g} round {k}", "iterative-dpo", adapter, seconds,
                                        policy, beta=beta, round=k, extra={"ref_update": config.ref_update})
        points.append(point)
        previous = run_dir

    seconds = time.perf_counter() - started
    load_at_end = os.getloadavg()[0]
    machine = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "platform": platform.platform(), "load_average_start": load_at_start,
               "load_average_end": load_at_end}
    write_json(out / "frontier.json", config, plan, points, seconds, machine, bench.eval_seed)
    print(render(out).read_text(encoding="utf-8"))
    return out


# ----------------------------------------------------------------------------------------- outputs


def fmt(interval: tuple[float, float, float]) -> str:
    mean, low, high = interval
    if low == high:
        return f"{mean:.3f}"
    return f"{mean:+.3f} ({low:+.3f} to {high:+.3f})"


def interval_dict(interval: tuple[float, float, float]) -> dict:
    mean, low, high = interval
    clean = [None if math.isnan(v) else v for v in (mean, low, high)]  # NaN is not JSON
    return dict(zip(("mean", "low", "high"), clean))


def write_json(path: Path, config: FrontierConfig, plan: Plan, points: list[Point], seconds: float,
               machine: dict, eval_seed: int) -> Path:
    rows = []
    for p in points:
        row = asdict(p)
        row["reward"], row["kl"] = interval_dict(p.reward), interval_dict(p.kl)
        rows.append(row)
    document = {"command": command(config), "config": asdict(config), "betas": list(plan.betas),
                "best_of": list(plan.best_of), "train_prompts": len(plan.train_prompts),
                "heldout_prompts": plan.heldout, "eval_seed": eval_seed, "pairs_seed_round1": config.seed,
                "wall_seconds": seconds, "machine": machine, "points": rows}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def point_from(row: dict) -> Point:
    """A point read back from frontier.json (a missing interval bound, written as null, is NaN)."""
    def interval(values: dict) -> tuple[float, float, float]:
        return tuple(math.nan if values[k] is None else values[k] for k in ("mean", "low", "high"))

    return Point(**{**row, "reward": interval(row["reward"]), "kl": interval(row["kl"])})


def render(out: Path) -> Path:
    """frontier.png and report.md drawn from frontier.json alone, so that the report always shows the
    numbers that were saved; returns the report's path."""
    document = json.loads((out / "frontier.json").read_text(encoding="utf-8"))
    config = FrontierConfig(**document["config"])
    points = [point_from(row) for row in document["points"]]
    plot = plot_frontier(points, out / "frontier.png", config)
    return write_report(out, document, config, points, plot)


def command(config: FrontierConfig) -> str:
    """The command that repeats this run: every option that differs from the defaults."""
    defaults = FrontierConfig()
    parts = ["tiltlm", "frontier"]
    for f in fields(FrontierConfig):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        parts += [flag] if isinstance(value, bool) else [flag, str(value)]
    return " ".join(parts)


STYLE = {"dpo": ("o", "tab:blue"), "iterative-dpo": ("D", "tab:purple"), "preferred-ft": ("s", "tab:orange"),
         "best-of-n": ("^", "tab:green")}
LABEL = {"dpo": "DPO (one point per beta)", "iterative-dpo": "iterative DPO (rounds)",
         "preferred-ft": "preferred-FT (SFT on chosen)", "best-of-n": "best-of-N from the reference"}


def short(name: str) -> str:
    """A model or reward name short enough for a plot: a path's last part (and a reward's function)."""
    head, colon, function = name.rpartition(":") if ":" in name else (name, "", "")
    return Path(head).name + colon + function


def plot_frontier(points: list[Point], path: Path, config: FrontierConfig) -> Path:
    """Reward against KL with 95% error bars on both axes (none on best-of-N's analytic KL)."""
    figure = Figure(figsize=(9, 6.8), layout="constrained")
    # the note goes in a strip of its own below the axes, where it cannot hide a point
    ax, strip = figure.subplots(2, 1, height_ratios=[10, 1.2])
    for method in ("best-of-n", "preferred-ft", "iterative-dpo", "dpo"):  # DPO drawn over round 1
        chosen = [p for p in points if p.method == method]
        if method == "iterative-dpo" and chosen:  # the chain starts at the one-shot DPO point of its beta
            chosen = [p for p in points if p.method == "dpo" and p.beta == config.round_beta] + chosen
        if not chosen:
            continue
        marker, color = STYLE[method]
        xs, ys = [p.kl[0] for p in chosen], [p.reward[0] for p in chosen]
        xerr = [[max(p.kl[0] - p.kl[1], 0) for p in chosen], [max(p.kl[2] - p.kl[0], 0) for p in chosen]]
        yerr = [[p.reward[0] - p.reward[1] for p in chosen], [p.reward[2] - p.reward[0] for p in chosen]]
        linestyle = "-" if method in ("best-of-n", "iterative-dpo") else "none"
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker=marker, color=color, linestyle=linestyle,
                    capsize=3, markersize=7, label=LABEL[method])
        for p in chosen:
            text = (f"N={p.n}" if p.n else f"round {p.round}" if method == "iterative-dpo"
                    else f"β={p.beta:g}" if p.beta else "")
            if text:  # round labels below the point: round 1 is also a DPO point, labelled above
                offset = (6, -12) if method == "iterative-dpo" else (6, 6)
                ax.annotate(text, (p.kl[0], p.reward[0]), textcoords="offset points", xytext=offset,
                            fontsize=8, color=color)
    note = ("best-of-N: KL = log N - (N-1)/N (analytic; no interval)\n"
            "trained policies: KL = mean of log π(y|x) - log π_ref(y|x) over their own samples\n"
            "(temperature 1); every KL is against the ORIGINAL reference, iterative rounds included\n"
            "error bars: normal 95% intervals over held-out prompts")
    strip.axis("off")
    strip.text(0.0, 1.0, note, transform=strip.transAxes, ha="left", va="top", fontsize=8)
    ax.set_xlabel("KL(π || π_ref), nats per completion")
    ax.set_ylabel(f"mean reward ({short(config.reward)}) on held-out prompts")
    ax.set_title(f"Reward vs KL from the reference {short(config.model)} (DPO paper, section 6.1, in miniature)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def table(points: list[Point]) -> list[str]:
    lines = ["| point | method | beta | round | N | mean reward (95% CI) | KL nats (95% CI) | KL from | "
             "train s | measure s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.name} | {p.method} | {'' if p.beta is None else f'{p.beta:g}'} | "
                     f"{'' if p.round is None else p.round} | {'' if p.n is None else p.n} | {fmt(p.reward)} | "
                     f"{fmt(p.kl)} | {p.kl_source} | {p.train_seconds:.1f} | {p.measure_seconds:.1f} |")
    return lines


def dpo_reward_at(points: list[Point], kl: float) -> tuple[float, Point, Point] | None:
    """One-shot DPO's mean reward at ``kl``, interpolated linearly between the two DPO points whose KLs
    bracket it, with those two points; None outside the DPO points' KL range. This is how the DPO paper
    reads its frontier (Figure 2 left): which method gets more reward at the same KL."""
    dpo = sorted((p for p in points if p.method == "dpo"), key=lambda p: p.kl[0])
    for low, high in zip(dpo, dpo[1:]):
        if low.kl[0] <= kl <= high.kl[0]:
            span = high.kl[0] - low.kl[0]
            share = (kl - low.kl[0]) / span if span > 0 else 0.0
            return low.reward[0] + share * (high.reward[0] - low.reward[0]), low, high
    return None


def matching_kl(points: list[Point]) -> list[str]:
    """One line per non-DPO point: its reward against DPO's at the same KL."""
    lines = []
    for p in points:
        if p.method == "dpo":
            continue
        found = dpo_reward_at(points, p.kl[0])
        if found is None:
            # outside DPO's KL range a DPO point can still dominate: as much reward or more for less KL
            better = [d for d in points if d.method == "dpo" and d.kl[0] <= p.kl[0] and d.reward[0] >= p.reward[0]]
            verdict = ("dominated by DPO at " + ", ".join(f"beta {d.beta:g} (KL {d.kl[0]:.3f}, reward "
                                                          f"{d.reward[0]:+.3f})" for d in better)
                       + ": as much reward or more for less KL") if better else "no DPO point dominates it"
            lines.append(f"- {p.name} (KL {p.kl[0]:.3f}, reward {p.reward[0]:+.3f}): outside the KL range of "
                         f"the DPO points; {verdict}")
            continue
        reward, low, high = found
        lines.append(f"- {p.name} (KL {p.kl[0]:.3f}): reward {p.reward[0]:+.3f}; DPO at the same KL "
                     f"(between beta {low.beta:g} and {high.beta:g}): {reward:+.3f}, so DPO is "
                     f"{'above' if reward > p.reward[0] else 'below'} by {abs(reward - p.reward[0]):.3f}")
    return lines


def write_report(out: Path, document: dict, config: FrontierConfig, points: list[Point], plot: Path) -> Path:
    machine, seconds = document["machine"], document["wall_seconds"]
    pairs = sum(1 for _ in open(out / "pairs-round1.jsonl", encoding="utf-8"))
    iterative = ""
    if config.rounds > 1:
        iterative = (f" Iterative DPO: {config.rounds} rounds at beta {config.round_beta:g}, each round "
                     f"sampling {config.samples} continuations of the training prompts from the current policy, "
                     f"labelling them and training from it; reference of rounds 2 and later: "
                     f"{'the original model (fixed)' if config.ref_update == 'fixed' else 'the policy the round starts from (current)'}.")
    lines = [
        "# Reward against KL: DPO, preferred-FT and best-of-N",
        "",
        "The controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023, section 6.1, Figure 2 "
        "left), in miniature.",
        "",
        f"Reference {config.model}; reward {config.reward}; {document['train_prompts']} training prompts with "
        f"{config.samples} continuations each labelled into {pairs} preference pairs (best and worst per "
        f"prompt); DPO at betas {', '.join(f'{b:g}' for b in document['betas'])} and preferred-FT (length-averaged "
        f"NLL of the chosen completions, no reference), LoRA r={config.lora_r}, lr {config.lr:g}, "
        f"{config.epochs} epochs, batch {config.batch_size}; best-of-N for N in "
        f"{', '.join(map(str, document['best_of']))} from {max(document['best_of'])} reference draws per "
        f"held-out prompt."
        f"{iterative}",
        "",
        f"Measured on {len(document['heldout_prompts'])} held-out prompts, {config.eval_samples} continuations "
        f"each for every trained policy, at most {config.max_new_tokens} new tokens, temperature 1, seed "
        f"{document['eval_seed']} for every policy.",
        "",
        f"![reward against KL]({plot.name})",
        "",
        *table(points),
        "",
        "Mean reward: the mean over held-out prompts of each prompt's mean reward, with a normal 95% interval "
        "over prompts. KL(pi || pi_ref): for trained policies, the mean over the same prompts of "
        "log pi(y|x) - log pi_ref(y|x) averaged over continuations y sampled from pi, in nats per "
        "continuation, always against the original reference (iterative rounds included), so every point "
        "shares one axis. Best-of-N: its KL is log N - (N-1)/N (exact when the N draws are distinct), and "
        "its reward averages the best of each disjoint group of N draws.",
        "",
        "## At matching KL",
        "",
        "DPO's reward interpolated between the two betas whose KLs bracket each other point's KL (means "
        "only: differences well inside the intervals above are not resolved):",
        "",
        *matching_kl(points),
        "",
        "## Command",
        "",
        "```bash",
        document["command"],
        "```",
        "",
        f"Wall time: {seconds / 60:.1f} min on {machine['device']} ({machine['cpus']} cores, "
        f"torch threads: {machine['torch_threads']}; load average {machine['load_average_start']:.1f} at the "
        f"start and {machine['load_average_end']:.1f} at the end - above the core count means other "
        f"processes shared the CPU).",
        "",
        "Files: `frontier.json` (every point and setting), `samples/` (every measured continuation with its "
        "reward and log-probs under the policy and the reference), `pairs-round*.jsonl` (training pairs), "
        "`runs/` (one training run per trained policy).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tiltlm frontier``: one flag per FrontierConfig field. Defaults are suppressed so that --quick
    can tell the options given from the ones left at their defaults."""
    for f in fields(FrontierConfig):
        default = getattr(FrontierConfig(), f.name)
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP.get(f.name, '')} (default {default!r})".strip()
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=HELP.get(f.name))
        elif f.name == "ref_update":
            parser.add_argument(flag, choices=("fixed", "current"), default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, help=text)
    parser.add_argument("--quick", action="store_true", help="a much smaller run (tests, a first look): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + "; options given explicitly win")


def config_from(args: argparse.Namespace) -> FrontierConfig:
    """The defaults, then --quick's settings, then the options given on the command line."""
    given = {f.name: getattr(args, f.name) for f in fields(FrontierConfig) if hasattr(args, f.name)}
    return FrontierConfig(**{**(QUICK if args.quick else {}), **given})


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tiltlm frontier``; returns the exit code."""
    try:
        run_frontier(config_from(args))
    except (ConfigError, DataError, ModelError, RewardError) as error:
        print(f"tiltlm frontier: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as error:
        print(f"tiltlm frontier: stopped: {error}", file=sys.stderr)
        return 1
    return 0
