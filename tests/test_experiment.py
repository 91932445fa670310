"""Labelling samples into preferences (one pair, or a ranked list of every sample, per prompt) and the
shape of the training run that keeps the two at the same compute."""

from pathlib import Path

import pytest

from tiltlm.experiment import ExperimentConfig, preference_pairs, ranked_lists, training_shape
from tiltlm.generate import Sample


def samples(*per_prompt):
    out = []
    for index, completions in enumerate(per_prompt):
        out += [Sample(prompt=f"p{index}", completion=c, prompt_ids=[1], completion_ids=[2], index=index, sample=k,
                       finished=True) for k, c in enumerate(completions)]
    return out


def test_ranked_lists_keep_every_distinct_sample_and_drop_prompts_without_a_preference():
    drawn = samples(["a", "b", "a", "c"], ["x", "y"], ["same", "same"])
    rewards = [0.5, 0.9, 0.5, 0.1, 0.3, 0.3, 1.0, 1.0]
    lists = ranked_lists(drawn, rewards)
    # prompt 0: "a" twice is one completion; prompt 1 ties everywhere; prompt 2 has one distinct text
    assert lists == [{"prompt": "p0", "completions": ["a", "b", "c"], "scores": [0.5, 0.9, 0.1]}]
    assert [(p["chosen"], p["rejected"]) for p in preference_pairs(drawn, rewards)] == [("b", "c")]


@pytest.mark.parametrize("batch, samples_per_prompt, epochs, prompts, expected", [
    (6, 4, 3, 35, dict(batch_size=3, max_steps=15)),  # 12 completions a step either way; 3 x 35 // 6 steps
    (4, 2, 1, 8, dict(batch_size=4, max_steps=2)),  # two samples: a list is a pair
    (8, 16, 2, 5, dict(batch_size=1, max_steps=2)),  # batch cut to the prompts there are; at least one list
])
def test_ranked_lists_train_at_the_compute_of_one_pair_per_prompt(batch, samples_per_prompt, epochs, prompts,
                                                                  expected):
    ranked = ExperimentConfig(batch_size=batch, samples=samples_per_prompt, epochs=epochs, preferences="ranked")
    assert training_shape(ranked, prompts) == expected
    paired = ExperimentConfig(batch_size=batch, samples=samples_per_prompt, epochs=epochs, preferences="pair")
    assert training_shape(paired, prompts) == dict(batch_size=min(batch, prompts))
