"""The ``tiltlm`` commands, one module each (``tiltlm.commands.NAME``), with ``add_arguments(parser)`` and
``run(args) -> int``.

Commands turn flags into library calls and print; the library never imports them.
"""

# (name, one-line summary), in the order ``tiltlm --help`` lists them
COMMANDS = (
    ("train", "train a policy on preference pairs"),
    ("eval", "loss and reward metrics of a policy against a reference"),
    ("reward", "train or evaluate a Bradley-Terry reward model"),
    ("plan", "will a run fit? peak memory per device and FLOPs per step, traced on fake tensors"),
    ("quickstart", "DPO end to end on the embedded default (SmolLM2-135M, VADER)"),
    ("generate", "sample completions from a policy, with log-probs"),
    ("compare", "win rate of policy A over policy B under a reward"),
    ("plot", "training curves of a run as PNG"),
    ("frontier", "reward against KL(pi || pi_ref) for DPO at several betas, preferred-FT and best-of-N"),
    ("experiment",
     "experiments on real data: `experiment hh`, the reward model against DPO's implicit reward on HH-RLHF"),
    ("verify", "check on an exactly solvable problem that DPO reaches the optimum pi_ref * exp(r / beta) / Z"),
)
