"""The table of docs/multi-gpu.md ("Will it fit?"): ``tiltlm plan`` for three public configurations
(config.json files in benchmarks/configs/, written from their published dimensions; no weights), on 1
and 8 devices of 80 GiB, full fine-tuning and LoRA r=16, one packed row of 4,096 tokens per device,
without and with gradient checkpointing.

    python benchmarks/plan_table.py > table.md

The trainer's defaults on GPUs: float32 master weights and AdamW state under bf16 autocast
(``--precision bf16-mixed``; on 8 devices FSDP's float32 shards with bf16 compute), the reference
precomputed (what ``auto`` picks for a run of an epoch or more, under FSDP too).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiltlm.plan import GIB, Setup, load_config, plan  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("qwen2.5-0.5b", "llama-3.1-8b", "qwen2.5-32b")


def setups(model: str) -> list[tuple[str, Setup]]:
    base = Setup(model=str(CONFIGS / f"{model}.json"), batch_size=1, seq_len=4096, precision="bf16-mixed",
                 device_memory=80 * GIB)
    fsdp = dict(devices=8, parallel="fsdp")
    return [("1", "full", base), ("1", "LoRA r=16", Setup(**{**base.__dict__, "lora_r": 16})),
            ("8 (FSDP)", "full", Setup(**{**base.__dict__, **fsdp})),
            ("8 (FSDP)", "LoRA r=16", Setup(**{**base.__dict__, **fsdp, "lora_r": 16}))]


def main() -> None:
    print("| model | devices | training | weights | grads | AdamW | activations | peak, no GC | peak, GC | "
          "fits 80 GiB (no GC / GC) | TFLOPs/step/device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        config = load_config(str(CONFIGS / f"{model}.json"))
        for devices, mode, setup in setups(model):
            plain = plan(setup, config)
            checkpointed = plan(Setup(**{**setup.__dict__, "gradient_checkpointing": True}), config)
            s = plain.step
            cells = [model, devices, mode] + [f"{v / GIB:.1f}" for v in (s.weights, s.gradients, s.optimizer,
                                                                          s.activations)]
            cells += [f"{plain.peak_bytes / GIB:.1f} GiB", f"{checkpointed.peak_bytes / GIB:.1f} GiB",
                      f"{'yes' if plain.fits else 'no'} / {'yes' if checkpointed.fits else 'no'}",
                      f"{plain.flops / 1e12:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
