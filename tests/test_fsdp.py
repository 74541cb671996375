"""FSDP2 against DDP on 2 CPU processes (gloo, float32): same seed, same data, the same loss and gradient norm at
each of 20 steps, with and without accumulation, without resharding after forward, on a 2-D (hybrid) mesh, with
Muon (each sharded matrix gathered whole) as with AdamW, and Muon under both equal to one process accumulating
the same two micro-batches; activation checkpointing changes no loss; reduce-scattering every micro-step
(--reduce-scatter every) gives the losses of reducing once per step; the CUDA step path (skips decided on the
device), forced here, gives the bits of the host path, a NaN skipped included."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from gptrain.model import GPT, GPTConfig
from gptrain.train import distributed, resilience
from gptrain.train.trainer import Trainer
from test_train import SeqLoader, _free_port, small_cfg, tokens

STEPS, B, T, VOCAB = 20, 2, 16, 1024
MUON = dict(optimizer="muon", muon_lr=0.02, muon_weight_decay=0.1)
# name -> (TrainConfig overrides); every run starts from the same weights and reads the same batches
RUNS = {
    "ddp": dict(parallel="ddp"),
    "fsdp": dict(parallel="fsdp"),
    "ddp accum": dict(parallel="ddp", total_batch_size=2 * B * T * 2),
    "fsdp accum": dict(parallel="fsdp", total_batch_size=2 * B * T * 2),
    "fsdp accum no-reshard": dict(parallel="fsdp", total_batch_size=2 * B * T * 2, reshard_after_forward=False),
    "fsdp accum rs-every": dict(parallel="fsdp", total_batch_size=2 * B * T * 2, reduce_scatter="every"),
    "hsdp accum": dict(parallel="fsdp", total_batch_size=2 * B * T * 2, fsdp_shard_size=1),
    "fsdp accum ac": dict(parallel="fsdp", total_batch_size=2 * B * T * 2, activation_checkpointing="blocks"),
    "ddp accum ac": dict(parallel="ddp", total_batch_size=2 * B * T * 2, activation_checkpointing="blocks"),
    "ddp muon": dict(parallel="ddp", **MUON),
    "fsdp muon": dict(parallel="fsdp", **MUON),
    "ddp accum muon": dict(parallel="ddp", total_batch_size=2 * B * T * 2, **MUON),
    "fsdp accum muon": dict(parallel="fsdp", total_batch_size=2 * B * T * 2, **MUON),
    # the CUDA step path (the skip decided on the device, Trainer.skip_on_device), forced on the CPU
    "fsdp device-skip": dict(parallel="fsdp", skip_on_device=True),
    "fsdp muon nan": dict(parallel="fsdp", nan_steps=(3, 4), **MUON),
    "fsdp muon nan device-skip": dict(parallel="fsdp", nan_steps=(3, 4), skip_on_device=True, **MUON),
}


def _run(init, name, over, loader, env=None):
    model = GPT(GPTConfig(**init["config"]))
    model.load_state_dict(init["weights"])
    over = dict(over)
    skip_on_device, nan_steps = over.pop("skip_on_device", False), over.pop("nan_steps", ())
    cfg = small_cfg(**{"micro_batch_size": B, "seq_len": T, "total_batch_size": 2 * B * T, "max_steps": STEPS,
                       "lr": 1e-2, **over})
    trainer = Trainer(cfg, model, loader, env=env)
    trainer.skip_on_device = skip_on_device
    resilience._NAN_STEPS = frozenset(nan_steps)  # a spawned worker's own module: no other test sees it
    steps = [trainer.train_step() for _ in range(STEPS)]
    result = {"loss": [m["train_loss"] for m in steps], "norm": [m["grad_norm"] for m in steps]}
    with trainer.wrapped.gathered() as full:  # the trained weights, gathered (every rank enters)
        result["wte"] = full.transformer.wte.weight.detach().clone()
        result["c_fc"] = full.transformer.h[0].mlp.c_fc.weight.detach().clone()  # a Muon matrix
    return result


def _worker(rank, world, port, init, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = distributed.setup("cpu", "fsdp")
    data, results = tokens(vocab=VOCAB), {}
    try:
        for name, over in RUNS.items():
            results[name] = _run(init, name, over, SeqLoader(data, B, T, rank, world), env=env)
            # (each Trainer is gone here: DDP's reducer goes before the process group does)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        distributed.teardown()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    init = {"config": config.to_dict(), "weights": {k: v.clone() for k, v in model.state_dict().items()}}
    out = tmp_path_factory.mktemp("fsdp") / "results.pt"
    mp.start_processes(_worker, args=(2, _free_port(), init, str(out)), nprocs=2, join=True, start_method="spawn")
    results = torch.load(out, weights_only=True)
    # one process reading both ranks' micro-batches in turn: 2 accumulation steps = the 2-process step
    results["single accum muon"] = _run(init, "single", dict(MUON), SeqLoader(tokens(vocab=VOCAB), B, T))
    return results


@pytest.mark.parametrize("run,ref", [("fsdp", "ddp"), ("fsdp accum", "ddp accum"), ("fsdp accum no-reshard", "ddp accum"),
                                     ("hsdp accum", "ddp accum"), ("fsdp muon", "ddp muon"),
                                     ("fsdp accum muon", "ddp accum muon"), ("single accum muon", "ddp muon"),
                                     ("single accum muon", "fsdp muon"), ("fsdp accum rs-every", "fsdp accum")])
def test_fsdp_equals_ddp_at_every_step(results, run, ref):
    got, want = results[run], results[ref]
    assert want["loss"][-1] < want["loss"][0] - 0.5  # it learns, so equality means something
    for step in range(STEPS):
        assert abs(got["loss"][step] - want["loss"][step]) < 1e-5, (step, got["loss"][step], want["loss"][step])
        assert abs(got["norm"][step] - want["norm"][step]) < 1e-5, (step, got["norm"][step], want["norm"][step])
    assert torch.allclose(got["wte"], want["wte"], atol=1e-5)  # the tied embedding/head trained the same
    assert torch.allclose(got["c_fc"], want["c_fc"], atol=1e-5)


def test_muon_trains_differently_from_adamw(results):
    assert results["ddp muon"]["loss"][5] != results["ddp"]["loss"][5]


def test_accumulation_differs_from_no_accumulation(results):
    """The accumulated runs see twice the batch: a different trajectory (so the pairs above compare like with like)."""
    assert results["ddp accum"]["loss"][5] != results["ddp"]["loss"][5]


@pytest.mark.parametrize("run,ref", [("fsdp device-skip", "fsdp"), ("fsdp muon nan device-skip", "fsdp muon nan")])
def test_the_device_skip_path_equals_the_host_path_under_fsdp(results, run, ref):
    """Sharded parameters (DTensors) through the fused AdamW's found_inf and Muon's select: the same bits."""
    assert repr(results[run]["loss"]) == repr(results[ref]["loss"])  # skipped steps' NaN losses included
    assert repr(results[run]["norm"]) == repr(results[ref]["norm"])
    for weight in ("wte", "c_fc"):
        assert torch.equal(results[run][weight], results[ref][weight]), weight
    if run.endswith("nan device-skip"):
        assert [s for s, loss in enumerate(results[run]["loss"]) if loss != loss] == [3, 4]


@pytest.mark.parametrize("run,ref", [("fsdp accum ac", "fsdp accum"), ("ddp accum ac", "ddp accum")])
def test_activation_checkpointing_gives_the_same_losses(results, run, ref):
    for step in range(STEPS):
        assert abs(results[run]["loss"][step] - results[ref]["loss"][step]) < 1e-6, step
        assert abs(results[run]["norm"][step] - results[ref]["norm"][step]) < 1e-6, step
