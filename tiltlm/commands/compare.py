"""``tiltlm compare``: win rate of A over B under a reward (see :mod:`tiltlm.compare`). A side is a
``tiltlm generate`` output or a model sampled here on ``--prompts``."""

import argparse
import json
from pathlib import Path

from tiltlm.commands.generate import add_sampling_arguments, draw, load, sampling_config
from tiltlm.compare import CompareError, Generation, compare, format_report, match, read_generations
from tiltlm.generate import read_prompts
from tiltlm.rewards import load_reward
from tiltlm.runtime import pick_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", required=True, help="a tiltlm generate output (.jsonl) or a model to sample")
    parser.add_argument("--b", required=True, help="the same, for the other side")
    parser.add_argument("--prompts", default=None, help="prompts file, needed when --a or --b is a model")
    parser.add_argument("--reward", default="vader",
                        help="vader, module:function, file.py:function, or a sequence-classifier directory")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    add_sampling_arguments(parser)


def side_generations(name: str, args: argparse.Namespace, prompts_cache: dict) -> list[Generation]:
    """A side's completions: read from a generations file, or sampled from a model on ``--prompts``."""
    if Path(name).is_file() and name.lower().endswith(".jsonl"):
        return read_generations(name)
    if not args.prompts:
        raise CompareError(f"{name!r} is not a .jsonl generations file, so it is taken as a model to sample "
                           f"from, which needs --prompts")
    if "prompts" not in prompts_cache:
        prompts_cache["prompts"] = read_prompts(args.prompts)
    model, tokenizer = load(name, args)
    samples = draw(model, tokenizer, prompts_cache["prompts"], sampling_config(args), args.progress)
    return [Generation(s.prompt, s.sample, s.completion) for s in samples]


def run(args: argparse.Namespace) -> int:
    names = (args.a, args.b)
    sampling_config(args)  # a mistake in the options is found before any model loads
    if args.n_boot < 1:
        raise CompareError(f"n_boot = {args.n_boot}: expected at least 1 resample")
    reward = load_reward(args.reward, pick_device(args.device))
    cache: dict = {}
    pairs = match(side_generations(args.a, args, cache), side_generations(args.b, args, cache), names)
    report = compare(pairs, reward, n_boot=args.n_boot, seed=args.seed)
    report.update({"a": args.a, "b": args.b, "reward": args.reward})
    print(format_report(report, names, args.reward))
    if args.json:
        # NaN (the interval of a single prompt) is not JSON: write null
        clean = json.loads(json.dumps(report), parse_constant=lambda _: None)
        Path(args.json).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return 0
