"""FSDP gradient accumulation keeps only sharded gradients between micro-batches (two gloo ranks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

WORKER = r'''
import sys
import torch
from torch.distributed.tensor import DTensor
from tiltlm import collectives, distributed
from tiltlm.data.collate import collate_shared
from tiltlm.data.types import TokenizedPair
from tiltlm.logprobs import CompletionLogps
from tiltlm.models import tiny_llama
from tiltlm.runtime import start, stop

def fsdp_params(module):
    return [p for m in module.modules() if hasattr(m, "_get_fsdp_state")
            for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None for p in group.fsdp_params]

runtime = start("cpu")
sync_off = sys.argv[1] == "sync-off"  # the old way: FSDP's gradient sync turned off between micro-batches
pairs = [TokenizedPair([1, 2, 3], [4, 5, 9], [6, 7]), TokenizedPair([3, 1], [8], [5, 5, 2]),
         TokenizedPair([2, 2, 4, 1], [7, 3], [9]), TokenizedPair([5], [1, 2], [3, 4, 6])]
micro_batches = [pairs[:2], pairs[2:]] if runtime.rank == 0 else [pairs[2:], pairs[:2]]
reference = tiny_llama(vocab_size=16, seed=1)
scorer = distributed.wrap(CompletionLogps(tiny_llama(vocab_size=16, seed=1)), "fsdp", runtime, torch.float32)
for i, micro in enumerate(micro_batches):
    if sync_off:
        scorer.set_requires_gradient_sync(i == len(micro_batches) - 1)
    with distributed.accumulating(scorer, i < len(micro_batches) - 1):
        scorer(collate_shared(micro, 0))[0].sum().backward()
    if i == 0:
        unsharded = sum(p.unsharded_accumulated_grad is not None
                        or getattr(getattr(p, "_unsharded_param", None), "grad", None) is not None
                        for p in fsdp_params(scorer))
        sharded = all(isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape
                      for p in scorer.parameters())
        print(f"between micro-batches: {unsharded} unsharded gradients, all sharded: {sharded}")
# one process, the same four pairs as both ranks together saw them (each pair twice)
for micro in micro_batches * 2:
    CompletionLogps(reference)(collate_shared(micro, 0))[0].sum().backward()
expected = dict(reference.named_parameters())
worst = max((p.grad.full_tensor() - expected[name.removeprefix("model.")].grad / 2).abs().max().item()
            for name, p in scorer.named_parameters())
print(f"largest gradient difference from one process: {worst:.3g}")
collectives.barrier()  # both ranks done before the group is torn down (gloo aborts a process left in one)
stop(runtime)
'''


def run_worker(tmp_path: Path, mode: str) -> str:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), mode],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_fsdp_accumulates_sharded_gradients_only(tmp_path):
    out = run_worker(tmp_path, "sync-on")
    assert "between micro-batches: 0 unsharded gradients, all sharded: True" in out
    worst = float(out.split("largest gradient difference from one process: ")[1].split()[0])
    assert worst < 1e-6
    # the inspection can see what it looks for: FSDP with its sync off keeps an unsharded gradient per parameter
    assert "between micro-batches: 0 unsharded" not in run_worker(tmp_path, "sync-off")
