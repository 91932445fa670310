"""``tiltlm experiment hh``: the explicit reward model against DPO's implicit reward on HH-RLHF (see
:mod:`tiltlm.hh`). Run again with the same options to continue an interrupted experiment."""

import argparse

from tiltlm.commands.options import add_options, from_args
from tiltlm.hh import HHConfig, run_hh


def add_arguments(parser: argparse.ArgumentParser) -> None:
    experiments = parser.add_subparsers(dest="experiment", required=True)
    hh = experiments.add_parser("hh", help="reward model vs DPO's implicit reward on real human preferences "
                                           "(HH-RLHF harmless-base); resumes where it stopped")
    add_options(hh, HHConfig)


def run(args: argparse.Namespace) -> int:
    run_hh(from_args(HHConfig, args))
    return 0
