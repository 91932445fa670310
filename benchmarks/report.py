"""benchmarks/RESULTS.md from the raw results of a run (``python benchmarks/report.py`` rewrites it from
``benchmarks/out/summary.json`` without running anything)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from flops import Shape  # noqa: E402
from run import DESCRIPTIONS, OUT, summarize  # noqa: E402

MODEL_TITLES = {"tiny20m": "20M-parameter random Llama (vocab 32,000, untied head)", "smollm2": "SmolLM2-135M"}

NOTES = """\
## Definitions

* **Workload.** HH-RLHF harmless-base test pairs (implicit prompts), tokenized by tiltlm; kept when the
  prompt has >= 100 tokens and both completions >= 50; prompts cut to their last 300 tokens, completions
  to their first 150 (so nothing exceeds max_length 512 and no further truncation applies); shuffled once
  with a fixed seed. 8 pairs a step, the same pairs in the same order for every configuration (TRL included),
  float32, `torch.set_num_threads(2)`, AdamW (fused), lr 1e-5 constant, weight decay 0, clipping 1.0,
  beta 0.1, sigmoid loss. The 20M model's tokenizer is a byte-level BPE trained on the HH texts with a
  32,000 target (the corpus yields fewer merges, see below); the model's vocabulary is 32,000.
* **s/step**: median wall time of the measured steps (after the warm-up steps), from the end of one step
  to the end of the next: collation, forwards, backward, clipping, optimizer step (TRL: its whole
  training-loop step, logging included).
* **pairs/s, real tokens/s**: 8 pairs / s-step; real tokens count each prompt once and no padding. For
  precomputed-reference configurations these include the precompute as a user waits for it, amortised
  over one epoch of the run's own pairs: `epoch pairs / (precompute s + epoch steps x s/step)` (the
  precompute is linear in pairs, so this does not depend on the epoch size). "cached" is the rate when
  the table is already on disk (a second epoch, a re-run, an evaluation).
* **MFU**: useful FLOPs of the step / s-step / machine peak. Useful FLOPs (`benchmarks/flops.py`):
  forward = `2 N_blocks T + 2 d V C + 4 L d_attn A` (T real tokens with the prompt once, C completion
  tokens, A attended query-key pairs under the exact DPO mask, N_blocks the block parameters without
  embedding and head); step = 3 x forward for the policy, + 1 x forward for an online reference
  (none for a precomputed one). The same useful FLOPs are credited to every configuration, so wasted work
  (padding, duplicated prompts, full-vocabulary logits, masked attention) lowers MFU.
* **Peak**: the best `torch.mm` of two 2048x2048 float32 matrices on 2 threads, measured in every
  configuration's process right before its steps; the machine's peak is the best over the run.
* **CPU-time columns**: the process's CPU seconds per step (all threads, `time.process_time`) / 2
  threads: what the step takes on 2 dedicated cores when other processes only time-slice ours. When
  other jobs share the cores, wall times stretch by 1.5-5x at random moments while CPU time is far less
  sensitive (threads spin-waiting for a descheduled partner still count, so it stays an upper bound).
  Wall-clock figures are the primary ones; where the two disagree, the machine was busy.
* **Peak RSS**: VmHWM of the configuration's own process (imports, both models, optimizer state, the
  precompute pass, all steps).
"""


def fmt_rate(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def table(model: str, results: dict, peak: float) -> tuple[str, dict]:
    tiltlm = [r for name, r in results.items() if not name.startswith("trl-")]
    if not tiltlm:
        return "(no tiltlm result)\n", {}
    shape = Shape(**tiltlm[0]["shape"])
    lengths = tiltlm[0]["lengths"]
    summaries = {name: summarize(r, shape, peak, lengths) for name, r in results.items()}
    trl = summaries.get("trl-completion-only")
    lines = ["| configuration | pairs/s | real tokens/s | s/step (min-max) | peak RSS | MFU | x TRL compl.-only "
             "| CPU-time s/step | pairs/s, MFU, x TRL by CPU time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        pairs = fmt_rate(s["pairs_per_s"])
        if not s["online"]:
            pairs += f" (cached {fmt_rate(s['cached_pairs_per_s'])})"
        ratio = f"{s['pairs_per_s'] / trl['pairs_per_s']:.1f}x" if trl else "-"
        cpu_ratio = f"{s['cpu_pairs_per_s'] / trl['cpu_pairs_per_s']:.1f}x" if trl else "-"
        lines.append(f"| **{name}**: {DESCRIPTIONS.get(name, '')} | {pairs} | {s['tokens_per_s']:.0f} | "
                     f"{s['median']:.2f} ({min(s['times']):.2f}-{max(s['times']):.2f}) | {s['rss']:.0f} MB | "
                     f"{100 * s['mfu']:.0f}% | {ratio} | {s['cpu_median']:.2f} | "
                     f"{fmt_rate(s['cpu_pairs_per_s'])}, {100 * s['cpu_mfu']:.0f}%, {cpu_ratio} |")
    return "\n".join(lines) + "\n", summaries


def equivalence(results: dict) -> str:
    """Per-step losses and policy log-probs of every configuration against the naive one (or, where the
    naive one was not run, TRL's completion-only one): the first step is the same weights for all; later
    steps follow each configuration's own updates."""
    base_name = next((n for n in ("naive", "trl-completion-only") if n in results), None)
    if base_name is None:
        return "(no naive or TRL run to compare with)\n"
    base = results[base_name]
    lines = [f"Against `{base_name}`:\n",
             "| configuration | max abs loss diff | max rel. diff of summed policy log-probs |", "|---|---:|---:|"]
    if "trl-shipped" in results and "trl-completion-only" in results:  # the patch changes no number
        patched, shipped = results["trl-completion-only"], results["trl-shipped"]
        diff = max(abs(a - b) for a, b in zip(patched["losses"], shipped["losses"]))
        lines.append(f"| trl-completion-only vs trl-shipped | {diff:.1e} | - |")
    sums = lambda name: 8 if name.startswith("trl-") else 1  # noqa: E731  TRL logs batch means, tiltlm sums
    for name, r in results.items():
        if name == base_name:
            continue
        steps = min(len(r["losses"]), len(base["losses"]))
        loss = max(abs(a - b) for a, b in zip(r["losses"][:steps], base["losses"][:steps]))
        rel = 0.0
        for mine, theirs in zip(r["logps"][:steps], base["logps"][:steps]):
            for a, b in zip(mine, theirs):
                a, b = a * sums(name), b * sums(base_name)
                rel = max(rel, abs(a - b) / abs(b))
        lines.append(f"| {name} | {loss:.1e} | {rel:.1e} |")
    return "\n".join(lines) + "\n"


def write(path: Path, info: dict, results: dict, profiles: dict) -> None:
    peaks = [r["peak_flops"] for model in results.values() for r in model.values() if "peak_flops" in r]
    peak = max(peaks) if peaks else float("nan")
    parts = [
        "# tiltlm step benchmark\n",
        "Command (from the repository root; creates `benchmarks/.venv-trl` for TRL when missing, runs every "
        "configuration, the equivalence tests, and rewrites this file):\n\n    bash benchmarks/run.sh\n",
        "## Machine\n",
        f"* CPU: {info['cpu']} ({info['simd']}), {info['cores']} cores; Python {info['python']}, torch "
        f"{info['torch']}, transformers {info['transformers']}, TRL {info['trl']} (its own venv)",
        f"* float32 matmul peak (2048x2048 `torch.mm`, 2 threads, best of 12, best over the run's "
        f"{len(peaks)} measurements): **{peak / 1e9:.0f} GFLOP/s**; the measurements ranged "
        f"{min(peaks) / 1e9:.0f}-{peak / 1e9:.0f} GFLOP/s",
        f"* load average before / after: {', '.join(f'{x:.1f}' for x in info['load_before'])} / "
        f"{', '.join(f'{x:.1f}' for x in info.get('load_after', []))} (the benchmark itself keeps it near 1-2; "
        f"more means other work shared the 2 cores: compare configurations within a run); run time "
        f"{info.get('minutes', 0):.0f} min\n",
    ]
    tests = OUT / "tests.txt"
    for model, model_results in results.items():
        text, summaries = table(model, model_results, peak)
        first = next((r for r in model_results.values() if "shape" in r), None)
        extra = ""
        if first is not None:
            steps = first["lengths"][first["warmup"]:]
            tokens = sum(p + c + r for step in steps for p, c, r in step) / len(steps)
            extra = (f"{first['pairs']} pairs pass the filter; measured steps average {tokens:.0f} real "
                     f"tokens; block parameters {first['shape']['blocks_params']:,}.")
        parts += [f"## {MODEL_TITLES.get(model, model)}\n", extra + "\n", text]
        pre = [(n, s) for n, s in summaries.items() if s.get("precompute") is not None]
        if pre:
            parts.append("Precompute (4x batch, the run's pairs): " + "; ".join(
                f"{n}: {s['precompute']:.1f} s, cache hit {s['cache_hit']:.2f} s" for n, s in pre) + "\n")
        parts += ["Equivalence within the benchmark (same pairs, same starting weights):\n",
                  equivalence(model_results)]
    if tests.is_file():
        parts += ["## Equivalence tests\n", "`pytest tests/test_fastpaths.py tests/test_refcache.py` (every fast path "
                  "against the naive path, 1e-5 relative, on every data format and on truncated pairs):\n",
                  "    " + tests.read_text().strip().splitlines()[-1] + "\n"]
    if not profiles:  # a resumed run that skipped profiling: the files of the last profiling run
        profiles = {path.stem[len("profile-tiny20m-"):]: path.read_text()
                    for path in sorted(OUT.glob("profile-tiny20m-*.txt"))}
    for name, text in profiles.items():
        rows = text.strip().splitlines()[:16]
        parts += [f"## Profile: tiny20m `{name}` (2 measured steps, self CPU time)\n", "```", *rows, "```\n"]
    parts.append(NOTES)
    notes = HERE / "NOTES.md"
    if notes.is_file():
        parts.append(notes.read_text())
    path.write_text("\n".join(parts))


if __name__ == "__main__":
    summary = json.loads((OUT / "summary.json").read_text())
    write(HERE / "RESULTS.md", summary["machine"], summary["results"], summary["profiles"])
