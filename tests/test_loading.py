"""Loading once under FSDP (two gloo ranks): the same shards, buffers, ties and logits as loading the whole
model on every rank and sharding it, with about half the weights' memory on the rank that does not read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

# Each rank writes its local shards, buffers, logits and memory figures; ``new`` loads with load_sharded,
# ``old`` loads the whole model on every rank and shards it (what train did before).
WORKER = r'''
import json, sys
import torch
import torch.distributed.checkpoint.state_dict, torch.distributed.fsdp, transformers.models.llama.modeling_llama
from safetensors.torch import save_file
from tiltlm import collectives, distributed
from tiltlm.loading import load_sharded
from tiltlm.logprobs import CompletionLogps
from tiltlm.models import load_model
from tiltlm.runtime import lost_update_fraction, start, stop

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024  # kB

runtime = start("cpu")
model_dir, mode, out = sys.argv[1:4]
before = status("VmRSS")  # the libraries either path uses are imported: what grows from here is tensors
collectives.barrier()
shard = lambda model: distributed.shard(CompletionLogps(model), runtime)
if mode == "new":
    scorer = load_sharded(lambda: load_model(model_dir), shard, runtime.device)
else:
    scorer = shard(load_model(model_dir))
peak = status("VmHWM")
model = scorer.model
tensors = {"param." + n: p.to_local().clone() for n, p in model.named_parameters()}
tensors.update({"buffer." + n: b.clone() for n, b in model.named_buffers()})
scorer.unshard()  # the root's weights (embeddings, head); each layer gathers its own
with torch.no_grad():
    tensors["logits"] = model(torch.arange(40).reshape(2, 20) % 97).logits
scorer.reshard()
save_file(tensors, f"{out}/{mode}-rank{runtime.rank}.safetensors")
facts = {"before": before, "peak": peak, "tied": model.lm_head.weight is model.model.embed_tokens.weight,
         "meta": any(t.is_meta for t in list(model.parameters()) + list(model.buffers())),
         "lost": lost_update_fraction(model.parameters(), 1e-3)}  # train's bf16 warning, from the shards
open(f"{out}/{mode}-rank{runtime.rank}.json", "w").write(json.dumps(facts))
collectives.barrier()
stop(runtime)
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random ~20M-parameter Llama with a tied head (as SmolLM2) and grouped-query attention, saved as
    safetensors; a small vocabulary, so that no one tensor is a large part of the weights."""
    from tiltlm.models import tiny_llama

    directory = tmp_path_factory.mktemp("model")
    tiny_llama(vocab_size=4096, hidden_size=384, layers=9, heads=6, kv_heads=2, intermediate_size=1536,
               tie=True).save_pretrained(directory)
    return directory


def launch(model_dir: Path, mode: str, out: Path) -> list[dict]:
    script = out / "worker.py"
    script.write_text(WORKER)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(model_dir), mode,
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"{mode}-rank{rank}.json").read_text()) for rank in range(2)]


def test_loading_once_gives_the_old_shards_with_half_the_memory(model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tiltlm.runtime import lost_update_fraction

    old, new = launch(model_dir, "old", tmp_path), launch(model_dir, "new", tmp_path)
    whole = load_file(model_dir / "model.safetensors")
    for rank in range(2):
        expected = load_file(tmp_path / f"old-rank{rank}.safetensors")
        got = load_file(tmp_path / f"new-rank{rank}.safetensors")
        assert got.keys() == expected.keys()
        assert any(name.endswith("rotary_emb.inv_freq") for name in got)  # a buffer no checkpoint holds
        for name in expected:
            assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), (rank, name)
        assert new[rank]["tied"] and old[rank]["tied"] and not new[rank]["meta"]
        assert new[rank]["lost"] == old[rank]["lost"] == lost_update_fraction(whole.values(), 1e-3)
    weights = sum(t.numel() * t.element_size() for t in whole.values())
    grown = {mode: [r["peak"] - r["before"] for r in runs] for mode, runs in (("old", old), ("new", new))}
    print(f"weights {weights / 2**20:.0f} MB; peak growth per rank (MB): "
          + ", ".join(f"{mode} {[round(g / 2**20) for g in growth]}" for mode, growth in grown.items()))
    # Loading the whole model, each rank held all the weights. Loading once, the rank that does not read
    # holds its half and, while they arrive, one whole tensor (at most the largest) and its slice; a fifth
    # of the weights is left for the allocator. Rank 0 still holds the whole model while it loads.
    largest = max(t.numel() * t.element_size() for t in whole.values())
    assert grown["old"][1] >= weights
    assert grown["new"][1] <= weights / 2 + 2 * largest + weights / 5
