"""The precomputed reference: equal to the online one, read back from disk without a forward pass,
recomputed when anything it depends on changes, stored as plain safetensors, computed once across ranks."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tiltlm.data import load_pairs, tokenize_pairs
from tiltlm.data.collate import collate_concatenated, collate_shared
from tiltlm.logprobs import naive_sequence_logps
from tiltlm.models import load_model, load_tokenizer
from tiltlm.refcache import (cached_reference_table, default_cache_dir, lookup_reference,
                             precompute_reference)
from tiltlm.reference import OnlineReference
from tiltlm.runtime import Precision


def online_reference(model, chunk_size):
    """The online reference strategy of ``model`` as a plain scorer ``batch -> (logps, counts)``."""
    reference = OnlineReference(lambda: model, Precision(torch.device("cpu")), chunk_size)
    reference.prepare(model, {}, None)
    return lambda batch: reference(batch, "data")


def packed(tokenizer):
    return lambda pairs: collate_shared(pairs, tokenizer.pad_token_id, row_tokens=64)


class ForwardCounter:
    """Counts the reference's transformer forwards (a hook on its decoder, which every scorer calls)."""

    def __init__(self, model):
        self.calls = 0
        model.get_decoder().register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


@pytest.fixture
def setup(tiny_model_dir, pairs_file):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    pairs, _ = tokenize_pairs(load_pairs(str(pairs_file)), tokenizer, 64, 32)
    return model, tokenizer, pairs


def table_of(model, tokenizer, pairs, cache_dir, batch_size=3):
    counter = ForwardCounter(model)
    table, path, hit = cached_reference_table(model, tokenizer, pairs, packed(tokenizer), batch_size,
                                              cache_dir=cache_dir, progress=False)
    return table, path, hit, counter.calls


def test_cached_values_equal_online_reference(setup, tmp_path):
    model, tokenizer, pairs = setup
    table, _, hit, _ = table_of(model, tokenizer, pairs, tmp_path)
    assert not hit
    lookup = lookup_reference(table)
    online = online_reference(copy.deepcopy(model), chunk_size=4)
    # the online reference on training-sized batches in another layout, against the table's rows
    for indices in ([0, 1], [5, 2, 7], [3, 4, 6]):
        batch = collate_concatenated([pairs[i] for i in indices], tokenizer.pad_token_id)
        expected_logps, expected_counts = online(batch)
        logps, counts = lookup(batch, indices)
        torch.testing.assert_close(logps, expected_logps, rtol=1e-6, atol=1e-6)
        assert counts.tolist() == expected_counts.tolist()
    # and the whole table against the textbook path (full logits, one concatenated batch)
    with torch.no_grad():
        naive, _ = naive_sequence_logps(model, collate_concatenated(pairs, tokenizer.pad_token_id))
    n = len(pairs)
    torch.testing.assert_close(table[:, 0], naive[:n], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(table[:, 1], naive[n:], rtol=1e-6, atol=1e-5)
    assert table[:, 2].tolist() == [len(p.chosen_ids) for p in pairs]
    assert table[:, 3].tolist() == [len(p.rejected_ids) for p in pairs]


def test_lookup_reads_indices_from_the_batch(setup, tmp_path):
    model, tokenizer, pairs = setup
    table, _, _, _ = table_of(model, tokenizer, pairs, tmp_path)
    lookup = lookup_reference(table)
    batch = collate_shared([pairs[6], pairs[1]], tokenizer.pad_token_id)
    batch.indices = (6, 1)  # what the training loop will set (Batch.indices)
    logps, counts = lookup(batch)
    assert logps.tolist() == [table[6, 0].item(), table[1, 0].item(), table[6, 1].item(), table[1, 1].item()]
    assert counts.tolist() == [len(pairs[6].chosen_ids), len(pairs[1].chosen_ids),
                               len(pairs[6].rejected_ids), len(pairs[1].rejected_ids)]
    del batch.indices
    with pytest.raises(ValueError, match="Batch.indices"):
        lookup(batch)


def test_second_call_hits_the_cache_without_a_forward(setup, tmp_path, tiny_model_dir):
    model, tokenizer, pairs = setup
    first, path, hit, calls = table_of(model, tokenizer, pairs, tmp_path)
    assert not hit and calls > 0 and path.is_file()
    second, path2, hit, calls = table_of(model, tokenizer, pairs, tmp_path)
    assert hit and calls == 0 and path2 == path
    assert torch.equal(first, second)
    # a model loaded afresh from the same directory has the same fingerprint
    _, _, hit, calls = table_of(load_model(str(tiny_model_dir)), tokenizer, pairs, tmp_path)
    assert hit and calls == 0


def expect_recompute(model, tokenizer, pairs, cache_dir, old_path):
    _, path, hit, calls = table_of(model, tokenizer, pairs, cache_dir)
    assert not hit and calls > 0 and path != old_path


def test_changed_weights_recompute(setup, tmp_path):
    model, tokenizer, pairs = setup
    _, path, _, _ = table_of(model, tokenizer, pairs, tmp_path)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    expect_recompute(model, tokenizer, pairs, tmp_path, path)


def test_changed_tokenizer_recomputes(setup, tmp_path, pairs_file):
    model, tokenizer, pairs = setup
    _, path, _, _ = table_of(model, tokenizer, pairs, tmp_path)
    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    # the token ids of these pairs do not change: only the tokenizer's own fingerprint can see this
    raw = load_pairs(str(pairs_file))
    assert [p.chosen_ids for p in tokenize_pairs(raw, other, 64, 32)[0]] == [p.chosen_ids for p in pairs]
    expect_recompute(model, other, pairs, tmp_path, path)


def test_changed_data_recomputes(setup, tmp_path, pairs_file):
    model, tokenizer, pairs = setup
    _, path, _, _ = table_of(model, tokenizer, pairs, tmp_path)
    raw = load_pairs(str(pairs_file))
    raw[3].chosen = raw[3].chosen + " Indeed."
    edited, _ = tokenize_pairs(raw, tokenizer, 64, 32)
    expect_recompute(model, tokenizer, edited, tmp_path, path)
    expect_recompute(model, tokenizer, pairs[:-1], tmp_path, path)  # one pair fewer


def test_changed_max_length_recomputes(setup, tmp_path, pairs_file):
    model, tokenizer, pairs = setup
    _, path, _, _ = table_of(model, tokenizer, pairs, tmp_path)
    shorter, _ = tokenize_pairs(load_pairs(str(pairs_file)), tokenizer, 12, 6)
    assert any(p.truncated for p in shorter)
    expect_recompute(model, tokenizer, shorter, tmp_path, path)
    table, _, _, _ = table_of(model, tokenizer, shorter, tmp_path)
    assert table[:, 2].tolist() == [len(p.chosen_ids) for p in shorter]


def test_cache_file_is_plain_safetensors(setup, tmp_path):
    model, tokenizer, pairs = setup
    cache = tmp_path / "cache"
    table, path, _, _ = table_of(model, tokenizer, pairs, cache)
    assert path.suffix == ".safetensors" and path.parent == cache
    loaded = load_file(str(path))
    assert list(loaded) == ["reference"]
    assert loaded["reference"].dtype == torch.float32 and loaded["reference"].shape == (len(pairs), 4)
    assert torch.equal(loaded["reference"], table)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "tiltlm-reference-v1"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind


def test_damaged_cache_file_is_recomputed(setup, tmp_path):
    model, tokenizer, pairs = setup
    table, path, _, _ = table_of(model, tokenizer, pairs, tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    again, _, hit, calls = table_of(model, tokenizer, pairs, tmp_path)
    assert not hit and calls > 0
    assert torch.equal(again, table)


def test_cache_directory_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TILTLM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "reference"
    monkeypatch.delenv("TILTLM_CACHE")
    assert str(default_cache_dir()) == os.path.expanduser("~/.cache/tiltlm/reference")


# --- two processes (gloo) ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir)
        pairs, _ = tokenize_pairs(load_pairs(data), tokenizer, 64, 32)
        scored = []

        def scorer(batch, inner=online_reference(model, 1024)):
            scored.append(batch.num_pairs)
            return inner(batch)

        collate = packed(tokenizer)
        table, path, hit = cached_reference_table(model, tokenizer, pairs, collate, 3, cache_dir=out,
                                                  progress=False, scorer=scorer)
        torch.save({"table": table, "scored": sum(scored), "hit": hit, "path": str(path)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_score_each_pair_once(tiny_model_dir, pairs_file, tmp_path):
    import torch.multiprocessing as mp

    cache = tmp_path / "cache"
    cache.mkdir()
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tiny_model_dir), str(pairs_file), str(cache)),
             nprocs=world, join=True)
    results = [torch.load(cache / f"rank{r}.pt") for r in range(world)]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = tokenize_pairs(load_pairs(str(pairs_file)), tokenizer, 64, 32)
    assert sum(r["scored"] for r in results) == len(pairs)  # each pair once, across the ranks
    assert all(r["scored"] > 0 for r in results)  # both ranks worked
    single = precompute_reference(online_reference(load_model(str(tiny_model_dir)), 1024), pairs,
                                  packed(tokenizer), 3, progress=False)
    for r in results:
        assert not r["hit"]
        torch.testing.assert_close(r["table"], single, rtol=1e-6, atol=1e-6)
    # the file rank 0 wrote is what a later single-process run reads
    model = load_model(str(tiny_model_dir))
    table, path, hit, calls = table_of(model, tokenizer, pairs, cache)
    assert hit and calls == 0 and str(path) == results[0]["path"]
