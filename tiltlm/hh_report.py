"""The report of ``tiltlm experiment hh`` (tiltlm.hh): ``results.json``, ``report.md`` and ``hh.png``,
figures only (the prompts are red-team prompts; no text of theirs is ever written here)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from tiltlm.experiment import write_json, write_markdown

SCORERS = (("reward_model", "reward model (Bradley-Terry)"), ("dpo_implicit", "DPO implicit reward"),
           ("preferred_ft_implicit", "preferred-FT implicit reward"))
POLICIES = (("dpo", "DPO"), ("preferred_ft", "preferred-FT"))


def summary(results: dict) -> dict:
    """``results.json``: each scorer's held-out accuracy ``{accuracy, ci, pairs}``, each policy's win rate
    against the reference ``{win_rate, ci}``, and everything measured on the way (``details``)."""
    sources = {"reward_model": results["reward_model"], "dpo_implicit": results["dpo"],
               "preferred_ft_implicit": results["preferred_ft"]}
    out = {key: {k: sources[key][k] for k in ("accuracy", "ci", "pairs")} for key, _ in SCORERS}
    out["reference"] = {"accuracy": 0.5, "ci": [0.5, 0.5], "pairs": results["dpo"]["pairs"]}
    generation = results["generation"]
    out["win_rates"] = {name: {"win_rate": generation[name]["win_rate"], "ci": generation[name]["win_ci"]}
                        for name, _ in POLICIES}
    out["details"] = results
    return out


def write_report(directory: Path, config, results: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = summary(results)
    write_json(directory / "results.json", data)
    plot(data, directory / "hh.png")
    return write_markdown(directory / "report.md", [markdown(config, data)])


def plot(data: dict, path: Path) -> None:
    """Left: held-out accuracy of each scorer with its 95% interval (0.5: the reference). Right: win rate
    of each policy against the reference with its interval."""
    figure = Figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for axes, keys, field, title in ((left, [k for k, _ in SCORERS], "accuracy", "held-out pair accuracy"),
                                     (right, ["dpo", "preferred_ft"], "win_rate", "win rate against the reference")):
        entries = [data[k] if field == "accuracy" else data["win_rates"][k] for k in keys]
        values = [e[field] for e in entries]
        errors = [[v - e["ci"][0] for v, e in zip(values, entries)], [e["ci"][1] - v for v, e in zip(values, entries)]]
        labels = [dict(SCORERS + POLICIES)[k].replace(" (", "\n(").replace(" implicit", "\nimplicit") for k in keys]
        axes.bar(range(len(keys)), values, yerr=errors, capsize=6, color="#4c72b0")
        axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        axes.set_xticks(range(len(keys)), labels, fontsize=8)
        low, high = min(e["ci"][0] for e in entries), max(e["ci"][1] for e in entries)
        axes.set_ylim(min(0.3, low - 0.05), max(0.8, high + 0.05))
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(config, data: dict) -> list[str]:
    details, split = data["details"], data["details"]["split"]
    generation = details["generation"]

    def interval(low_high: list[float]) -> str:
        return f"{low_high[0]:.3f} to {low_high[1]:.3f}"

    lines = ["# DPO's implicit reward against an explicit reward model on HH-RLHF (harmless-base)", "",
             f"Base model {config.model} with LoRA r={config.lora_r}; one epoch of each run on "
             f"{split['train_pairs']} training pairs ({split['train_prompts']} prompts), measured on "
             f"{split['heldout_pairs']} held-out pairs ({split['heldout_prompts']} prompts; prompts in both sets: "
             f"{split['prompts_in_both']}), split by prompt with seed {config.seed} from the "
             f"{split['pairs_in_file']} pairs of the file. Learning rate {config.lr}, {config.batch_size} x "
             f"{config.grad_accum} pairs per step, beta {config.beta}, prompts cut to {config.max_prompt_length} "
             f"tokens and pairs to {config.max_length}.", "",
             "## Which answer did people prefer? Held-out pair accuracy", "",
             "| scorer | accuracy | 95% interval | pairs |", "|---|---|---|---|"]
    for key, label in SCORERS + (("reference", "reference (log-ratio 0: every pair a tie)"),):
        lines.append(f"| {label} | {data[key]['accuracy']:.3f} | {interval(data[key]['ci'])} | {data[key]['pairs']} |")
    lines += ["", "Accuracy counts a pair 1 when the scorer ranks the chosen reply above the rejected one, 1/2 on "
              "a tie. Intervals: normal, with the binomial variance p(1-p)/n.", "",
              "## Generation: judged by the reward model above", "",
              f"One reply per held-out prompt ({generation['prompts']} prompts that fit {config.max_prompt_length} "
              f"tokens), sampled at temperature 1, at most {generation['max_new_tokens']} new tokens.", "",
              "| policy | win rate vs reference | 95% interval | mean reward | KL(policy \\|\\| reference), nats |",
              "|---|---|---|---|---|"]
    for name, label in POLICIES:
        g = generation[name]
        lines.append(f"| {label} | {g['win_rate']:.3f} | {interval(g['win_ci'])} | {g['mean_reward'][0]:+.3f} "
                     f"({interval(g['mean_reward'][1:])}) | {g['kl'][0]:.3f} ({interval(g['kl'][1:])}) |")
    ref = generation["reference"]
    lines += [f"| reference | - | - | {ref['mean_reward'][0]:+.3f} ({interval(ref['mean_reward'][1:])}) | 0 |", "",
              "Win rates: ties count 1/2; intervals are percentile bootstraps over prompts. Mean reward and KL: "
              "normal intervals over prompts; KL is the mean of log pi(y|x) - log pi_ref(y|x) over the "
              "policy's own samples.", "", "![accuracy and win rates](hh.png)", ""]
    return lines + cost(details)


def cost(details: dict) -> list[str]:
    """Wall times of the stages, as measured on the machine that ran them."""
    lines = ["## Cost (2 CPU cores)", "", "| stage | training | training tokens / s | whole stage (held-out scoring "
             "included) |", "|---|---|---|---|"]
    seconds = details.get("stage_seconds", {})
    for key, label in (("reward_model", "reward model"), ("dpo", "DPO"), ("preferred_ft", "preferred-FT")):
        lines.append(f"| {label} | {details[key]['train_seconds'] / 60:.1f} min, {details[key]['train_steps']} steps | "
                     f"{details[key]['train_tokens_per_second']:.0f} | {seconds.get(key, 0) / 60:.1f} min |")
    sampled = ", ".join(f"{name} {details['generation'][name]['seconds'] / 60:.1f} min" for name in
                        ("reference", "dpo", "preferred_ft"))
    lines.append(f"| sampling, KL and judging ({sampled}) | - | - | {seconds.get('generation', 0) / 60:.1f} min |")
    return lines
