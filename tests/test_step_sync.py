"""The CUDA step path, run on the CPU: the update queued with its skip decided on the device (the fused optimizer's
`found_inf`), the values read after it. It gives the host path's losses, skips, weights and optimizer state."""

import pytest
import torch

from gptrain.model import GPT
from gptrain.train import resilience
from gptrain.train.optim import make_optimizer, skips_on_device
from test_train import SeqLoader, small_cfg, tokens
from gptrain.train.trainer import Trainer

STEPS = 6


def _train(tiny_config, on_device: bool, optimizer: str):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    cfg = small_cfg(max_steps=STEPS, total_batch_size=64, optimizer=optimizer)  # 2 micro-steps
    trainer = Trainer(cfg, model, SeqLoader(tokens(vocab=tiny_config.vocab_size), 2, 16))
    assert not trainer.skip_on_device  # a CPU run takes the host path unless told otherwise
    trainer.skip_on_device = on_device
    steps = [trainer.train_step() for _ in range(STEPS)]
    return ([(m["train_loss"], m["grad_norm"], m.get("skipped")) for m in steps], model.state_dict(),
            trainer.optimizer.state_dict()["state"], trainer.guard.state_dict())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("nan_steps", [(), (2, 3)])
def test_the_device_skip_path_equals_the_host_path(monkeypatch, tiny_config, optimizer, nan_steps):
    monkeypatch.setattr(resilience, "_NAN_STEPS", frozenset(nan_steps))
    host = _train(tiny_config, False, optimizer)
    device = _train(tiny_config, True, optimizer)
    assert repr(device[0]) == repr(host[0])  # losses, norms and skips, to the bit (nan != nan)
    assert [s for s, (_, _, why) in enumerate(host[0]) if why] == list(nan_steps)
    for k, v in host[1].items():
        assert torch.equal(device[1][k], v), k
    assert host[2].keys() == device[2].keys()
    for p, state in host[2].items():
        for k, v in state.items():
            assert torch.equal(device[2][p][k], v), (p, k)  # AdamW's step counters too: a skip is not counted
    assert device[3] == host[3]


def test_only_fused_adamw_skips_on_the_device(tiny_config):
    model = GPT(tiny_config)
    assert skips_on_device(make_optimizer(model, lr=1e-3, weight_decay=0.1))
    assert skips_on_device(make_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon"))
    assert not skips_on_device(make_optimizer(model, lr=1e-3, weight_decay=0.1, fused=False))
