"""``tiltlm reward train`` and ``tiltlm reward eval``: Bradley-Terry reward models.

``train`` takes every option of ``tiltlm train`` (the same flags, YAML file and key=value overrides) and
trains with ``objective = reward-model``: an ``AutoModelForSequenceClassification`` with one output,
started from ``--model`` (a causal LM gets a new score head), on pairs or ranked lists (their pairs);
``--reward-margin`` and ``--reward-centering`` shape its loss. Unless the YAML file or ``--lr`` says
otherwise the learning rate is 1e-5 (reward models train at ordinary fine-tuning rates, not DPO's) and the
output ``runs/reward``. ``final/`` loads with ``AutoModelForSequenceClassification`` and works as
``--reward final/`` wherever a reward is named (tiltlm.rewards.load_reward).

``eval`` prints the loss, accuracy (ties half), mean margin and mean reward of a reward model on a file
of pairs, as JSON.
"""

from __future__ import annotations

import argparse

from tiltlm.commands import train as train_command
from tiltlm.commands.eval import print_json

REWARD_LR = 1e-5
REWARD_OUTPUT = "runs/reward"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="reward_command", required=True)
    train = commands.add_parser("train", help="train a Bradley-Terry reward model on preference pairs")
    train_command.add_arguments(train)
    train.description = ("Train a reward model (sequence classification, one output) with the Bradley-Terry loss. "
                         "Options as for tiltlm train: defaults < --config YAML < --flags < key=value.")
    evaluate = commands.add_parser("eval", help="loss and accuracy of a reward model on preference pairs")
    evaluate.add_argument("--model", required=True, help="reward model directory (e.g. a run's final/)")
    evaluate.add_argument("--data", required=True, help="preference file (pairs or ranked lists)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-length", type=int, help="default: as the model was trained")
    evaluate.add_argument("--max-prompt-length", type=int, help="default: as the model was trained")
    evaluate.add_argument("--dtype", default="auto")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", help="also write the result to this file")
    evaluate.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    return train(args) if args.reward_command == "train" else evaluate(args)


def train(args: argparse.Namespace) -> int:
    args.objective = "reward-model"
    if args.config is None and not getattr(args, "resume", False):  # unless a flag sets them
        args.lr, args.output = getattr(args, "lr", REWARD_LR), getattr(args, "output", REWARD_OUTPUT)
    return train_command.run(args)


def evaluate(args: argparse.Namespace) -> int:
    from tiltlm.reward_model import evaluate_reward_model

    print_json(evaluate_reward_model(args.model, args.data, args.batch_size, args.max_length, args.max_prompt_length,
                                     args.dtype, args.device, args.trust_remote_code), args.json)
    return 0
