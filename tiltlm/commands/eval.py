"""``tiltlm eval``: loss and reward metrics of a policy against a reference, with TrainConfig's defaults."""

import argparse
import json
from pathlib import Path

from tiltlm.commands.options import add_options, given
from tiltlm.config import TrainConfig

# the options of an evaluation, declared (with their defaults) by TrainConfig
OPTIONS = ("model", "ref", "data", "beta", "loss", "max_length", "max_prompt_length", "batch_size", "dtype",
           "device", "ref_cache", "trust_remote_code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TrainConfig, only=OPTIONS, required=("model", "data"), fill_defaults=True)
    parser.add_argument("--json", help="also write the result to this file")


def print_json(result: dict, path: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``path`` too when one is given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def run(args: argparse.Namespace) -> int:
    from tiltlm.evaluate import evaluate

    # max_prompt_length left unset resolves from max_length, as in training
    print_json(evaluate(**{k: v for k, v in given(args, TrainConfig).items() if v is not None}), args.json)
    return 0
