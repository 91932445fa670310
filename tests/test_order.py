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
