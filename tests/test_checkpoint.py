"""Checkpoints in-process: full-state round trip, atomicity, verification, fallback, pruning, bad input."""

import errno
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptrain.errors import GptrainError
from gptrain.model import GPT, GPTConfig
from gptrain.train import checkpoint as ck
from gptrain.train.checkpoint import checkpointer as ckr, verify
from gptrain.train.checkpoint import Checkpointer, find_checkpoint, load_model_weights
from gptrain.train.resilience import DivergenceGuard

CFG = GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16, pad_vocab_to=64)
TOK = {"name": "gpt2", "sha256": "a" * 64}


class FakeLoader:
    """Data from a numpy permutation and a cursor: its state has both an array and ints."""

    def __init__(self, seed=0):
        self.perm = np.random.default_rng(seed).permutation(1000)
        self.pos = 0

    def next_batch(self):
        idx = self.perm[self.pos:self.pos + 4 * 9] % CFG.vocab_size
        self.pos = (self.pos + 4 * 9) % 900
        t = torch.from_numpy(idx.astype(np.int64)).view(4, 9)
        return t[:, :-1], t[:, 1:]

    def state_dict(self):
        return {"perm": self.perm, "pos": np.int64(self.pos)}

    def load_state_dict(self, s):
        self.perm, self.pos = s["perm"], int(s["pos"])


def make_run(run_dir, seed=0, config=CFG, tokenizer=TOK, **kw):
    torch.manual_seed(seed)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loader = FakeLoader()
    guard = DivergenceGuard(zscore=3.0, window=4)
    ckpt = Checkpointer(run_dir, model=model, optimizer=opt, loader=loader, guard=guard,
                        config={"lr": 1e-2, "seed": seed}, tokenizer=tokenizer, **kw)
    return model, opt, loader, guard, ckpt


def train_steps(model, opt, loader, guard, n, start=0):
    """Steps whose result depends on every RNG (torch dropout-like noise, numpy, python) and the loader."""
    losses = []
    for step in range(start, start + n):
        x, y = loader.next_batch()
        noise = torch.randn(()) * 1e-3 + float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        _, loss = model(x, y)
        (loss + noise).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guard.check(step, loss.item(), norm.item()) is None:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def saved_run(tmp_path, steps=(2, 4), **kw):
    """A run that trained to max(steps), checkpointing at each of `steps`."""
    model, opt, loader, guard, ckpt = make_run(tmp_path, **kw)
    done = 0
    for s in steps:
        train_steps(model, opt, loader, guard, s - done, start=done)
        ckpt.save(s, tokens_seen=s * 32)
        done = s
    return model, opt, loader, guard, ckpt


def test_resume_continues_bit_for_bit(tmp_path):
    model, opt, loader, guard, ckpt = make_run(tmp_path / "a")
    train_steps(model, opt, loader, guard, 3)
    ckpt.save(3, tokens_seen=96)
    expected = train_steps(model, opt, loader, guard, 4, start=3)

    model2, opt2, loader2, guard2, ckpt2 = make_run(tmp_path / "b", seed=123)  # different init: all overwritten
    state = ckpt2.resume(str(tmp_path / "a"))
    assert (state.step, state.tokens_seen) == (3, 96)
    got = train_steps(model2, opt2, loader2, guard2, 4, start=3)
    assert got == expected
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert guard2.state_dict() == guard.state_dict()


def test_layout_meta_and_weights(tmp_path):
    model, *_ = saved_run(tmp_path, steps=(2,))
    d = tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in d.iterdir()) == sorted([ck.MODEL, ck.OPTIMIZER, ck.STATE, ck.META, ck.MANIFEST])
    meta = json.loads((d / ck.META).read_text())
    assert meta["step"] == 2 and meta["tokens_seen"] == 64 and meta["world_size"] == 1
    assert meta["model_config"] == CFG.to_dict() and meta["tokenizer"] == TOK and meta["config"]["lr"] == 1e-2
    manifest = json.loads((d / ck.MANIFEST).read_text())
    assert set(manifest["files"]) == {ck.MODEL, ck.OPTIMIZER, ck.STATE, ck.META}
    with safe_open(d / ck.MODEL, framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # tied: stored once
    config, state, meta2 = load_model_weights(tmp_path)  # a run dir resolves to its newest checkpoint
    assert config == CFG and meta2["step"] == 2
    fresh = GPT(config)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # every non-weight file is readable without unpickling arbitrary objects
    torch.load(d / ck.OPTIMIZER, weights_only=True)
    torch.load(d / ck.STATE, weights_only=True)


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = GPT(CFG)
    compiled = torch.compile(model)  # not run: only its state_dict keys matter
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    keys = set(ck.model_state_dict(compiled))
    assert keys == set(model.state_dict())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", [ck.MODEL, ck.OPTIMIZER, ck.STATE, ck.META, ck.MANIFEST])
def test_damaged_newest_falls_back_to_previous(tmp_path, capsys, name, damage):
    saved_run(tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000004"
    f = newest / name
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    verify._verified.clear()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000002"
    assert "skipping checkpoint" in capsys.readouterr().err
    with pytest.raises(GptrainError, match="not usable"):
        find_checkpoint(newest)  # named explicitly: refused with the reason

    # --resume auto in the same run resumes from step 2 and keeps the broken one aside (not deleted)
    *_, ckpt = make_run(tmp_path)
    state = ckpt.resume("auto")
    assert state.step == 2
    assert not newest.exists() and len(list((tmp_path / "checkpoints").glob("step_00000004.broken-*"))) == 1


def test_killed_save_leaves_previous_checkpoint_usable(tmp_path):
    saved_run(tmp_path, steps=(2,))
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000004"  # what a SIGKILL halfway through a save leaves
    tmp.mkdir()
    (tmp / ck.MODEL).write_bytes(b"partial")
    assert find_checkpoint(tmp_path).name == "step_00000002"
    model, opt, loader, guard, ckpt = make_run(tmp_path)
    assert ckpt.resume("auto").step == 2
    ckpt.save(3, tokens_seen=96)
    assert not tmp.exists()  # cleaned by the next save


def test_full_disk_while_saving(tmp_path, monkeypatch):
    model, opt, loader, guard, ckpt = saved_run(tmp_path, steps=(2,), keep_last=1)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    def no_space(obj, f, *a, **k):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckr.torch, "save", no_space)
    with pytest.raises(GptrainError) as e:
        ckpt.save(4, tokens_seen=128)
    msg = str(e.value)
    assert "\n" not in msg and "step_00000004" in msg and "disk is full" in msg and "step_00000002" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing deleted, no debris
    monkeypatch.undo()
    assert find_checkpoint(tmp_path).name == "step_00000002"


def test_pruning_keeps_last_k_and_milestones(tmp_path):
    saved_run(tmp_path, steps=(1, 2, 3, 4, 5, 6), keep_last=2, keep_every=4)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005", "step_00000006"]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_pruning_never_touches_broken_or_newer(tmp_path):
    model, opt, loader, guard, ckpt = saved_run(tmp_path, steps=(1, 2), keep_last=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002"]
    (tmp_path / "checkpoints" / "step_00000002" / ck.MANIFEST).unlink()  # now broken: left for inspection
    ckpt.save(3, tokens_seen=0)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


def test_model_shape_and_tokenizer_cannot_change(tmp_path):
    saved_run(tmp_path)
    other = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16)
    *_, ckpt = make_run(tmp_path, config=other)
    with pytest.raises(GptrainError, match=r"different model shape \(n_layer=1 -> 2\)"):
        ckpt.resume("auto")
    *_, ckpt = make_run(tmp_path, tokenizer={"name": "gpt2-chat", "sha256": "b" * 64})
    with pytest.raises(GptrainError, match="tokenizer cannot change"):
        ckpt.resume("auto")


def test_changed_settings_are_reported(tmp_path, capsys):
    saved_run(tmp_path)
    *_, ckpt = make_run(tmp_path, seed=5)
    ckpt.resume("auto")
    assert "seed 0 -> 5" in capsys.readouterr().err


def test_resume_modes(tmp_path):
    *_, ckpt = make_run(tmp_path / "new")
    assert ckpt.resume("auto") is None  # nothing yet: fresh start, so a scheduler can relaunch the same command
    saved_run(tmp_path)
    *_, ckpt = make_run(tmp_path)
    with pytest.raises(GptrainError, match="already has checkpoints.*--resume auto"):
        ckpt.resume(None)  # a fresh start never overwrites a run
    with pytest.raises(GptrainError, match="does not exist"):
        ckpt.resume(str(tmp_path / "nope"))
    # an explicit older checkpoint: the later one is set aside, so --resume auto never jumps back onto it
    assert ckpt.resume(str(tmp_path / "checkpoints" / "step_00000002")).step == 2
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert len(list((tmp_path / "checkpoints").glob("step_00000004.abandoned-*"))) == 1


def test_metrics_log_is_cut_back_to_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0}\n{"step": 1}\n')
    model, opt, loader, guard, ckpt = make_run(tmp_path, metrics_path=metrics)
    ckpt.save(2, tokens_seen=64)
    with open(metrics, "a") as f:
        f.write('{"step": 2}\n{"step": 3, "train_lo')  # logged after the save, then killed mid-line
    *_, ckpt2 = make_run(tmp_path, metrics_path=metrics)
    ckpt2.resume("auto")
    assert metrics.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_numpy_state_round_trips_through_weights_only_load(tmp_path):
    np.random.seed(3)
    state = ck.capture_rng_state()
    torch.save(state, tmp_path / "s.pt")
    a = np.random.rand(3)
    np.random.seed(99)
    ck.restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert np.array_equal(np.random.rand(3), a)


def test_different_world_size_continues_the_data_without_gaps(tmp_path, monkeypatch, capsys):
    """A 1-process checkpoint resumed by 2 ranks: their batches are exactly the 1-process run's next two."""
    from gptrain.data.loader import TrainLoader
    from gptrain.data.shards import write_shard
    rng = np.random.default_rng(0)
    docs = np.concatenate([[50256, *rng.integers(0, 500, rng.integers(5, 30))] for _ in range(40)])
    write_shard(tmp_path / "t_train_000.bin", docs[:400])
    write_shard(tmp_path / "t_val_000.bin", docs[400:500])
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters())
    one = TrainLoader(tmp_path, 2, 16, seed=3)
    for _ in range(3):
        one.next_batch()
    ckpt = Checkpointer(tmp_path / "run", model=model, optimizer=opt, loader=one, config={}).save(3, 96)
    expected = [one.next_batch() for _ in range(2)]

    monkeypatch.setattr(ckr, "_broadcast_from_rank0", lambda obj: (str(ckpt), None))  # rank 0's choice
    for rank in (0, 1):
        monkeypatch.setattr(ckr, "_world", lambda: (rank, 2))
        loader = TrainLoader(tmp_path, 2, 16, rank=rank, world_size=2, seed=3)
        Checkpointer(tmp_path / "run", model=model, optimizer=opt, loader=loader, config={}).resume("auto")
        x, y = loader.next_batch()
        assert torch.equal(x, expected[rank][0]) and torch.equal(y, expected[rank][1])
    assert "no longer bit for bit" in capsys.readouterr().err
