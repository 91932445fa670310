"""``tiltlm verify``: run the exact checks of :mod:`tiltlm.verify`, print the table, exit 0 only if every
check passed."""

import argparse
import time

from tiltlm import verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the random table (default 0)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    checks = verify.run_checks(args.seed)
    print(verify.format_table(checks))
    failed = [c.name for c in checks if not c.passed]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed in {time.perf_counter() - start:.1f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
