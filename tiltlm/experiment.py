"""Building blocks of controlled experiments in the manner of the DPO paper's IMDb sentiment task
(Rafailov et al. 2023, section 6.1): label samples of the reference with a reward to make preference
pairs, and measure a policy by its mean reward and its KL divergence from the reference."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tiltlm.config import ConfigError, TrainConfig, option
from tiltlm.generate import Sample, sample, score_logps
from tiltlm.stats import mean_ci, per_group_means


@dataclass
class ExperimentConfig:
    """Options of every experiment here: the reference's samples labelled into pairs, LoRA runs on them."""

    model: str = option("smollm2-135m", "reference model: directory, hub id or alias")
    reward: str = option("vader", "vader, module:function, file.py:function, or a sequence-classifier directory")
    output: str = option("runs/experiment", "directory for the report and everything it is computed from")
    overwrite: bool = option(False, "replace a report already in --output")
    samples: int = option(4, "continuations per training prompt", at_least=2)
    preferences: str = option("ranked", "what DPO trains on: ranked (each prompt's N continuations as one ranked list, "
                                      "Plackett-Luce) or pair (its best against its worst), at the same compute",
                              choices=("ranked", "pair"))
    max_new_tokens: int = option(24, "most tokens sampled per continuation", at_least=1)
    lr: float = option(5e-4, "learning rate of every training run", above=0)
    epochs: int = option(3, "epochs of every training run", at_least=1)
    batch_size: int = option(6, "pairs per step of every training run", at_least=1)
    lora_r: int = option(16, "LoRA rank of every training run (LoRA lets one CPU train several)", at_least=1)
    seed: int = option(0, "seed of the first pairs' sampling and of training", at_least=0)


@dataclass
class PolicyScore:
    """Mean reward and sampled KL(pi || pi_ref), each with a normal 95% interval over prompts (samples of
    one prompt are averaged first: they are not independent)."""

    reward: tuple[float, float, float]  # mean, low, high
    kl: tuple[float, float, float]
    samples: list[Sample]
    rewards: list[float]
    rows: list[dict]  # one JSON-ready row per sample (see sample_rows), to save beside a report


# Every experiment's training runs: short prompts and continuations, one step per batch, no checkpoints.
SEQUENCE = dict(max_length=256, max_prompt_length=64)


def lora_run(config: ExperimentConfig, model: str, data: Path, output: Path, **settings) -> TrainConfig:
    shared = dict(model=model, data=str(data), output=str(output), overwrite=True, lr=config.lr, epochs=config.epochs,
                  batch_size=config.batch_size, grad_accum=1, lora_r=config.lora_r, warmup_ratio=0.1, seed=config.seed,
                  save_every=10_000, log_every=1, tensorboard=False, **SEQUENCE)
    return TrainConfig(**{**shared, **settings})


def sample_rows(samples: list[Sample], rewards: list[float], policy_logps: list[float] | None = None,
                reference_logps: list[float] | None = None) -> list[dict]:
    """Samples as JSONL rows with their rewards, the token ids the log-probs were computed on and, when
    given, the log-probs and their difference ``log_ratio = log pi(y|x) - log pi_ref(y|x)``."""
    rows = [{"index": s.index, "sample": s.sample, "prompt": s.prompt, "completion": s.completion, "reward": reward,
             "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "finished": s.finished}
            for s, reward in zip(samples, rewards)]
    for row, policy, reference in zip(rows, policy_logps or [], reference_logps or []):
        row.update(logp_policy=policy, logp_ref=reference, log_ratio=policy - reference)
    return rows


def by_prompt(samples: list[Sample], rewards: list[float]) -> list[list[tuple[float, Sample]]]:
    """Each prompt's ``(reward, sample)`` in the order drawn, prompts in order."""
    groups: dict[int, list[tuple[float, Sample]]] = {}
    for reward, s in zip(rewards, samples):
        groups.setdefault(s.index, []).append((reward, s))
    return [groups[index] for index in sorted(groups)]


def preference_pairs(samples: list[Sample], rewards: list[float]) -> list[dict]:
    """For each prompt, its highest- and lowest-reward completions as an explicit-format pair; prompts
    whose samples all score the same give no pair."""
    pairs = []
    for scored in by_prompt(samples, rewards):
        best, worst = max(scored, key=lambda item: item[0]), min(scored, key=lambda item: item[0])
        if best[0] > worst[0] and best[1].completion != worst[1].completion:
            pairs.append({"prompt": best[1].prompt, "chosen": best[1].completion, "rejected": worst[1].completion,
                          "reward_chosen": best[0], "reward_rejected": worst[0]})
    return pairs


def rewarded_samples(policy, tokenizer, prompts: list, reward: Callable, samples_per_prompt: int,
                     max_new_tokens: int, seed: int, batch_size: int) -> tuple[list[Sample], list[float]]:
    """Continuations of ``prompts`` sampled from ``policy`` itself (temperature 1, no top-p: the draws a KL
    estimate needs) and their rewards."""
    samples = sample(policy, tokenizer, prompts, n=samples_per_prompt, max_new_tokens=max_new_tokens,
                     temperature=1.0, top_p=1.0, seed=seed, batch_size=batch_size, progress=True)
    return samples, reward([s.prompt for s in samples], [s.completion for s in samples])


def ranked_lists(samples: list[Sample], rewards: list[float]) -> list[dict]:
    """For each prompt, its distinct completions with their rewards as a ranked list (``scores``: higher is
    better, ties allowed); prompts whose completions all score the same give none."""
    lists = []
    for scored in by_prompt(samples, rewards):
        first: dict[str, float] = {}  # a completion drawn twice counts once, with its first reward
        for reward, s in scored:
            first.setdefault(s.completion, reward)
        if len(first) >= 2 and max(first.values()) > min(first.values()):
            lists.append({"prompt": scored[0][1].prompt, "completions": list(first), "scores": list(first.values())})
    return lists


@dataclass
class Labelled:
    """The preferences labelled from one set of samples: one pair per prompt, and every sample ranked."""

    pairs: Path
    ranked: Path
    count: int  # prompts that gave a pair (the same prompts give a ranked list)

    def training(self, config: ExperimentConfig) -> Path:
        return self.ranked if config.preferences == "ranked" else self.pairs


def label(policy, tokenizer, prompts: list, reward: Callable, samples_per_prompt: int, max_new_tokens: int,
          seed: int, batch_size: int, path: Path) -> Labelled:
    """Continuations of ``prompts`` from ``policy`` labelled by the reward: :func:`preference_pairs` written to
    ``path`` and :func:`ranked_lists` beside it (``-ranked`` added to its name); a ConfigError when no prompt
    gives a preference."""
    samples, rewards = rewarded_samples(policy, tokenizer, prompts, reward, samples_per_prompt, max_new_tokens,
                                        seed, batch_size)
    pairs = preference_pairs(samples, rewards)
    if not pairs:
        raise ConfigError(f"the reward gave every continuation of each prompt the same score, so there is no "
                          f"preference pair to train on ({path.name}); use more --samples or longer --max-new-tokens")
    print(f"      {len(pairs)} preference pairs -> {path}")
    ranked = write_jsonl(path.with_name(f"{path.stem}-ranked{path.suffix}"), ranked_lists(samples, rewards))
    return Labelled(write_jsonl(path, pairs), ranked, len(pairs))


def training_shape(config: ExperimentConfig, prompts: int) -> dict:
    """Batch size and steps of a training run on ``prompts`` prompts' preferences. Ranked lists train at the
    compute of one pair per prompt: as many completions per step (``2 * batch_size`` completions make
    ``2 * batch_size / samples`` lists) and as many steps as the pair run's epochs take, so each list is
    seen about ``epochs * 2 / samples`` times where each pair is seen ``epochs`` times."""
    batch = min(config.batch_size, prompts)
    if config.preferences == "pair":
        return dict(batch_size=batch)
    return dict(batch_size=max(1, 2 * batch // config.samples), max_steps=config.epochs * (prompts // batch))


def refuse_existing(config: ExperimentConfig, *names: str) -> Path:
    """The output directory, unless it holds one of ``names`` (a report) and --overwrite was not given."""
    out = Path(config.output)
    existing = [name for name in names if (out / name).exists()]
    if existing and not config.overwrite:
        raise ConfigError(f"{out} already holds a report ({', '.join(existing)}); use --overwrite or another --output")
    return out


def write_markdown(path: Path, blocks: list[str | list[str]]) -> Path:
    """A Markdown file of ``blocks`` (a paragraph, or the lines of a table or a list) between blank lines."""
    text = "\n\n".join(block if isinstance(block, str) else "\n".join(block) for block in blocks)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table; a cell is any value, written with ``str``."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header),
            *(f"| {' | '.join(map(str, row))} |" for row in rows)]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Written through a temporary file and renamed, so the output is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(temporary, path)
    return path


def score_policy(policy, tokenizer, prompts: list, reward: Callable, samples_per_prompt: int,
                 max_new_tokens: int, seed: int, batch_size: int = 16, reference=None) -> PolicyScore:
    """Sample from ``policy`` at temperature 1 (so the KL estimate is unbiased), reward the samples, and
    estimate KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from the same samples. The
    reference is ``reference`` or, when None, ``policy`` with its adapters disabled."""
    samples, rewards = rewarded_samples(policy, tokenizer, prompts, reward, samples_per_prompt, max_new_tokens, seed,
                                        batch_size)
    policy_logps = score_logps(policy, tokenizer, samples, batch_size=batch_size)
    if reference is policy:  # the reference itself: KL is 0, no second pass needed
        reference_logps = policy_logps
    elif reference is not None:
        reference_logps = score_logps(reference, tokenizer, samples, batch_size=batch_size)
    else:  # a peft policy with its adapters off is its own base
        with policy.disable_adapter():
            reference_logps = score_logps(policy, tokenizer, samples, batch_size=batch_size)
    log_ratios = [p - r for p, r in zip(policy_logps, reference_logps)]
    prompt_of = [s.index for s in samples]
    return PolicyScore(mean_ci(per_group_means(rewards, prompt_of)), mean_ci(per_group_means(log_ratios, prompt_of)),
                       samples, rewards, sample_rows(samples, rewards, policy_logps, reference_logps))
