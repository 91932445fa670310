"""tiltlm: Direct Preference Optimization for Hugging Face causal language models.

The policy DPO trains is the reference, tilted: pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x).

Python API::

    from tiltlm import TrainConfig, train, evaluate, dpo_loss, sequence_logps

    out = train(TrainConfig(model="smollm2-135m", data="pairs.jsonl", output="runs/x", lora_r=16, lr=5e-5))
    metrics = evaluate(f"{out}/final", "heldout.jsonl")          # loss, rewards, accuracy vs. the base
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
"""

from tiltlm.config import TrainConfig
from tiltlm.evaluate import evaluate
from tiltlm.logprobs import sequence_logps
from tiltlm.losses import dpo_loss
from tiltlm.train import train

__all__ = ["TrainConfig", "train", "evaluate", "dpo_loss", "sequence_logps"]
__version__ = "0.1.0"
