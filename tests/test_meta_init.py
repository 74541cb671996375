"""FSDP start-up on the meta device: at 2 and 4 gloo processes (and on a 2x2 hybrid mesh) every rank holds only
its shards, and the sharded weights are bit for bit the single-process initialisation from the same seed, with
the generator left where a single-process build leaves it."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from gptrain.model import GPT, GPTConfig
from gptrain.train import distributed, meta_init
from test_train import _free_port

CFG = GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=32)
SEED = 1337


def _worker(rank, world, port, shard_size, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = distributed.setup("cpu", "fsdp")
    try:
        torch.manual_seed(SEED)
        model = meta_init.build(GPT, CFG)
        assert all(p.is_meta for p in model.parameters())
        rng = torch.get_rng_state()
        distributed.wrap(model, env, compile=False, parallel="fsdp", shard_size=shard_size)
        local = sum(p.to_local().numel() for p in model.parameters())
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"weights": full, "rng": rng, "local": local}, out_path)
    finally:
        distributed.teardown()


@pytest.mark.parametrize("world,shard_size", [(2, 0), (4, 0), (4, 2)])
def test_meta_start_up_gives_the_single_process_weights(tmp_path, world, shard_size):
    out = tmp_path / "out.pt"
    mp.start_processes(_worker, args=(world, _free_port(), shard_size, str(out)), nprocs=world, join=True,
                       start_method="spawn")
    got = torch.load(out, weights_only=True)
    torch.manual_seed(SEED)
    want = GPT(CFG)
    assert torch.equal(got["rng"], torch.get_rng_state())  # the generator where a plain build leaves it
    state = want.state_dict()
    assert set(got["weights"]) == set(state)
    for k, v in state.items():
        assert torch.equal(got["weights"][k], v), k
    shards = world // (world // shard_size) if shard_size else world
    assert got["local"] <= want.num_params() // shards + 4 * 32 * 4  # a rank's share (chunks round up)
