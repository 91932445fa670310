"""``tiltlm plan``: will a run fit? Peak memory per device and FLOPs per step, traced on fake tensors
(see :mod:`tiltlm.plan`); with ``--alternatives`` (on when it does not fit) the changes that make it fit."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from tiltlm.plan import (GIB, LAYOUTS, PRECISIONS, REF_MODES, Setup, format_plan, gib, load_config, longest_pairs,
                         offloaded, plan, alternatives)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory, config.json file or alias (no weights read)")
    parser.add_argument("--layout", choices=LAYOUTS, default="packed")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch per device")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (FLOPs only)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row: each synthetic pair fills one")
    parser.add_argument("--prompt-share", type=float, default=0.5, help="of a synthetic pair's tokens")
    parser.add_argument("--data", help="plan the longest --batch-size pairs of this preference file instead "
                                       "(tokenized with --model's tokenizer, truncated to --seq-len)")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="with --data (default seq-len / 2)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0: full fine-tuning")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--ref-mode", choices=REF_MODES, default="precompute",
                        help="default: precompute (as the trainer chooses for a run of an epoch or more)")
    parser.add_argument("--logprob-chunk", type=int, default=256)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--memory-gb", type=float, default=80.0, help="memory per device, GiB")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: count this process's runtime (Python, torch) as on a CPU run")
    parser.add_argument("--runtime-mb", type=float, default=None, help="memory a device spends before any tensor")
    parser.add_argument("--full-depth", action="store_true", help="trace every layer (default: 2 and 4, extended)")
    parser.add_argument("--alternatives", action="store_true", help="also trace changes that lower the peak")
    parser.add_argument("--json", help="write the result here (peak_bytes at the top level)")


def setup_from(args: argparse.Namespace) -> Setup:
    """The flags named as Setup's fields, then the three given in other units or read from --data."""
    lengths = ()
    if args.data:
        prompt = args.max_prompt_length or args.seq_len // 2
        lengths = longest_pairs(args.model, args.data, args.seq_len, prompt, args.batch_size)
    same = {f.name: getattr(args, f.name) for f in fields(Setup) if hasattr(args, f.name)}
    return Setup(**same, device_memory=int(args.memory_gb * GIB), pair_lengths=lengths,
                 runtime_bytes=None if args.runtime_mb is None else int(args.runtime_mb * 2 ** 20))


def run(args: argparse.Namespace) -> int:
    setup = setup_from(args)
    config = load_config(setup.model)
    result = plan(setup, config)
    print(format_plan(result))
    out = result.to_json()
    if args.alternatives or not result.fits:
        out["alternatives"] = []
        print("\nalternatives (each traced the same way):")
        for label, changed in alternatives(setup):
            other = plan(changed, config)
            out["alternatives"].append({"change": label, "peak_bytes": other.peak_bytes, "fits": other.fits,
                                        "flops": other.flops})
            print(f"  {'fits' if other.fits else 'no  '}  {gib(other.peak_bytes):>12}  {label}")
        print(f"  {'fits' if offloaded(result) <= setup.device_memory else 'no  '}  {gib(offloaded(result)):>12}"
              f"  weights, gradients and optimizer state offloaded to host (derived; not in tiltlm yet)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
