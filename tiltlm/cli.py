"""``tiltlm`` on the command line: parse, build a config, call the library, turn user mistakes into
one clear line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from tiltlm.config import ConfigError, TrainConfig, build_config

TYPES = {"int": int, "float": float, "str": str, "Optional[str]": str, "Optional[float]": float,
         "Optional[int]": int}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field. Defaults are suppressed so that only flags the user gave
    override the YAML file."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const=True, default=argparse.SUPPRESS, metavar="RUN_DIR",
                                help="continue the run in RUN_DIR (default: --output) from its newest checkpoint")
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default {f.default})")
        else:
            parser.add_argument(flag, type=TYPES[f.type], default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"(default {f.default})")


def cmd_train(args: argparse.Namespace) -> int:
    from tiltlm.train import train

    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)}}
    if isinstance(flags.get("resume"), str):  # --resume RUN_DIR
        flags["output"], flags["resume"] = flags["resume"], True
    yaml_path = args.config
    if flags.get("resume") and yaml_path is None:  # a run resumes with the settings it was started with
        yaml_path = str(Path(flags.get("output", TrainConfig.output)) / "config.yaml")
        if not Path(yaml_path).is_file():
            raise ConfigError(f"resume: {Path(yaml_path).parent} holds no run to continue (no config.yaml)")
    config = build_config(yaml_path, flags, args.overrides)
    if not config.data:
        raise ConfigError("no training data: give --data FILE (or data: in the YAML config)")
    out = train(config)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tiltlm.evaluate import evaluate

    result = evaluate(args.model, args.data, ref=args.ref, beta=args.beta, loss=args.loss,
                      max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                      batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code, ref_cache=args.ref_cache)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tiltlm.verify import main as verify_main

    return verify_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltlm", description="Direct Preference Optimization for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy on preference pairs",
                                description="Train with DPO or a loss of its family. Options come from "
                                            "defaults < --config YAML < --flags < key=value overrides.")
    train.add_argument("--config", help="YAML file of options")
    add_config_flags(train)
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0.2")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="loss and reward metrics of a policy against a reference")
    evaluate.add_argument("--model", required=True, help="policy: model directory, adapter directory, hub id or alias")
    evaluate.add_argument("--ref", help="reference model (default: an adapter's base, or the run's starting model)")
    evaluate.add_argument("--data", required=True, help="preference file")
    evaluate.add_argument("--beta", type=float, default=0.1)
    evaluate.add_argument("--loss", default="sigmoid")
    evaluate.add_argument("--max-length", type=int, default=1024)
    evaluate.add_argument("--max-prompt-length", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--dtype", default="auto")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--ref-cache", help="directory of precomputed reference log-probs (default: "
                          "$TILTLM_CACHE/reference or ~/.cache/tiltlm/reference)")
    evaluate.add_argument("--json", help="also write the result to this file")
    evaluate.add_argument("--trust-remote-code", action="store_true")
    evaluate.set_defaults(run=cmd_eval)

    for name, module, summary in (
        ("quickstart", "tiltlm.quickstart", "DPO end to end on the embedded default (SmolLM2-135M, VADER)"),
        ("generate", "tiltlm.generate", "sample completions from a policy, with log-probs"),
        ("compare", "tiltlm.compare", "win rate of policy A over policy B under a reward"),
        ("plot", "tiltlm.plots", "training curves of a run as PNG"),
        ("frontier", "tiltlm.frontier", "reward against KL(pi || pi_ref) for DPO at several betas, preferred-FT and best-of-N"),
        ("plan", "tiltlm.commands.plan", "will a run fit? peak memory per device and FLOPs, traced on fake tensors"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary)
        imported = importlib.import_module(module)
        imported.add_arguments(sub)
        sub.set_defaults(run=imported.run)

    verify = commands.add_parser("verify", help="check on an exactly solvable problem that DPO reaches the "
                                                "optimum pi_ref * exp(r / beta) / Z", add_help=False)
    verify.add_argument("rest", nargs=argparse.REMAINDER)
    verify.set_defaults(run=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tiltlm.checkpoint import CheckpointError
    from tiltlm.data.types import DataError
    from tiltlm.models import ModelError
    from tiltlm.train import TrainingError

    try:
        return args.run(args)
    except (ConfigError, DataError, ModelError, CheckpointError) as error:
        print(f"tiltlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, TrainingError) as error:  # a full disk, too many non-finite steps: not the user's mistake
        print(f"tiltlm {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tiltlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
