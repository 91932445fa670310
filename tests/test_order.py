"""The data order: every pair once per epoch, ranks x accumulation partition a step like one big batch."""

from tiltlm.data.order import DataOrder


def test_each_epoch_visits_pairs_once_up_to_the_remainder():
    order = DataOrder(num_pairs=23, micro_batch=2, grad_accum=2, world_size=1, seed=0)
    assert order.steps_per_epoch == 5  # 23 // 4
    for epoch in range(2):
        seen = [i for step in range(epoch * 5, epoch * 5 + 5) for mb in order.micro_batches(step, 0) for i in mb]
        assert len(seen) == 20 and len(set(seen)) == 20
    assert order.permutation(0) != order.permutation(1)


def test_two_ranks_cover_what_one_process_with_double_batch_does():
    one = DataOrder(num_pairs=40, micro_batch=4, grad_accum=1, world_size=1, seed=7)
    two = DataOrder(num_pairs=40, micro_batch=2, grad_accum=1, world_size=2, seed=7)
    accum = DataOrder(num_pairs=40, micro_batch=2, grad_accum=2, world_size=1, seed=7)
    for step in range(12):
        big = one.micro_batches(step, 0)[0]
        assert two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0] == big
        assert sum(accum.micro_batches(step, 0), []) == big


def test_length_grouping_keeps_the_epoch_and_groups_each_step():
    lengths = tuple((i * 37) % 101 for i in range(230))  # distinct-ish lengths in no order
    plain = DataOrder(num_pairs=230, micro_batch=2, grad_accum=2, world_size=1, seed=5)
    grouped = DataOrder(num_pairs=230, micro_batch=2, grad_accum=2, world_size=1, seed=5, lengths=lengths)
    steps = grouped.steps_per_epoch  # 57: two windows (50 steps, then 7)
    for epoch in range(2):
        epoch_steps = [sum(grouped.micro_batches(epoch * steps + s, 0), []) for s in range(steps)]
        seen = [i for pairs in epoch_steps for i in pairs]
        # the same pairs as the ungrouped order uses this epoch, each once
        assert sorted(seen) == sorted(plain.permutation(epoch)[:steps * 4])
        # inside a window the steps are slices of one length-sorted list: no two overlap in length
        first_window = sorted(epoch_steps[:50], key=lambda pairs: min(lengths[i] for i in pairs))
        for a, b in zip(first_window, first_window[1:]):
            assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)
        # and the step order is shuffled, not sorted
        assert [min(lengths[i] for i in s) for s in epoch_steps[:50]] != [min(lengths[i] for i in s)
                                                                          for s in first_window]
    # spread of lengths within a step is far below the ungrouped order's
    def spread(order):
        return sum(max(lengths[i] for i in s) - min(lengths[i] for i in s)
                   for s in (sum(order.micro_batches(k, 0), []) for k in range(steps)))
    assert spread(grouped) * 5 < spread(plain)
