"""Run the whole benchmark and write benchmarks/RESULTS.md (``bash benchmarks/run.sh`` calls this).

Every configuration runs in a subprocess of its own (its peak RSS is its own), one after the other;
each subprocess also measures the float32 matmul peak just before its steps, and the machine's peak is
the best of those measurements over the whole run. Raw results go to ``benchmarks/out/*.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"
sys.path.insert(0, str(HERE))

from flops import Shape, step_flops  # noqa: E402

TILTLM_CONFIGS = ["naive", "shared", "packed", "chunked", "precompute", "all", "all-dense", "all-blocks",
                  "all-4k", "all-4k-dense", "all+gc", "all+gc+release"]
TRL_CONFIGS = ["trl-shipped", "trl-completion-only"]
PLAN = {  # model: (configurations, warm-up steps, measured steps)
    "tiny20m": (TILTLM_CONFIGS + TRL_CONFIGS, 1, 5),
    # SmolLM2 steps cost ~7x the 20M model's: only the all-on configurations and TRL's faster one fit the
    # time budget on 2 shared cores (add more with --configs)
    "smollm2": (["all", "all-dense", "all-4k", "all-4k-dense", "all+gc", "trl-completion-only"], 1, 5),
}
DESCRIPTIONS = {
    "naive": "concatenated rows, full logits, online reference",
    "shared": "naive + prefix sharing (prompt once per pair)",
    "packed": "naive + prefix sharing + packing (512-token rows)",
    "chunked": "naive + completion-only chunked projection",
    "precompute": "naive + precomputed reference",
    "all": "packing + completion-only projection + precomputed reference + attention by blocks from segment "
           "metadata: `tiltlm train`'s defaults",
    "all-dense": "all with the former attention: SDPA under a dense [rows, 1, L, L] mask (`attention: sdpa`)",
    "all-blocks": "all with the block kernel on every batch, also where the dense mask is faster",
    "all-4k": "all with 4096-token packed rows (one row a step)",
    "all-4k-dense": "all-4k with the dense mask (`attention: sdpa`)",
    "all+gc": "all + gradient checkpointing of the blocks (`--gradient-checkpointing`)",
    "all+gc+release": "all+gc + freed memory returned to the system at once (`--release-memory`)",
    "trl-shipped": "TRL DPOTrainer as shipped (fp32, no grad. ckpt)",
    "trl-completion-only": "TRL with its log-prob head on completion positions (`_use_triton` patched)",
}


def run_one(model: str, config: str, warmup: int, steps: int, log) -> dict | None:
    out = OUT / f"{model}-{config}.json"
    if config.startswith("trl-"):
        command = [str(TRL_PYTHON), str(HERE / "bench_trl.py"), model, config[len("trl-"):]]
    else:
        command = [sys.executable, str(HERE / "bench_step.py"), model, config]
    command += ["--warmup", str(warmup), "--steps", str(steps), "--out", str(out)]
    start = time.perf_counter()
    with open(OUT / f"{model}-{config}.log", "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    log(f"  {model} {config}: exit {code}, {time.perf_counter() - start:.0f} s")
    return json.loads(out.read_text()) if code == 0 and out.is_file() else None


def profile(model: str, config: str, log) -> str:
    path = OUT / f"profile-{model}-{config}.txt"
    command = [sys.executable, str(HERE / "bench_step.py"), model, config, "--warmup", "1", "--steps", "2",
               "--out", str(OUT / f"profile-{model}-{config}.json"), "--profile", str(path)]
    subprocess.call(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(f"  profile {model} {config} written")
    return path.read_text() if path.is_file() else "(profile failed)"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    simd = [f for f in ("avx512f", "avx2", "fma", "amx_tile") if f" {f}" in flags]
    import os

    import torch
    import transformers

    trl_version = subprocess.run([str(TRL_PYTHON), "-c", "import trl; print(trl.__version__)"],
                                 capture_output=True, text=True).stdout.strip() if TRL_PYTHON.exists() else "absent"
    return {"cpu": cpu, "simd": ", ".join(simd), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "load_before": os.getloadavg()}


def summarize(result: dict, shape: Shape, peak: float, lengths: list) -> dict:
    """Figures of one configuration: see the notes in RESULTS.md for the definitions. ``lengths``: the
    (prompt, chosen, rejected) lengths of each step's pairs, the same for every configuration of a model."""
    warmup = result["warmup"]
    times = result["step_seconds"][warmup:]
    median = statistics.median(times)
    # CPU seconds of the process per step over its 2 threads: the step time on 2 dedicated cores if
    # other processes only time-slice ours (spin-waiting threads still count, so an upper bound)
    cpu_median = statistics.median(result["step_cpu_seconds"][warmup:]) / 2
    online = "precompute_seconds" not in result
    flops = statistics.mean(step_flops(shape, [tuple(x) for x in step], online) for step in lengths[warmup:])
    tokens = statistics.mean(sum(p + c + r for p, c, r in step) for step in lengths[warmup:])
    steps_epoch = 1.0
    epoch_seconds = median
    if not online:  # precompute amortised over the epoch of the run's pairs
        steps_epoch = result["epoch_pairs"] / 8
        epoch_seconds = result["precompute_seconds"] + steps_epoch * median
    cpu_epoch = cpu_median if online else result["precompute_cpu_seconds"] / 2 + steps_epoch * cpu_median
    return {"median": median, "times": times, "cpu_median": cpu_median,
            "cpu_pairs_per_s": 8 * steps_epoch / cpu_epoch, "cpu_mfu": flops / cpu_median / peak, "pairs_per_s": 8 * steps_epoch / epoch_seconds,
            "tokens_per_s": tokens * steps_epoch / epoch_seconds, "mfu": flops / median / peak,
            "rss": result["peak_rss_mb"], "step_flops": flops, "online": online,
            "cached_pairs_per_s": 8 / median, "precompute": result.get("precompute_seconds"),
            "cache_hit": result.get("cache_hit_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=list(PLAN))
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results in out/summary.json and run only the missing configurations")
    parser.add_argument("--configs", nargs="*", default=None, help="only these configurations")
    parser.add_argument("--warmup", type=int, default=None, help="override the plan's warm-up steps")
    parser.add_argument("--steps", type=int, default=None, help="override the plan's measured steps")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()
    log = lambda message: print(message, flush=True)  # noqa: E731
    info = machine()
    log(f"machine: {info}")
    subprocess.check_call([sys.executable, str(HERE / "workload.py"), *args.models])
    results: dict[str, dict[str, dict]] = {}
    profiles: dict[str, str] = {}
    if args.resume and (OUT / "summary.json").is_file():
        previous = json.loads((OUT / "summary.json").read_text())
        results, profiles = previous["results"], previous["profiles"]
        info["load_before"] = previous["machine"]["load_before"]
        started -= previous["machine"].get("minutes", 0) * 60  # the report counts the whole run
    for model in args.models:
        configs, warmup, steps = PLAN[model]
        configs = [c for c in configs if args.configs is None or c in args.configs]
        warmup = args.warmup if args.warmup is not None else warmup
        steps = args.steps if args.steps is not None else steps
        results.setdefault(model, {})
        for config in configs:
            if config in results[model]:
                continue
            if config.startswith("trl-") and not TRL_PYTHON.exists():
                log(f"  {config}: skipped, no {TRL_PYTHON}")
                continue
            result = run_one(model, config, warmup, steps, log)
            if result is not None:
                results[model][config] = result
                save(info, results, profiles, started)  # a partial report survives an interrupted run
        if model == "tiny20m" and not args.skip_profile and not profiles:
            for config in ("all",):
                profiles[config] = profile("tiny20m", config, log)
    save(info, results, profiles, started)
    log(f"wrote {HERE / 'RESULTS.md'} in {info['minutes']:.1f} min")


def save(info: dict, results: dict, profiles: dict, started: float) -> None:
    import os

    import report

    info["load_after"] = os.getloadavg()
    info["minutes"] = (time.perf_counter() - started) / 60
    (OUT / "summary.json").write_text(json.dumps({"machine": info, "results": results, "profiles": profiles}))
    report.write(HERE / "RESULTS.md", info, results, profiles)


if __name__ == "__main__":
    main()
