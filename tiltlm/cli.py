"""``tiltlm`` on the command line: build the parser from the command modules (tiltlm/commands/), run the
command, and turn user mistakes into one clear line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

from tiltlm.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltlm", description="Direct Preference Optimization for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in COMMANDS:
        sub = commands.add_parser(name, help=summary, description=summary)
        command = importlib.import_module(f"tiltlm.commands.{name}")
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tiltlm.checkpoint import CheckpointError
    from tiltlm.compare import CompareError
    from tiltlm.config import ConfigError
    from tiltlm.data.types import DataError
    from tiltlm.models import ModelError
    from tiltlm.plots import PlotError
    from tiltlm.rewards import RewardError
    from tiltlm.train import TrainingError

    mistakes = (ConfigError, DataError, ModelError, CheckpointError, CompareError, PlotError, RewardError)
    try:
        return args.run(args)
    except (*mistakes, OSError, TrainingError) as error:
        print(f"tiltlm {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line
        # 1, not 2, for what is not the user's mistake: a full disk, too many non-finite steps
        return 2 if isinstance(error, mistakes) else 1
    except KeyboardInterrupt:
        print(f"tiltlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
