"""``tiltlm frontier``: reward against KL for DPO, preferred-FT and best-of-N (see :mod:`tiltlm.frontier`)."""

import argparse
import sys

from tiltlm.commands.options import add_options, add_preset, from_args
from tiltlm.frontier import QUICK, FrontierConfig, RunStopped, run_frontier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FrontierConfig)
    add_preset(parser, QUICK)


def run(args: argparse.Namespace) -> int:
    try:
        run_frontier(from_args(FrontierConfig, args, QUICK if args.quick else None))
    except RunStopped as error:
        print(f"tiltlm frontier: stopped: {error}", file=sys.stderr)
        return 1
    return 0
