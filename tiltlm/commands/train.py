"""``tiltlm train``: options from defaults < ``--config`` YAML < ``--flags`` < ``key=value`` overrides."""

import argparse
import os
from pathlib import Path

from tiltlm.commands.options import add_options, given
from tiltlm.config import ConfigError, TrainConfig, build_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Train with DPO or its family. Options: defaults < --config YAML < --flags < key=value."
    parser.add_argument("--config", help="YAML file of options")
    add_options(parser, TrainConfig, skip=("resume",))
    parser.add_argument("--resume", nargs="?", const=True, default=argparse.SUPPRESS, metavar="RUN_DIR",
                        help="continue RUN_DIR (default: --output) from its newest checkpoint, with its own settings")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0.2")


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The checked configuration; a resumed run reads the settings it was started with."""
    flags = given(args, TrainConfig)
    if isinstance(flags.get("resume"), str):  # --resume RUN_DIR
        flags["output"], flags["resume"] = flags["resume"], True
    yaml_path = args.config
    if flags.get("resume") and yaml_path is None:
        yaml_path = str(Path(flags.get("output", TrainConfig.output)) / "config.yaml")
        if not Path(yaml_path).is_file():
            raise ConfigError(f"resume: {Path(yaml_path).parent} holds no run to continue (no config.yaml)")
    config = build_config(yaml_path, flags, args.overrides)
    if not config.data:
        raise ConfigError("no training data: give --data FILE (or data: in the YAML config)")
    return config


def run(args: argparse.Namespace) -> int:
    from tiltlm.train import run_training

    outcome = run_training(config_from(args))
    if outcome.finished and os.environ.get("RANK", "0") == "0":
        print(f"done: {outcome.output}")  # a stopped run has said at which step, and how to resume
    return 0
