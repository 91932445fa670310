"""``tiltlm quickstart``: DPO end to end on the embedded default (see :mod:`tiltlm.quickstart`)."""

import argparse

from tiltlm.commands.options import add_options, add_preset, from_args
from tiltlm.quickstart import QUICK, QuickstartConfig, run_quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, QuickstartConfig)
    add_preset(parser, QUICK)


def run(args: argparse.Namespace) -> int:
    run_quickstart(from_args(QuickstartConfig, args, QUICK if args.quick else None))
    return 0
