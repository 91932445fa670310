"""``tiltlm experiment hh``: on real human preferences (Anthropic HH-RLHF, harmless-base), does DPO learn
what people prefer, and how does its implicit reward compare with the explicit reward model it skips?

"Your language model is secretly a reward model" (Rafailov et al. 2023, the DPO paper's subtitle): the
policy DPO trains defines the reward ``r(x, y) = beta log pi(y|x) / pi_ref(y|x)`` (its equation 5, up
to ``beta log Z(x)``, which cancels within a pair). Here, on the same training pairs and the same held-out
pairs (split by prompt, none in both), one base model (SmolLM2-135M with LoRA) gives:

(a) an explicit Bradley-Terry reward model (Ouyang et al. 2022, section 3.5): held-out accuracy;
(b) DPO at ``beta``: held-out accuracy of its implicit reward;
(c) baselines: preferred-FT (supervised fine-tuning on the chosen completions, the DPO paper's
    baseline), its log-ratio against the reference read as an implicit reward; the reference itself,
    whose log-ratio is 0 on every pair, so its accuracy is 0.5 by construction (ties count half);
(d) generation on held-out prompts: DPO and preferred-FT against the reference, each sample judged by
    the reward model of (a), win rates with prompt-level bootstrap intervals, and KL(policy || reference)
    estimated from the policy's own samples.

Each stage saves its result in the output directory and is skipped when run again, and the training runs
resume from their checkpoints (resume is exact), so the experiment can be spread over several sessions.
The prompts are red-team prompts: the report (tiltlm.hh_report) shows figures, never their text.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from tiltlm.config import ConfigError, TrainConfig, check_options, option
from tiltlm.data import load_pairs
from tiltlm.experiment import score_policy, write_json, write_jsonl
from tiltlm.metrics import read_metrics
from tiltlm.stats import Z95

HH_FILE = "../shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


@dataclass
class HHConfig:
    data: str = option(HH_FILE, "HH-RLHF pairs: JSONL (.gz) of whole 'chosen' and 'rejected' dialogues")
    model: str = option("smollm2-135m", "base model of every run: directory, hub id or alias")
    output: str = option("runs/hh", "directory for the split, the runs, the samples and the results")
    report: str = option("", "directory for report.md, results.json and the plot (default: --output)")
    train_pairs: int = option(800, "training pairs (at most; prompts never shared with held-out ones)", at_least=1)
    heldout_pairs: int = option(300, "held-out pairs (at least; whole prompts are held out)", at_least=1)
    beta: float = option(0.1, "DPO's beta (also the scale of the preferred-FT implicit reward)", above=0)
    lr: float = option(2e-4, "learning rate of DPO, preferred-FT and the reward model", above=0)
    lora_r: int = option(16, "LoRA rank of every run", at_least=1)
    batch_size: int = option(8, "pairs per micro-batch", at_least=1)
    grad_accum: int = option(2, "micro-batches per optimizer step", at_least=1)
    max_length: int = option(512, "tokens of prompt + completion (longer pairs are cut)", at_least=2)
    max_prompt_length: int = option(256, "tokens of a prompt (longer prompts keep their end)", at_least=1)
    generate_prompts: int = option(200, "held-out prompts sampled for the win rates and KL", at_least=1)
    max_new_tokens: int = option(48, "most tokens sampled per reply", at_least=1)
    sample_batch: int = option(32, "prompts sampled at a time (decoding reads every weight per token: "
                                   "a larger batch shares the reads)", at_least=1)
    seed: int = option(0, "seed of the split, the training runs and the sampling", at_least=0)


def run_hh(config: HHConfig) -> dict:
    """Every stage in order (each skipped when its result is saved); the results as ``results.json`` has them.
    An output directory that an experiment with other settings started is refused."""
    from tiltlm.hh_report import write_report

    out, settings = Path(config.output), {k: v for k, v in asdict(check_options(config)).items() if k != "report"}
    if not Path(config.data).is_file():
        raise ConfigError(f"data {config.data}: no such file; give --data (the HH-RLHF harmless-base JSONL)")
    saved = out / "experiment.json"
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")) != settings:
        raise ConfigError(f"output {out} holds an experiment with other settings ({saved}); use another --output")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, settings)
    stages = [("split", partial(split_by_prompt, config, out)),
              *((name, partial(train_and_score, config, out, name)) for name in RUNS),
              ("generation", partial(generation, config, out))]
    done = {name: stage(out, name, compute) for name, compute in stages}
    results = {name: value for name, (value, _) in done.items()}
    results["stage_seconds"] = {name: seconds for name, (_, seconds) in done.items()}
    write_report(Path(config.report or out), config, results)
    return results


def stage(out: Path, name: str, compute: Callable[[], dict]) -> tuple[dict, float]:
    """The saved result of stage ``name`` and its wall time in seconds, or compute it and save both."""
    path = out / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["value"], saved["seconds"]
    print(f"[hh] {name}")
    started = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - started
    write_json(path, {"value": value, "seconds": seconds})
    return value, seconds


def split_by_prompt(config: HHConfig, out: Path) -> dict:
    """Pairs grouped by prompt, prompts shuffled with the seed; whole prompts go to the held-out set until
    it has ``heldout_pairs`` pairs, then to training until it has ``train_pairs``. Both written as
    explicit-format JSONL (prompt, chosen, rejected), so training and evaluation read the same texts."""
    by_prompt: dict[str, list[dict]] = {}
    for pair in load_pairs(config.data):
        by_prompt.setdefault(pair.prompt, []).append({"prompt": pair.prompt, "chosen": pair.chosen,
                                                      "rejected": pair.rejected})
    prompts = sorted(by_prompt)
    random.Random(config.seed).shuffle(prompts)
    heldout, train = [], []
    for prompt in prompts:
        if len(heldout) < config.heldout_pairs:
            heldout.extend(by_prompt[prompt])
        elif len(train) < config.train_pairs:
            train.extend(by_prompt[prompt])
    train = train[:config.train_pairs]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    train_prompts, heldout_prompts = {row["prompt"] for row in train}, {row["prompt"] for row in heldout}
    return {"train_pairs": len(train), "heldout_pairs": len(heldout),
            "pairs_in_file": sum(map(len, by_prompt.values())), "train_prompts": len(train_prompts),
            "heldout_prompts": len(heldout_prompts), "prompts_in_both": len(train_prompts & heldout_prompts)}


# what each run trains: the reward model (Bradley-Terry on the pairs), DPO, preferred-FT (NLL of chosen)
RUNS = {"reward_model": dict(objective="reward-model", merge_lora=True), "dpo": dict(loss="sigmoid"),
        "preferred_ft": dict(loss="nll")}


def train_and_score(config: HHConfig, out: Path, name: str) -> dict:
    """Train run ``name`` (one epoch of LoRA on the training pairs, checkpoints every 10 steps; resumed when
    it was started before) and score its held-out accuracy: the reward model's own scores, or the implicit
    reward ``beta log pi/pi_ref`` of a policy against its base (adapters off)."""
    from tiltlm.evaluate import evaluate
    from tiltlm.reward_model import evaluate_reward_model
    from tiltlm.train import train

    run_dir, started = out / name, time.perf_counter()
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    if not (run_dir / "final").is_dir():
        train(TrainConfig(model=config.model, data=str(out / "train.jsonl"), output=str(run_dir),
                          resume=(run_dir / "config.yaml").is_file(), beta=config.beta, lr=config.lr, epochs=1,
                          batch_size=config.batch_size, grad_accum=config.grad_accum, lora_r=config.lora_r,
                          warmup_ratio=0.1, seed=config.seed, save_every=10, keep_checkpoints=1, tensorboard=False,
                          **lengths, **RUNS[name]))
    trained = time.perf_counter() - started
    heldout = str(out / "heldout.jsonl")
    if name == "reward_model":
        metrics = evaluate_reward_model(str(run_dir / "merged"), heldout, config.batch_size, **lengths)
    else:  # preferred-FT trained without a reference; its implicit reward is read the same way as DPO's
        metrics = evaluate(str(run_dir / "final"), heldout, beta=config.beta, loss="sigmoid",
                           batch_size=config.batch_size, **lengths)
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_second" in row]
    accuracy, pairs = metrics["rewards/accuracies"], int(metrics["pairs"])
    return {"accuracy": accuracy, "ci": list(accuracy_interval(accuracy, pairs)), "pairs": pairs,
            "heldout_loss": metrics["loss"], "heldout_margin": metrics["rewards/margins"],
            "train_seconds": trained, "train_steps": len(rows),
            "train_tokens_per_second": sum(r["tokens_per_second"] for r in rows) / max(len(rows), 1),
            "final_train_loss": rows[-1]["loss"] if rows else None}


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """95% normal interval of an accuracy over ``n`` pairs with the binomial variance ``p (1 - p) / n``, which
    bounds the variance of any outcomes in [0, 1] with mean p (ties, counted 1/2, only narrow it)."""
    half = Z95 * (accuracy * (1 - accuracy) / n) ** 0.5
    return max(0.0, accuracy - half), min(1.0, accuracy + half)


def generation(config: HHConfig, out: Path) -> dict:
    """The reference, DPO and preferred-FT each sample one reply per held-out prompt (temperature 1, the
    draws an unbiased KL estimate needs); the reward model judges every reply; each policy's win rate
    against the reference with a prompt-level bootstrap interval, and its KL from its own samples."""
    from tiltlm.compare import win_rate
    from tiltlm.models import load_model, load_tokenizer
    from tiltlm.reward_model import trained_reward

    tokenizer = load_tokenizer(config.model)
    # distinct held-out prompts that fit max_prompt_length tokens: a longer dialogue would be cut at its
    # start, changing what the reply answers
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in dict.fromkeys(row["prompt"] for row in heldout)
               if len(tokenizer(prompt)["input_ids"]) <= config.max_prompt_length][:config.generate_prompts]
    reward = trained_reward(str(out / "reward_model" / "merged"), batch_size=config.batch_size)
    results = {"prompts": len(prompts), "max_new_tokens": config.max_new_tokens}
    for name in ("reference", "dpo", "preferred_ft"):
        started = time.perf_counter()
        policy = load_model(config.model if name == "reference" else str(out / name / "final"))
        score = score_policy(policy, tokenizer, prompts, reward, 1, config.max_new_tokens, config.seed + 1,
                             batch_size=config.sample_batch, reference=policy if name == "reference" else None)
        write_jsonl(out / f"samples_{name}.jsonl", score.rows)
        results[name] = {"mean_reward": list(score.reward), "kl": list(score.kl),
                         "seconds": time.perf_counter() - started,
                         "tokens": sum(len(s.completion_ids) for s in score.samples),
                         "finished": sum(s.finished for s in score.samples)}
        if name == "reference":
            reference_rewards = score.rewards
            continue
        rate = win_rate(score.rewards, reference_rewards, seed=config.seed, groups=[s.index for s in score.samples])
        results[name].update(win_rate=rate.rate, win_ci=[rate.low, rate.high], wins=rate.wins, ties=rate.ties,
                             losses=rate.losses)
    return results
