"""Training under torchrun, 2 processes on CPU (gloo): DDP and FSDP2 reach the weights one process
reaches on the same pairs; only rank 0 writes under DDP; sharded FSDP checkpoints resume exactly, with
2 processes or 1, and a one-process checkpoint resumes sharded; FSDP's final/ is written one gathered
tensor at a time in Hugging Face's sharded layout; two "nodes" rendezvous over loopback.

One ``torchrun`` launch runs every 2-process training in sequence (each launch costs seconds of
imports on a busy machine): this file is also the script it runs (see :func:`driver` at the bottom).
Every launch has a time limit. Run alone with ``pytest -m multiprocess``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH_TIMEOUT = 300  # seconds; a launch takes ~30-60 s on 2 busy cores, so this only catches a hang
STEPS = 6  # 8 pairs, 4 pairs a step (2 ranks x 2, or 1 process x 4): 2 steps an epoch, 3 epochs
PREEMPTED_AFTER = 2  # the step after which one rank of the preempted run gets SIGTERM
CUT = 3  # the step the resharding resumes start from
SHARD_BYTES = 40_000  # FSDP's final/ files in the launch: the tiny model (~180 KB) spans several

# The run's settings; the batch shape (per rank) is added per run. warmup 0.25 of 6 steps = 2 warm-up
# steps then linear decay, so a resumed run must also restore the LR schedule.
COMMON = ["--max-length", "64", "--max-prompt-length", "32", "--lr", "1e-3", "--epochs", "3", "--seed", "3",
          "--warmup-ratio", "0.25", "--save-every", "1", "--keep-checkpoints", "10", "--no-progress",
          "--no-tensorboard"]
COMPARED = ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "logps/chosen_change", "grad_norm", "lr")
# Absolute slack beyond rel 1e-6 for metrics that are differences of float32 log-prob sums of size ~90,
# whose last bit is 7.6e-6 (rewards are beta = 0.1 times such differences): summing in another order
# moves them by a few of those bits.
SLACK = {"logps/chosen_change": 4e-5, "rewards/chosen": 4e-6, "rewards/rejected": 4e-6, "rewards/margins": 8e-6,
         "loss": 8e-6}

def clean_env() -> dict[str, str]:
    """The environment for a launched process: one thread per rank (two busy cores), offline, and no
    torchrun variables inherited from a caller."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def torchrun() -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun"))]


def check_finished(process: subprocess.Popen, what: str) -> str:
    """Wait (bounded) for ``process``; its output, or a test failure showing it."""
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{what}: no exit within {LAUNCH_TIMEOUT} s\n{output[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{what}: exit code {process.returncode}\n{output[-6000:]}")
    return output


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def weights(run: Path) -> dict:
    """final/'s weights, from ``model.safetensors`` or the files of a sharded layout."""
    from safetensors.torch import load_file

    return {name: tensor for path in sorted((run / "final").glob("model*.safetensors"))
            for name, tensor in load_file(path).items()}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def assert_same_metrics(run: Path, reference: Path) -> None:
    from tiltlm.metrics import read_metrics

    rows, expected = read_metrics(run / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row, want in zip(rows, expected):
        assert (row["step"], row["epoch"], row["lr"]) == (want["step"], want["epoch"], want["lr"])
        for key in COMPARED:
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=SLACK.get(key, 1e-6)), (row["step"], key)


def interrupted_copy(run: Path, copy: Path, step: int) -> None:
    """``copy``: ``run`` as it stood when killed after step ``step``'s checkpoint, with the next step's
    metrics row already written (so resume must drop and redo it)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    for later in range(step + 1, STEPS + 1):
        shutil.rmtree(copy / "checkpoints" / f"step-{later}")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines[:step + 1]) + "\n")


# --- fixtures: the runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    from conftest import PAIRS

    data = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return {"model": str(tiny_model_dir), "data": str(data)}


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model saved in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    directory = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def single(tmp_path_factory, inputs, bf16_model_dir) -> dict[str, Path]:
    """One process, in this one: 4 pairs a step as one micro-batch of 4 ("batch 2b") and as 2 micro-batches
    of 2 ("b with 2-step accumulation"); 2 steps of the latter from the bfloat16-saved model."""
    from tiltlm.cli import main

    base = tmp_path_factory.mktemp("single")
    runs = {"batch4": ["--batch-size", "4", "--grad-accum", "1"],
            "batch2x2": ["--batch-size", "2", "--grad-accum", "2"],
            "bf16-start": ["--batch-size", "2", "--grad-accum", "2", "--max-steps", "2"]}
    for name, shape in runs.items():
        model = str(bf16_model_dir) if name == "bf16-start" else inputs["model"]
        assert main(["train", "--model", model, "--data", inputs["data"], "--output", str(base / name),
                     *COMMON, *shape]) == 0
    return {name: base / name for name in runs}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, inputs, single, bf16_model_dir) -> dict[str, Path]:
    """One ``torchrun --nproc-per-node 2`` launch of :func:`driver`, which runs in turn:

    ``ddp``          batch 2 a rank, rank 1 with the output directory mounted read-only where possible
    ``ddp-preempted`` batch 1 x 2 accumulation steps a rank; SIGTERM reaches rank 1 only, after step 2;
                     then resumed
    ``fsdp``         batch 1 x 2 accumulation steps a rank, sharded (final/ files of SHARD_BYTES from here on)
    ``fsdp-resumed`` a copy of ``fsdp`` cut back to step 3, resumed
    ``fsdp-bf16``    sharded with dtype bfloat16 (MixedPrecisionPolicy: float32 master weights), 2 steps
    ``fsdp-from-one`` a copy of the one-process run ``batch2x2`` cut back to step 3, resumed sharded
    ``fsdp-bf16-start`` 2 steps from the bfloat16-saved model, sharded
    """
    base = tmp_path_factory.mktemp("two-ranks")
    runs = {name: base / name for name in ("ddp", "ddp-preempted", "fsdp", "fsdp-resumed", "fsdp-bf16",
                                           "fsdp-from-one", "fsdp-bf16-start")}
    runs["ddp"].mkdir()  # exists before rank 1 mounts it read-only
    train = ["train", "--model", inputs["model"], "--data", inputs["data"], *COMMON]
    plan = {
        "read_only": str(runs["ddp"]),
        "isolated_marker": str(base / "rank1-isolated"),
        "steps": [
            ["run", *train, "--output", str(runs["ddp"]), "--batch-size", "2", "--grad-accum", "1"],
            ["preempt", "1", str(PREEMPTED_AFTER), *train, "--output", str(runs["ddp-preempted"]), "--batch-size", "1",
             "--grad-accum", "2"],
            ["run", "train", "--config", str(runs["ddp-preempted"] / "config.yaml"), "--resume",
             str(runs["ddp-preempted"])],
            ["shard-bytes", str(SHARD_BYTES)],
            ["run", *train, "--output", str(runs["fsdp"]), "--batch-size", "1", "--grad-accum", "2", "parallel=fsdp"],
            ["cut", str(runs["fsdp"]), str(runs["fsdp-resumed"]), "3"],
            ["run", "train", "--config", str(runs["fsdp"] / "config.yaml"), "--resume", str(runs["fsdp-resumed"])],
            ["run", *train, "--output", str(runs["fsdp-bf16"]), "--batch-size", "1", "--grad-accum", "2",
             "--max-steps", "2", "--dtype", "bfloat16", "parallel=fsdp"],
            ["cut", str(single["batch2x2"]), str(runs["fsdp-from-one"]), str(CUT)],
            ["run", "train", "--config", str(single["batch2x2"] / "config.yaml"), "--resume",
             str(runs["fsdp-from-one"]), "--batch-size", "1", "--grad-accum", "2", "parallel=fsdp"],
            ["run", "train", "--model", str(bf16_model_dir), "--data", inputs["data"], *COMMON, "--output",
             str(runs["fsdp-bf16-start"]), "--batch-size", "1", "--grad-accum", "2", "--max-steps", "2",
             "parallel=fsdp"],
        ],
    }
    (base / "plan.json").write_text(json.dumps(plan))
    process = launch([*torchrun(), "--standalone", "--nproc-per-node", "2", __file__, str(base / "plan.json")],
                     cwd=base)
    runs["log"] = base / "log.txt"
    runs["log"].write_text(check_finished(process, "torchrun --nproc-per-node 2"))
    runs["isolated"] = base / "rank1-isolated"
    return runs


# --- DDP ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_ddp_matches_one_process_with_double_batch_or_accumulation(two_ranks, single, tiny_model_dir):
    ddp = weights(two_ranks["ddp"])
    for reference in ("batch4", "batch2x2"):
        assert_same_weights(ddp, weights(single[reference]), atol=1e-6)
        assert_same_metrics(two_ranks["ddp"], single[reference])
    # the tolerance is far below what training changed
    from safetensors.torch import load_file

    initial = load_file(tiny_model_dir / "model.safetensors")
    assert max((ddp[k] - initial[k]).abs().max().item() for k in ddp) > 1e-3


@pytest.mark.multiprocess
def test_ddp_only_rank_0_writes(two_ranks):
    files = sorted(str(p.relative_to(two_ranks["ddp"])) for p in two_ranks["ddp"].rglob("*") if p.is_file())
    assert "config.yaml" in files and f"checkpoints/step-{STEPS}/trainable.safetensors" in files
    assert not [f for f in files if "rank" in f]  # one unsharded file set per checkpoint
    if not two_ranks["isolated"].is_file():
        pytest.skip("rank 1 could not get a read-only view of the output (needs root for mount namespaces)")
    # rank 1 ran with the output directory mounted read-only: any write would have failed its run
    assert two_ranks["isolated"].read_text() == str(two_ranks["ddp"])


@pytest.mark.multiprocess
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(two_ranks, single):
    """SIGTERM seen by rank 1 alone (during step 2's end, after its flag was read): both ranks finish
    step 3, rank 0 checkpoints it, both exit 0; the resumed run reaches the single-process weights."""
    stopped = PREEMPTED_AFTER + 1
    log = two_ranks["log"].read_text()
    assert f"SIGTERM: checkpoint saved at step {stopped}; continue with --resume" in log
    assert f"resumed from {two_ranks['ddp-preempted'] / 'checkpoints' / f'step-{stopped}'}" in log
    assert_same_weights(weights(two_ranks["ddp-preempted"]), weights(single["batch2x2"]), atol=1e-6)
    assert_same_metrics(two_ranks["ddp-preempted"], single["batch2x2"])


# --- FSDP --------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_fsdp_matches_one_process_and_saves_a_plain_model(two_ranks, single):
    from transformers import AutoModelForCausalLM

    run = two_ranks["fsdp"]
    assert_same_weights(weights(run), weights(single["batch2x2"]), atol=1e-6)
    assert_same_metrics(run, single["batch2x2"])
    AutoModelForCausalLM.from_pretrained(run / "final")  # final/ is a plain transformers directory
    step = run / "checkpoints" / "step-1"
    assert sorted(p.name for p in step.iterdir()) == [
        "manifest.json", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "rng.pt", "scheduler.pt",
        "state.json", "trainable-rank0.safetensors", "trainable-rank1.safetensors"]


@pytest.mark.multiprocess
def test_fsdp_checkpoints_are_shards_that_make_up_the_weights(two_ranks):
    """Each rank's file holds its slice of every weight; the slices, stacked, are the checkpoint's step."""
    import torch
    from safetensors.torch import load_file

    step = two_ranks["fsdp"] / "checkpoints" / f"step-{STEPS}"
    shards = [load_file(step / f"trainable-rank{r}.safetensors") for r in range(2)]
    final = weights(two_ranks["fsdp"])
    for name, full in final.items():
        assert shards[0][name].shape[0] == (full.shape[0] + 1) // 2  # dim-0 halves, rank 0 the larger
        assert torch.equal(torch.cat([shards[0][name], shards[1][name]]), full), name


@pytest.mark.multiprocess
def test_fsdp_resumes_from_sharded_checkpoint_exactly(two_ranks):
    assert_same_weights(weights(two_ranks["fsdp-resumed"]), weights(two_ranks["fsdp"]), atol=0)
    from tiltlm.metrics import read_metrics

    resumed = read_metrics(two_ranks["fsdp-resumed"] / "metrics.jsonl")
    straight = read_metrics(two_ranks["fsdp"] / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # the cut-off step 4 logged once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert "resumed from" in two_ranks["log"].read_text()


@pytest.mark.multiprocess
def test_fsdp_mixed_precision_keeps_float32_master_weights(two_ranks, single):
    import torch

    bf16 = weights(two_ranks["fsdp-bf16"])
    assert {t.dtype for t in bf16.values()} == {torch.float32}
    rows = [json.loads(line) for line in (two_ranks["fsdp-bf16"] / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (single["batch2x2"] / "metrics.jsonl").read_text().splitlines()]
    # bfloat16 compute: close to the float32 run's first two steps, and not equal (float32 sharded runs
    # agree to ~1e-6; bfloat16 layers move the log-probs by ~1e-4 or more)
    for row, reference in zip(rows, want[:2]):
        assert row["loss"] == pytest.approx(reference["loss"], abs=2e-2)
        assert row["logps/chosen"] == pytest.approx(reference["logps/chosen"], rel=2e-2)
    assert abs(rows[0]["logps/chosen"] - want[0]["logps/chosen"]) > 5e-5


# --- resharding checkpoints and final/ shard by shard ---------------------------------------------------


def refuse_unrestricted_unpickling(monkeypatch) -> None:
    """From here on, any unpickling but torch.load's ``weights_only`` one (its own unpickler) fails."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a file was unpickled without restriction")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


class RunsCode:
    """Unpickling this runs Python code (it creates ``marker``): a malicious file's payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.multiprocess
def test_a_sharded_checkpoint_resumes_in_one_process(two_ranks, single, tmp_path, monkeypatch):
    """2 ranks wrote step 3; one process finishes the run (4 pairs a step as 2 x 2) and reaches the
    weights of the uninterrupted 2-rank run, with no file unpickled on the way but by weights_only."""
    from tiltlm.cli import main

    run = tmp_path / "run"
    interrupted_copy(two_ranks["fsdp"], run, CUT)
    refuse_unrestricted_unpickling(monkeypatch)
    assert main(["train", "--config", str(two_ranks["fsdp"] / "config.yaml"), "--resume", str(run),
                 "--batch-size", "2", "--grad-accum", "2"]) == 0
    assert_same_weights(weights(run), weights(two_ranks["fsdp"]), atol=1e-5)
    assert_same_metrics(run, single["batch2x2"])
    assert (run / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors").is_file()  # one process's layout


@pytest.mark.multiprocess
def test_a_one_process_checkpoint_resumes_sharded(two_ranks, single):
    run = two_ranks["fsdp-from-one"]
    assert f"resumed from {run / 'checkpoints' / f'step-{CUT}'}" in two_ranks["log"].read_text()
    assert_same_weights(weights(run), weights(single["batch2x2"]), atol=1e-5)
    assert_same_metrics(run, single["batch2x2"])
    assert (run / "checkpoints" / f"step-{STEPS}" / "trainable-rank1.safetensors").is_file()  # sharded from then on


@pytest.mark.multiprocess
def test_a_resume_that_changes_the_pairs_of_a_step_is_refused(two_ranks, tmp_path):
    from tiltlm.cli import main

    run = tmp_path / "run"
    interrupted_copy(two_ranks["fsdp"], run, CUT)
    before = (run / "metrics.jsonl").read_text()
    # one process with the 2-rank run's batch 1 x 2 would take 2 pairs a step, not 4: the data would shift
    assert main(["train", "--config", str(two_ranks["fsdp"] / "config.yaml"), "--resume", str(run)]) == 2
    assert (run / "metrics.jsonl").read_text() == before and not (run / "final").exists()


@pytest.mark.multiprocess
def test_a_sharded_checkpoint_is_never_unpickled(two_ranks, tmp_path, monkeypatch, tiny_model_dir):
    """DCP's default FileSystemReader unpickles a ``.metadata`` file without restriction; the checkpoint
    reader reads the layout from the safetensors headers. Given a malicious ``.metadata`` (listed in the
    manifest), a sharded checkpoint loads into one process and the payload never runs; each weight and
    AdamW moment is its ranks' slices put together."""
    import pickle

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    from tiltlm import checkpoint as ckpt
    from tiltlm import distributed
    from tiltlm.train import param_groups

    checkpoint = tmp_path / f"step-{CUT}"
    shutil.copytree(two_ranks["fsdp"] / "checkpoints" / f"step-{CUT}", checkpoint)
    marker = tmp_path / "payload-ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest[".metadata"] = ckpt.sha256(checkpoint / ".metadata")
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    refuse_unrestricted_unpickling(monkeypatch)
    with pytest.raises(AssertionError, match="unpickled"):  # the guard catches DCP's default way in
        FileSystemReader(str(checkpoint)).read_metadata()
    assert distributed.load_checkpoint(checkpoint, model, optimizer, scheduler).step == CUT
    assert not marker.exists()
    trainables, moments = ([load_file(checkpoint / f"{kind}-rank{r}.safetensors") for r in range(2)]
                         for kind in ("trainable", "optimizer"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.cat([trainables[0][name], trainables[1][name]])), name
        for key in ("exp_avg", "exp_avg_sq"):
            whole = torch.cat([moments[0][f"{name}.{key}"], moments[1][f"{name}.{key}"]])
            assert torch.equal(optimizer.state[p][key], whole), (name, key)
        assert optimizer.state[p]["step"].item() == CUT


@pytest.mark.multiprocess
def test_a_sharded_checkpoint_of_another_shape_is_refused(two_ranks, tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiltlm import checkpoint as ckpt
    from tiltlm import distributed

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size += 16  # the same names, wider MLPs
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ckpt.CheckpointError, match=r"mlp\.\w+_proj\.weight.* fits no trainable weight"):
        distributed.load_checkpoint(two_ranks["fsdp"] / "checkpoints" / f"step-{CUT}", model, optimizer, scheduler)


@pytest.mark.multiprocess
def test_fsdp_final_is_written_in_shards_plain_transformers_loads(two_ranks, single):
    """final/ of the sharded run: Hugging Face's sharded layout (files of at most SHARD_BYTES, an index),
    beside the same config, generation config and tokenizer as the one-process save_pretrained; it loads
    with plain from_pretrained and holds the one-process run's weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final, reference = two_ranks["fsdp"] / "final", single["batch2x2"] / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert sorted(p.name for p in final.glob("*.safetensors")) == files
    for file in files:
        tensors = load_file(final / file)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= SHARD_BYTES
        assert {index["weight_map"][name] for name in tensors} == {file}
    others = lambda d: sorted(p.name for p in d.iterdir() if "safetensors" not in p.name)  # noqa: E731
    assert others(final) == others(reference)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((final / name).read_text()) == json.loads((reference / name).read_text()), name
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert loaded.dtype == torch.float32
    assert_same_weights(loaded.state_dict(), AutoModelForCausalLM.from_pretrained(reference).state_dict(), atol=1e-6)


@pytest.mark.multiprocess
def test_fsdp_final_keeps_the_starting_dtype(two_ranks, single):
    """From a bfloat16-saved model, final/ is bfloat16 like the one-process run's: float32 master weights
    agreeing to ~1e-6 round to the same bfloat16 value, or to its neighbour at a rounding boundary."""
    import torch

    run, reference = two_ranks["fsdp-bf16-start"], single["bf16-start"]
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    mine, theirs = weights(run), weights(reference)
    assert mine.keys() == theirs.keys() and {t.dtype for t in mine.values()} == {torch.bfloat16}
    for name in mine:
        torch.testing.assert_close(mine[name].float(), theirs[name].float(), rtol=2 ** -7, atol=0, msg=name)


@pytest.mark.parametrize("setting, message", [
    (["parallel=fdsp"], "parallel = 'fdsp': expected ddp or fsdp"),
    (["parallel=fsdp", "--lora-r", "4", "--merge-lora"], "parallel = fsdp with merge_lora"),
])
def test_settings_fsdp_cannot_run_are_refused_before_anything_is_written(inputs, tmp_path, capsys, setting, message):
    from tiltlm.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", inputs["model"], "--data", inputs["data"], "--output", str(out), *setting]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# --- two nodes over loopback -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.multiprocess
def test_two_nodes_rendezvous_over_loopback(tmp_path, inputs, single):
    """Two torchrun agents, one process each, meet at a c10d rendezvous on 127.0.0.1 as two nodes would;
    the job trains as the 2-process DDP run does (2 accumulation steps of 1 pair a rank here)."""
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    train = ["-m", "tiltlm.cli", "train", "--model", inputs["model"], "--data", inputs["data"], "--output", str(out),
             *COMMON, "--batch-size", "1", "--grad-accum", "2"]
    nodes = [launch([*torchrun(), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "tiltlm-test",
                     "--local-addr", "127.0.0.1", *train], cwd=tmp_path) for rank in (0, 1)]
    outputs = [check_finished(node, f"node {rank}") for rank, node in enumerate(nodes)]
    assert "processes: 2" in "".join(outputs)
    assert_same_weights(weights(out), weights(single["batch2x2"]), atol=1e-6)
    assert_same_metrics(out, single["batch2x2"])


# --- the script torchrun runs --------------------------------------------------------------------------


def read_only_view(directory: str, marker: str) -> None:
    """Make ``directory`` read-only for this process alone: a private mount namespace in which it is
    bind-mounted onto itself read-only (Linux, root). Must run before any thread starts (unshare)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() != 0 or libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return
    for command in (["mount", "--make-rprivate", "/"], ["mount", "--bind", directory, directory],
                    ["mount", "-o", "remount,bind,ro", directory]):
        try:
            if subprocess.run(command, capture_output=True).returncode != 0:
                return
        except OSError:  # no mount(8)
            return
    Path(marker).write_text(directory)


def sigterm_after_step(step: int) -> None:
    """Send this process SIGTERM at the end of optimizer step ``step``, as a preemption notice
    reaching one rank only would arrive (for one run: the patch undoes itself)."""
    import importlib

    collectives = importlib.import_module("tiltlm.collectives")
    real = collectives.any_rank
    calls = []

    def any_rank(flag):  # the loop asks once per step whether any rank was told to stop
        calls.append(flag)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs now; the loop sees it next step
            collectives.any_rank = real
        return real(flag)

    collectives.any_rank = any_rank


def driver(plan_file: str) -> int:
    """Run a plan's steps on every rank: ``run`` a CLI command, or ``cut`` a run back to a checkpoint
    (rank 0 copies, the others wait at a barrier). One process group serves every step: the runs use
    the group they find and leave it be (creating a second gloo group in one process can race with
    the first's addresses in the rendezvous store)."""
    plan = json.loads(Path(plan_file).read_text())
    if int(os.environ["RANK"]) != 0:
        read_only_view(plan["read_only"], plan["isolated_marker"])
    import gc
    import importlib

    import torch.distributed as dist

    from tiltlm.cli import main

    dist.init_process_group("gloo")
    try:
        for kind, *args in plan["steps"]:
            if kind == "shard-bytes":  # a smaller file size for final/ under FSDP, in this process
                importlib.import_module("tiltlm.checkpoint").SHARD_BYTES = int(args[0])
            elif kind in ("run", "preempt"):
                if kind == "preempt":  # args: the rank that gets SIGTERM, after which step, the command
                    rank, after, *args = args
                    if dist.get_rank() == int(rank):
                        sigterm_after_step(int(after))
                code = main(args)
                if code != 0:
                    return code
            else:
                if dist.get_rank() == 0:
                    interrupted_copy(Path(args[0]), Path(args[1]), int(args[2]))
                dist.barrier()
        gc.collect()  # the runs' sharded modules (in cycles) freed while the group and the interpreter live
        dist.barrier()  # both ranks done with every collective before the group is torn down
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(driver(sys.argv[1]))
