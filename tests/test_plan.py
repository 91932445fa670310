"""``tiltlm plan``: FLOPs against benchmarks/flops.py's independent count, the traced peak against the
resident memory of real training runs, and a config.json planned without weights or real memory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tiltlm.plan import Setup, load_config, plan

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from flops import Shape, forward_flops, step_flops  # noqa: E402

HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
# The child's own peak (VmHWM, in kB): ru_maxrss would also count the parent's pages at the fork (Linux
# carries the high-water mark across exec), so a measurement made late in a large test session read the
# pytest process's size, not the run's.
PRINT_PEAK = ("print('MAXRSS', next(int(line.split()[1]) for line in open('/proc/self/status') "
              "if line.startswith('VmHWM:')))")


def llama_config(path: Path, hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> Path:
    """A Llama config.json and nothing else (no weights, no tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "tie_word_embeddings": False, "max_position_embeddings": 4096}))
    return path / "config.json"


def llama_parameters(hidden: int, layers: int, intermediate: int, vocab: int) -> tuple[int, int]:
    """(all parameters, block parameters) of an untied Llama with as many KV heads as heads, counted by
    hand: q, k, v, o are hidden x hidden; gate, up, down hidden x intermediate; two norms per layer."""
    blocks = layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    return blocks + 2 * vocab * hidden + hidden, blocks


def test_flops_equal_the_benchmark_count(tmp_path):
    """Full fine-tuning, two pairs that each fill a packed row exactly (no padding). flops.py counts
    3 forwards; per kernel that is: block matmuls 3x; the chunked head 4x (it recomputes its logits in
    the backward); attention 3.5x (below) over all L x L positions of a row (the kernel's count:
    flops.py's A is the attended pairs only, so here A = L^2 per row). Block parameters are the matmul weights (flops.py
    counts the norms' few weights too, as noise; here they would break equality)."""
    hidden, layers, heads, intermediate, vocab = 64, 2, 4, 128, 1000
    config = llama_config(tmp_path, hidden, layers, heads, intermediate, vocab)
    lengths = ((10, 6, 4), (7, 5, 8))
    row = 20
    result = plan(Setup(model=str(config), seq_len=row, batch_size=2, pair_lengths=lengths))
    blocks = layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    matmuls = (step_flops(Shape(blocks, hidden, 0, layers, 0), list(lengths), online_reference=False)
               + 4 * forward_flops(Shape(0, hidden, vocab, layers, 0), list(lengths)))
    assert result.flops_by_kind["matmul"] == matmuls
    # flops.py's attention forward, 4 n_layers d_attn A with A = L^2 per row; the flash kernel's backward
    # recomputes Q K^T, so it is 5 products of the forward's 2: 3.5 forwards where flops.py counts 3
    attention = 3.5 * 4 * layers * hidden * (row * row) * len(lengths)
    assert result.flops_by_kind["attention"] == attention


def test_config_json_plans_without_weights_or_memory(tmp_path):
    """A bare config.json: the weights line is 4 bytes per parameter counted by hand; and a 70B-sized
    config, whose float32 weights alone (~280 GB) exceed this machine, plans in a process whose resident
    memory stays near the runtime's."""
    hidden, layers, intermediate, vocab = 48, 2, 96, 500
    tiny = llama_config(tmp_path / "tiny", hidden, layers, 4, intermediate, vocab)
    result = plan(Setup(model=str(tiny), seq_len=32, batch_size=2, ref_mode="none"))
    parameters, _ = llama_parameters(hidden, layers, intermediate, vocab)
    assert result.parameters == parameters
    rotary = 2 * 4 * (hidden // 4 // 2)  # buffers: inv_freq and original_inv_freq, head_dim / 2 floats each
    assert result.step.weights == 4 * parameters + rotary
    tensors = layers * 9 + 3  # q k v o gate up down + 2 norms per layer; embedding, head, final norm
    assert result.step.optimizer == 2 * 4 * parameters + 4 * tensors  # AdamW: 2 moments per weight, a step count per tensor

    big = llama_config(tmp_path / "big", 8192, 80, 64, 28672, 128256)
    out = tmp_path / "plan.json"
    script = "import sys; from tiltlm.cli import main; code = main(sys.argv[1:]); " + PRINT_PEAK
    done = subprocess.run([sys.executable, "-c", script, "plan", "--model", str(big), "--seq-len", "64",
                           "--batch-size", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    max_rss = int(done.stdout.split("MAXRSS")[-1]) * 1024
    planned = json.loads(out.read_text())
    big_parameters, _ = llama_parameters(8192, 80, 28672, 128256)
    assert planned["parameters"] == big_parameters
    assert planned["peak_bytes"] > 3 * 4 * big_parameters  # weights, gradients, AdamW: > 800 GB
    assert max_rss < 2 * 1024 ** 3


def test_json_has_peak_bytes_and_the_breakdown_adds_up(tmp_path):
    from tiltlm.cli import main

    config = llama_config(tmp_path, 32, 2, 4, 64, 300)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(config), "--seq-len", "48", "--batch-size", "2", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    step = written["step"]
    parts = ("weights", "gradients", "optimizer", "activations", "reference", "fsdp_gather", "runtime")
    assert step["total"] == sum(step[k] for k in parts)
    assert written["peak_bytes"] == max(step["total"], written["precompute_peak"])
    assert written["fits"] is True


def test_fsdp_splits_state_by_devices(tmp_path):
    """The sharding rule: weights, gradients and AdamW state per device are the 1-device trace's / N."""
    config = llama_config(tmp_path, 32, 2, 4, 64, 300)
    one = plan(Setup(model=str(config), seq_len=32, batch_size=2, ref_mode="online"))
    eight = plan(replace(one.setup, devices=8, parallel="fsdp"))
    assert eight.step.weights == one.step.weights // 8
    assert eight.step.optimizer == one.step.optimizer // 8
    assert eight.step.activations == one.step.activations
    assert eight.step.fsdp_gather > 0


def test_bad_config_json_names_the_field(tmp_path):
    from tiltlm.models import ModelError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelError, match="model_type"):
        load_config(str(path))


# The plan predicts live memory. glibc's default policy keeps freed heap resident and lets it grow from
# step to step (SmolLM2-135M LoRA: 13.1 GB after 8 micro-batches for 6.5 GB live; docs/multi-gpu.md), so
# the runs are measured with freed memory returned to the system, as --release-memory does.
RSS_ALLOCATOR = ["--release-memory"]


def train_peak_rss(model: str, data: Path, output: Path, extra: list[str]) -> int:
    """Peak resident bytes of a real ``tiltlm train`` of 3 steps (8 pairs each, reference precomputed)."""
    script = "import sys; from tiltlm.cli import main; code = main(sys.argv[1:]); " + PRINT_PEAK + "; sys.exit(code)"
    args = ["train", "--model", model, "--data", str(data), "--output", str(output), "--batch-size", "8",
            "--grad-accum", "1", "--max-length", "512", "--max-prompt-length", "300", "--no-progress",
            "--no-tensorboard", "--ref-cache", str(output.parent / "refcache"), *extra]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("MAXRSS")[-1]) * 1024


@pytest.fixture(scope="module")
def workload_20m(tmp_path_factory):
    """The benchmark's 20M-parameter Llama (benchmarks/workload.py, built once) and 24 HH-RLHF pairs."""
    if not HH_RLHF.is_file():
        pytest.skip("the HH-RLHF file is not beside the repository")
    import gzip

    from workload import model_dir, prepare

    prepare("tiny20m")
    data = tmp_path_factory.mktemp("hh") / "hh24.jsonl"
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        data.write_text("".join(line for _, line in zip(range(24), handle)))
    return str(model_dir("tiny20m")), data


@pytest.mark.parametrize("extra", [[], ["--gradient-checkpointing"], ["--lora-r", "16"],
                                   ["--lora-r", "16", "--gradient-checkpointing"]],
                         ids=["full", "full+gc", "lora", "lora+gc"])
def test_planned_peak_within_20_percent_of_measured_rss(workload_20m, tmp_path, extra):
    """The plan of the run's largest step (its 8 longest pairs, which length-grouping puts in one step)
    against the peak RSS of the real run, runtime baseline included."""
    from tiltlm.plan import longest_pairs

    model, data = workload_20m
    measured = train_peak_rss(model, data, tmp_path / "run", extra + RSS_ALLOCATOR)
    lengths = longest_pairs(model, str(data), 512, 300, 8)
    lora = int(extra[extra.index("--lora-r") + 1]) if "--lora-r" in extra else 0
    setup = Setup(model=model, seq_len=512, batch_size=8, pair_lengths=lengths, device="cpu", lora_r=lora,
                  gradient_checkpointing="--gradient-checkpointing" in extra)
    predicted = plan(setup).peak_bytes
    print(f"{' '.join(extra) or 'full'}: planned {predicted / 1e6:.0f} MB, measured {measured / 1e6:.0f} MB")
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)


def test_lora_with_the_adapters_off_reference_plans(tmp_path):
    """LoRA scored against its own base with the adapters switched off (what ``--alternatives`` proposes
    when the reference is not precomputed) used to end in a traceback: the trace hooked gradients while
    peft had switched the adapters' requires_grad off. The reference is the policy itself: no second copy
    of the weights, and the same weights and optimizer state as the same LoRA plan with a precomputed reference."""
    config = llama_config(tmp_path, 32, 2, 4, 64, 300)
    off = plan(Setup(model=str(config), seq_len=32, batch_size=2, lora_r=4, ref_mode="adapters-off"))
    precomputed = plan(replace(off.setup, ref_mode="precompute"))
    assert off.step.reference == 0
    assert off.step.weights == precomputed.step.weights
    assert off.step.optimizer == precomputed.step.optimizer > 0


def test_alternatives_of_an_online_reference_plan(tmp_path):
    from tiltlm.cli import main

    config = llama_config(tmp_path, 32, 2, 4, 64, 300)
    assert main(["plan", "--model", str(config), "--seq-len", "32", "--batch-size", "2", "--ref-mode", "online",
                 "--alternatives"]) == 0
