"""The state part of checkpoints: one form for every parallelism (full tensors, optimizer keyed by parameter
name), older position-keyed optimizer files still resume exactly, and a mismatched optimizer is one clear line."""

import pytest
import torch

from gptrain.errors import GptrainError
from gptrain.model import GPT
from gptrain.train.checkpoint import Checkpointer, checkpointer as ckr, find_checkpoint
from gptrain.train.optim import make_optimizer
from test_checkpoint import CFG, FakeLoader, make_run, train_steps


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    model, opt, loader, guard, ckpt = make_run(tmp_path)
    train_steps(model, opt, loader, guard, 2)
    ckpt.save(2, tokens_seen=64)
    saved = torch.load(find_checkpoint(tmp_path) / "optimizer.pt", weights_only=True)
    names = {n for n, _ in model.named_parameters()}  # the tied head appears once, as the embedding
    assert set(saved["state"]) == names and "lm_head.weight" not in names
    assert {n for g in saved["param_groups"] for n in g["params"]} == names


def test_older_position_keyed_optimizer_file_resumes_bit_for_bit(tmp_path, monkeypatch):
    model, opt, loader, guard, ckpt = make_run(tmp_path / "a")
    train_steps(model, opt, loader, guard, 3)
    monkeypatch.setattr(ckr, "optimizer_state_dict", lambda model, optimizer: optimizer.state_dict())
    ckpt.save(3, tokens_seen=96)  # written as earlier versions did: optimizer.state_dict(), integer ids
    monkeypatch.undo()
    saved = torch.load(find_checkpoint(tmp_path / "a") / "optimizer.pt", weights_only=True)
    assert all(isinstance(i, int) for g in saved["param_groups"] for i in g["params"])
    expected = train_steps(model, opt, loader, guard, 3, start=3)

    model2, opt2, loader2, guard2, ckpt2 = make_run(tmp_path / "b", seed=5)
    assert ckpt2.resume(str(tmp_path / "a")).step == 3
    assert train_steps(model2, opt2, loader2, guard2, 3, start=3) == expected
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_never_stepped_optimizer_resumes_as_fresh(tmp_path):
    model, opt, loader, guard, ckpt = make_run(tmp_path / "a")
    ckpt.save(0, tokens_seen=0)
    assert not opt.state  # saving did not initialise it
    expected = train_steps(model, opt, loader, guard, 2)
    model2, opt2, loader2, guard2, ckpt2 = make_run(tmp_path / "b", seed=5)
    ckpt2.resume(str(tmp_path / "a"))
    assert train_steps(model2, opt2, loader2, guard2, 2) == expected


def test_an_optimizer_with_other_groups_is_refused_in_one_line(tmp_path):
    model, opt, loader, guard, ckpt = make_run(tmp_path / "a")
    train_steps(model, opt, loader, guard, 1)
    ckpt.save(1, tokens_seen=32)
    model2 = GPT(CFG)
    other = make_optimizer(model2, lr=1e-2, weight_decay=0.1, embedding_lr_scale=5.0)  # three groups, not one
    c = Checkpointer(tmp_path / "b", model=model2, optimizer=other, loader=FakeLoader(), config={})
    with pytest.raises(GptrainError, match="does not fit this run's optimizer") as e:
        c.resume(str(tmp_path / "a"))
    assert "\n" not in str(e.value)
