"""``tiltlm plot RUN_DIR``: training curves as PNG files (see :mod:`tiltlm.plots`)."""

import argparse

from tiltlm.plots import plot_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's output directory (holding metrics.jsonl)")
    parser.add_argument("--output", default=None, help="directory for the PNG files (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
