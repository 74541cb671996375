import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data():
    """../shared/data, present here and in CI but not in a user's clone: tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it exists only on the project's own machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """Two real llm.c shards (50 train and 10 val documents of 40 tokens, each led by <|endoftext|>), for short
    runs and for runs that must stop before training. Read-only: shared by every test that asks."""
    import numpy as np
    from gptrain.data.shards import write_shard
    d = tmp_path_factory.mktemp("small_shards")
    rng = np.random.default_rng(0)
    write_shard(d / "t_train_000.bin", np.concatenate([[50256, *rng.integers(0, 500, 40)] for _ in range(50)]))
    write_shard(d / "t_val_000.bin", np.concatenate([[50256, *rng.integers(0, 500, 40)] for _ in range(10)]))
    return d


@pytest.fixture
def tiny_config():
    from gptrain.model import GPTConfig
    return GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def one_thread():
    """One torch thread for the test (small models: threads add overhead, and contention on a shared machine;
    row-for-row equality tests also want one thread's kernels). Use with `pytest.mark.usefixtures`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
