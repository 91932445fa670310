"""The ``tiltlm`` commands, one module each, with ``add_arguments(parser)`` and ``run(args) -> int``.

Commands turn flags into library calls and print; the library never imports them.
"""

# (name, module, one-line summary), in the order ``tiltlm --help`` lists them
COMMANDS = (
    ("train", "tiltlm.commands.train", "train a policy on preference pairs"),
    ("eval", "tiltlm.commands.eval", "loss and reward metrics of a policy against a reference"),
    ("reward", "tiltlm.commands.reward", "train or evaluate a Bradley-Terry reward model"),
    ("plan", "tiltlm.commands.plan", "will a run fit? peak memory per device and FLOPs per step, traced on fake tensors"),
    ("quickstart", "tiltlm.commands.quickstart", "DPO end to end on the embedded default (SmolLM2-135M, VADER)"),
    ("generate", "tiltlm.commands.generate", "sample completions from a policy, with log-probs"),
    ("compare", "tiltlm.commands.compare", "win rate of policy A over policy B under a reward"),
    ("plot", "tiltlm.commands.plot", "training curves of a run as PNG"),
    ("frontier", "tiltlm.commands.frontier",
     "reward against KL(pi || pi_ref) for DPO at several betas, preferred-FT and best-of-N"),
    ("experiment", "tiltlm.commands.experiment",
     "experiments on real data: `experiment hh`, the reward model against DPO's implicit reward on HH-RLHF"),
    ("verify", "tiltlm.commands.verify",
     "check on an exactly solvable problem that DPO reaches the optimum pi_ref * exp(r / beta) / Z"),
)
