"""LoRA, evaluation and the precomputed reference under FSDP (2 gloo ranks) against one process.

One ``torchrun`` launch of test_distributed.py's driver runs every sharded training (2 steps each, 1 pair
x 2 accumulation steps a rank); the one-process runs (2 pairs x 2) run in this process. Each run keeps
its reference tables in a cache directory of its own, so every table compared below was computed by the
run that owns it. The eval set has 9 pairs: with 1 pair a batch rank 0 evaluates 5 and rank 1 4, and with
the reference pass's 4 a batch rank 0 scores 2 batches and rank 1 one, so both pad.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distributed import COMMON, SLACK, check_finished, launch, torchrun

pytestmark = pytest.mark.multiprocess

DRIVER = Path(__file__).with_name("test_distributed.py")
SHORT = ["--max-steps", "2", "--save-every", "100"]  # 2 steps: one epoch, so auto picks precompute


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """``one``/``one-lora`` in this process; ``fsdp`` (auto), ``fsdp-online``, ``fsdp-ref`` (``--ref``
    the same weights), ``fsdp-lora`` (auto) and ``fsdp-lora-off`` (adapters-off) under torchrun. The LoRA
    runs evaluate the 9-pair set after every step."""
    from conftest import PAIRS

    from tiltlm.cli import main

    base = tmp_path_factory.mktemp("fsdp-features")
    data, evals = base / "pairs.jsonl", base / "eval.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    evals.write_text("".join(json.dumps(p) + "\n" for p in PAIRS + PAIRS[:1]))
    train = ["train", "--model", str(tiny_model_dir), "--data", str(data), *COMMON, *SHORT]
    lora = ["--lora-r", "4", "--eval-data", str(evals), "--eval-every", "1"]
    settings = {"fsdp": [], "fsdp-online": ["--ref-mode", "online"], "fsdp-ref": ["--ref", str(tiny_model_dir)],
                "fsdp-lora": lora, "fsdp-lora-off": [*lora, "--ref-mode", "adapters-off"],
                "fsdp-offload": ["--cpu-offload"]}

    def command(name: str, extra: list[str], shape: list[str]) -> list[str]:
        return [*train, "--output", str(base / name), "--ref-cache", str(base / name / "cache"), *extra, *shape]

    for name, extra in (("one", []), ("one-lora", lora)):
        assert main(command(name, extra, ["--batch-size", "2", "--grad-accum", "2"])) == 0
    plan = {"read_only": str(base / "none"), "isolated_marker": str(base / "unused"),
            "steps": [["run", *command(name, extra, ["--batch-size", "1", "--grad-accum", "2", "parallel=fsdp"])]
                      for name, extra in settings.items()]}
    (base / "plan.json").write_text(json.dumps(plan))
    (base / "none").mkdir()
    process = launch([*torchrun(), "--standalone", "--nproc-per-node", "2", str(DRIVER), str(base / "plan.json")],
                     cwd=base)
    (base / "log.txt").write_text(check_finished(process, "torchrun --nproc-per-node 2"))
    return {name: base / name for name in ("one", "one-lora", *settings)}


def tables(run: Path) -> dict[str, "torch.Tensor"]:
    """The reference tables the run computed, by cache file name (the fingerprint of what they hold)."""
    from safetensors.torch import load_file

    return {path.name: load_file(path)["reference"] for path in sorted((run / "cache").glob("*.safetensors"))}


def assert_same_rows(run: Path, expected: Path) -> None:
    """Every metrics row (training and eval) equal to one process's, to float32 summation order."""
    from tiltlm.metrics import read_metrics

    rows, want = read_metrics(run / "metrics.jsonl"), read_metrics(expected / "metrics.jsonl")
    assert [sorted(r) for r in rows] == [sorted(w) for w in want] and rows
    for row, reference in zip(rows, want):
        for key, value in reference.items():
            if key != "tokens_per_second":
                slack = SLACK.get(key.removeprefix("eval/"), 1e-6)
                assert row[key] == pytest.approx(value, rel=1e-6, abs=slack), (row["step"], key)


def test_auto_precomputes_under_fsdp_the_table_one_process_computes(runs):
    import torch

    one, sharded = tables(runs["one"]), tables(runs["fsdp"])
    # auto picked precompute: the sharded run wrote a table into its own cache, under the fingerprint of
    # the same weights in one process (the sharded weights are fingerprinted as their gathered whole)
    assert len(sharded) == 1 and sharded.keys() == one.keys()
    for name, table in one.items():
        torch.testing.assert_close(sharded[name], table, rtol=1e-6, atol=1e-6)
    assert_same_rows(runs["fsdp"], runs["one"])


def test_precomputed_reference_under_fsdp_trains_as_the_online_one(runs):
    assert not tables(runs["fsdp-online"])  # online: no table
    assert_same_rows(runs["fsdp-online"], runs["fsdp"])


def test_a_separate_reference_is_sharded_scored_and_gives_the_same_table(runs):
    import torch

    separate, own = tables(runs["fsdp-ref"]), tables(runs["fsdp"])
    assert separate.keys() == own.keys()  # the same weights loaded again: the same fingerprint
    for name, table in own.items():
        torch.testing.assert_close(separate[name], table, rtol=1e-6, atol=1e-6)
    assert_same_rows(runs["fsdp-ref"], runs["fsdp"])


@pytest.mark.parametrize("name", ["fsdp-lora", "fsdp-lora-off"])
def test_lora_under_fsdp_trains_and_evaluates_as_one_process(runs, name):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from tiltlm.models import load_model

    adapter = load_file(runs[name] / "final" / "adapter_model.safetensors")
    expected = load_file(runs["one-lora"] / "final" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(adapter[key], value, rtol=0, atol=1e-6, msg=key)
    assert any("lora_B" in key and value.abs().max() > 1e-4 for key, value in adapter.items())  # it trained
    assert isinstance(load_model(str(runs[name] / "final")), PeftModel)
    assert_same_rows(runs[name], runs["one-lora"])  # the eval rows (eval/...) too
    if name == "fsdp-lora":  # the base's table, from the sharded policy with its adapters off
        one, sharded = tables(runs["one-lora"]), tables(runs[name])
        assert len(sharded) == 2 and sharded.keys() == one.keys()  # train and eval sets
        for key, table in one.items():
            torch.testing.assert_close(sharded[key], table, rtol=1e-6, atol=1e-6)


def test_a_separate_sharded_reference_is_freed_once_its_table_is_computed(tmp_path, monkeypatch):
    """``--ref`` under FSDP (one rank): the model is loaded, sharded, scores, and is gone after ``prepare``."""
    import gc
    import weakref

    import torch
    import torch.distributed as dist

    from tiltlm import distributed
    from tiltlm.data.collate import collate_shared
    from tiltlm.data.types import TokenizedPair
    from tiltlm.models import tiny_llama
    from tiltlm.reference import PrecomputedReference
    from tiltlm.runtime import Precision, start
    from test_distributed import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        runtime, loaded = start("cpu"), []

        def load():
            model = tiny_llama(vocab_size=16, seed=1)
            loaded.append(weakref.ref(model))
            return model

        class Tokenizer:  # what the fingerprint reads
            backend_tokenizer = None

            def get_vocab(self):
                return {"a": 1}

        reference = PrecomputedReference(Tokenizer(), Precision(torch.device("cpu")), 16, 4, str(tmp_path),
                                         load=load, wrap=lambda scorer: distributed.shard(scorer, runtime),
                                         log=lambda message: None)
        pairs = [TokenizedPair([1, 2, 3], [4, 5, 9], [6, 7]), TokenizedPair([3, 1], [8], [5, 5, 2])]
        gc.disable()  # no collection by chance: what frees the model must be prepare's doing
        try:
            reference.prepare(None, {"train": pairs}, lambda rows: collate_shared(rows, 0))
            assert loaded[0]() is None
        finally:
            gc.enable()
        assert reference.tables["train"](collate_shared(pairs, 0), [0, 1])[0].shape == (4,)
    finally:
        dist.destroy_process_group()


def test_cpu_offload_trains_as_the_shards_kept_on_the_device(runs):
    """On CPU the offloaded shards live where they would anyway, so this checks the wiring (FSDP's
    CPUOffloadPolicy on every unit, the optimizer stepping host tensors): the same rows and weights."""
    import torch
    from safetensors.torch import load_file

    assert_same_rows(runs["fsdp-offload"], runs["fsdp"])
    offloaded, kept = (load_file(runs[name] / "final" / "model.safetensors") for name in ("fsdp-offload", "fsdp"))
    assert offloaded.keys() == kept.keys()
    for key, value in kept.items():
        torch.testing.assert_close(offloaded[key], value, rtol=0, atol=1e-7, msg=key)
