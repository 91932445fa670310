"""``tiltlm generate``: sample completions of a prompts file and write them, with their log-probs under
the policy (and a reference), as JSONL (see :mod:`tiltlm.generate` for what the numbers mean)."""

import argparse
from pathlib import Path

from tiltlm.commands.options import add_options, from_args
from tiltlm.config import ConfigError, TrainConfig, check_options
from tiltlm.experiment import write_jsonl
from tiltlm.generate import SamplingConfig, load_policy, read_prompts, sample, score_logps
from tiltlm.models import check_same_tokenizer, parse_dtype
from tiltlm.runtime import pick_device
from tiltlm.stats import mean_ci, per_group_means

# Options of loading and display shared with training, declared there.
SHARED = ("dtype", "device", "trust_remote_code", "progress")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``tiltlm generate`` and ``tiltlm compare``."""
    group = parser.add_argument_group("sampling")
    add_options(group, SamplingConfig, fill_defaults=True)
    add_options(group, TrainConfig, only=SHARED, fill_defaults=True)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The sampling options of ``args``, checked."""
    return check_options(from_args(SamplingConfig, args))


def load(name: str, args: argparse.Namespace, base: str | None = None):
    """``(model, tokenizer)`` of a model, adapter directory or alias, on the chosen device and dtype."""
    device = pick_device(args.device)
    return load_policy(name, parse_dtype(args.dtype, device), device, base, args.trust_remote_code)


def draw(model, tokenizer, prompts: list, config: SamplingConfig, progress: bool) -> list:
    return sample(model, tokenizer, prompts, n=config.samples, max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                  batch_size=config.batch_size, chat=config.chat, progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory, hub id, alias, or LoRA adapter directory")
    parser.add_argument("--base", default=None, help="base model of a LoRA adapter (default: from adapter_config.json)")
    parser.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ...} per line")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--ref", default=None, help="also score the samples under this model (KL estimate)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_sampling_arguments(parser)


def kl_summary(samples: list, policy_logps: list[float], ref_logps: list[float], config: SamplingConfig) -> str:
    """The Monte Carlo KL estimate ``mean(log pi - log pi_ref)`` with its 95% interval over prompts."""
    log_ratios = [p - r for p, r in zip(policy_logps, ref_logps)]
    mean, low, high = mean_ci(per_group_means(log_ratios, [s.index for s in samples]))
    text = (f"KL(policy || ref) estimate: {mean:.4f} nats per completion (95% CI {low:.4f} to {high:.4f} over "
            f"prompts, {len(samples)} samples)")
    if config.temperature != 1.0 or config.top_p != 1.0:
        text += (f"\n  note: temperature {config.temperature} / top_p {config.top_p} do not sample from the policy "
                 f"itself, so this is not an unbiased KL estimate (use --temperature 1 --top-p 1)")
    return text


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise ConfigError(f"output {output} exists; pass --overwrite to replace it")
    config = sampling_config(args)
    prompts = read_prompts(args.prompts)
    model, tokenizer = load(args.model, args, args.base)
    samples = draw(model, tokenizer, prompts, config, args.progress)
    policy_logps = score_logps(model, tokenizer, samples, config.batch_size, args.progress)
    ref_logps = None
    if args.ref:
        del model  # one model in memory at a time
        ref_model, ref_tokenizer = load(args.ref, args)
        check_same_tokenizer(tokenizer, ref_tokenizer, (args.model, args.ref))
        ref_logps = score_logps(ref_model, tokenizer, samples, config.batch_size, args.progress)
    rows = [{"prompt": s.prompt, "sample": s.sample, "completion": s.completion,
             "completion_tokens": len(s.completion_ids), "finished": s.finished, "logp_policy": policy_logps[i],
             **({} if ref_logps is None else {"logp_ref": ref_logps[i]})} for i, s in enumerate(samples)]
    write_jsonl(output, rows)
    print(f"wrote {len(rows)} completions of {len(prompts)} prompts to {output}")
    if ref_logps is not None:
        print(kl_summary(samples, policy_logps, ref_logps, config))
    return 0
