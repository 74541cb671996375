"""The prefetching loader (gptrain.data.prefetch) yields the wrapped loader's batches in the same order, and its
state_dict resumes on the batch after the last one handed out (not after the one read ahead)."""

import torch

from gptrain.data.loader import TrainLoader
from gptrain.data.prefetch import Prefetcher, prefetching
from test_data_loader import make_dir


def test_same_batches_same_order_and_exact_resume(tmp_path):
    make_dir(tmp_path, [30, 12, 25, 1, 18])
    plain = TrainLoader(tmp_path, 2, 16, seed=3)
    wrapped = Prefetcher(TrainLoader(tmp_path, 2, 16, seed=3), "cpu")  # the CUDA logic minus the side stream
    n = 3 * plain.batches_per_epoch + 5  # across epoch boundaries (a new order each epoch)
    for _ in range(n):
        (x1, y1), (x2, y2) = plain.next_batch(), wrapped.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert wrapped.state_dict() == plain.state_dict()  # the read-ahead batch is not counted
    resumed = Prefetcher(TrainLoader(tmp_path, 2, 16, seed=3), "cpu")
    resumed.next_batch()  # some other position first: load_state_dict drops what it read ahead
    resumed.load_state_dict(wrapped.state_dict())
    for _ in range(7):
        (x1, y1), (x2, y2), (x3, y3) = plain.next_batch(), wrapped.next_batch(), resumed.next_batch()
        assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y3)
    assert wrapped.tokens_per_epoch == plain.tokens_per_epoch  # the wrapped loader's attributes show through


def test_cpu_runs_take_the_loader_as_it_is(tmp_path):
    make_dir(tmp_path, [5])
    loader = TrainLoader(tmp_path, 2, 16)
    assert prefetching(loader, "cpu") is loader
