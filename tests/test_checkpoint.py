"""Checkpoints in-process: full-state round trip, atomicity, verification, fallback, pruning, bad input."""

import errno
import json
import pickle
import random

import numpy as np
import pytest
import torch

from gptrain.errors import GptrainError
from gptrain.model import GPT, GPTConfig
from gptrain.train import checkpoint as ck
from gptrain.train.checkpoint import checkpointer as ckr, sharded, verify
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
    files = ["__0_0.distcp", ".metadata", "rank_00000.pt", ck.STATE, ck.META]
    assert sorted(p.name for p in d.iterdir()) == sorted(files + [ck.MANIFEST])
    meta = json.loads((d / ck.META).read_text())
    assert meta["step"] == 2 and meta["tokens_seen"] == 64 and meta["world_size"] == 1
    assert meta["model_config"] == CFG.to_dict() and meta["tokenizer"] == TOK and meta["config"]["lr"] == 1e-2
    assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    manifest = json.loads((d / ck.MANIFEST).read_text())
    assert manifest["version"] == 2 and set(manifest["files"]) == set(files)
    keys = set(sharded.SafeReader(d).read_metadata().state_dict_metadata)
    assert "model.lm_head.weight" not in keys and "model.transformer.wte.weight" in keys  # tied: stored once
    assert "optim.transformer.wte.weight.exp_avg" in keys  # the optimizer's tensors, by parameter name
    config, state, meta2 = load_model_weights(tmp_path)  # a run dir resolves to its newest checkpoint
    assert config == CFG and meta2["step"] == 2
    fresh = GPT(config)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # every non-tensor file is readable without unpickling arbitrary objects
    torch.load(d / "rank_00000.pt", weights_only=True)
    torch.load(d / ck.STATE, weights_only=True)


def test_a_metadata_file_that_would_run_code_is_refused(tmp_path):
    """DCP's .metadata is a pickle: it is read admitting only metadata classes, so a crafted one runs nothing."""
    saved_run(tmp_path, steps=(2,))
    d = tmp_path / "checkpoints" / "step_00000002"

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    (d / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(GptrainError, match=r"\.metadata is not a torch.distributed.checkpoint metadata file "
                                           r"\(builtins.print is not part of a checkpoint's metadata\)"):
        sharded.SafeReader(d).read_metadata()


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = GPT(CFG)
    compiled = torch.compile(model)  # not run: only its state_dict keys matter
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    opt = torch.optim.AdamW(model.parameters())
    Checkpointer(tmp_path, model=compiled, optimizer=opt, loader=FakeLoader(), config={}).save(1, tokens_seen=0)
    _, state, _ = load_model_weights(tmp_path)
    assert set(state) == set(model.state_dict())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "rank_00000.pt", ck.STATE, ck.META, ck.MANIFEST])
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
    assert "\n" not in msg and "step_00000004" in msg and "is full" in msg and "step_00000002 (step 2) is intact" in msg
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
    assert ckpt.resume(None) is None
    saved_run(tmp_path)
    *_, ckpt = make_run(tmp_path)
    assert ckpt.resume(None).step == 4  # the same settings: the default continues the run
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


# ---------------------------------------------------------------- nothing a run wrote is lost (issue 15.1, 14.5)

def _corrupt(ckpt_dir):
    f = ckpt_dir / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def test_all_checkpoints_broken_stops_and_keeps_every_record(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {i}}}\n' for i in range(5)))
    saved_run(tmp_path, steps=(1, 2, 4), metrics_path=metrics)
    log_before = metrics.read_bytes()
    for c in ck.list_checkpoints(tmp_path):
        _corrupt(c)
    verify._verified.clear()
    messages = []
    for spec in ("auto", None, "auto"):  # the same command again: still refused, nothing changes
        *_, ckpt = make_run(tmp_path, metrics_path=metrics)
        with pytest.raises(GptrainError) as e:
            ckpt.resume(spec)
        messages.append(msg := str(e.value))
        assert "\n" not in msg and "none is usable" in msg and "--resume PATH" in msg and "--resume fresh" in msg
        assert metrics.read_bytes() == log_before
    assert "step_00000004 (__0_0.distcp has sha256" in messages[0] and "(corrupted)" in messages[0]
    assert "step_00000001.broken-" in messages[1]  # named where they now are
    aside = sorted(p.name.split(".")[0] for p in (tmp_path / "checkpoints").glob("step_*.broken-*"))
    assert aside == ["step_00000001", "step_00000002", "step_00000004"] and not ck.list_checkpoints(tmp_path)

    # the explicit fresh start moves the records aside (nothing deleted), then starts from step 0
    (tmp_path / "config.json").write_text("{}\n")
    (tmp_path / "report").mkdir()  # drawn from the old metrics: it goes with them
    (tmp_path / "report" / "report.png").write_bytes(b"png")
    *_, ckpt = make_run(tmp_path, metrics_path=metrics)
    assert ckpt.resume("fresh") is None
    prev = next(tmp_path.glob("previous-*"))
    assert (prev / "metrics.jsonl").read_bytes() == log_before and (prev / "config.json").exists()
    assert (prev / "report" / "report.png").read_bytes() == b"png" and not (tmp_path / "report").exists()
    assert len(list((prev / "checkpoints").glob("step_*.broken-*"))) == 3
    assert not metrics.exists() and not (tmp_path / "checkpoints").exists()
    assert "previous-" in capsys.readouterr().err


def test_a_run_without_checkpoints_starts_over_without_losing_its_log(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0}\n{"step": 1}\n')  # killed before its first checkpoint
    *_, ckpt = make_run(tmp_path, metrics_path=metrics)
    assert ckpt.resume(None) is None
    prev = next(tmp_path.glob("previous-*"))
    assert (prev / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n' and not metrics.exists()
    assert "moved the earlier run's metrics.jsonl" in capsys.readouterr().err


def test_cut_metrics_tail_is_kept(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0}\n')
    *_, ckpt = make_run(tmp_path, metrics_path=metrics)
    ckpt.save(1, tokens_seen=32)
    with open(metrics, "a") as f:
        f.write('{"step": 1}\n{"step": 2, "tr')
    *_, ckpt2 = make_run(tmp_path, metrics_path=metrics)
    ckpt2.resume(None)
    assert metrics.read_text() == '{"step": 0}\n'
    cut = list(tmp_path.glob("metrics.jsonl.cut-*"))
    assert len(cut) == 1 and cut[0].read_text() == '{"step": 1}\n{"step": 2, "tr'
    assert "2 line(s)" in capsys.readouterr().err


def test_default_resume_refuses_a_changed_identity_and_allows_runtime_changes(tmp_path, capsys):
    model, opt, loader, guard, _ = make_run(tmp_path)
    Checkpointer(tmp_path, model=model, optimizer=opt, loader=loader, config={"lr": 1e-2, "seed": 0, "threads": 1},
                 runtime={"threads"}).save(2, tokens_seen=64)

    def again(quiet=frozenset(), **config):
        model, opt, loader, _, _ = make_run(tmp_path)
        return Checkpointer(tmp_path, model=model, optimizer=opt, loader=loader, runtime={"threads"}, quiet=quiet,
                            config={"lr": 1e-2, "seed": 0, "threads": 1, **config})

    with pytest.raises(GptrainError, match=r"settings differ from these: --lr 0\.01 -> 0\.02\. .*--resume auto") as e:
        again(lr=2e-2).resume(None)
    assert "\n" not in str(e.value)
    assert again(threads=2).resume(None).step == 2  # runtime: the same run
    assert "threads 1 -> 2" in capsys.readouterr().err
    assert again(quiet={"threads"}, threads=2).resume(None).step == 2  # a change that leaves the arithmetic alone
    assert "settings changed" not in capsys.readouterr().err  # is not listed
    assert again(lr=2e-2).resume("auto").step == 2  # explicit auto continues whatever changed, with a warning
    assert "lr 0.01 -> 0.02" in capsys.readouterr().err


def test_machine_is_recorded_and_a_different_one_is_reported(tmp_path, capsys):
    saved_run(tmp_path, steps=(2,))
    meta = json.loads((tmp_path / "checkpoints" / "step_00000002" / ck.META).read_text())
    assert meta["machine"]["threads"] == torch.get_num_threads() and meta["machine"]["torch"] == torch.__version__
    *_, ckpt = make_run(tmp_path)
    ckpt.resume("auto")
    assert "not bit-for-bit" not in capsys.readouterr().err
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        *_, ckpt = make_run(tmp_path)
        ckpt.resume("auto")
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"threads {threads} -> {threads + 1}" in err and "the continuation is not bit-for-bit" in err


# ---------------------------------------------------------------- a full disk (issue 15.2), injected

@pytest.mark.parametrize("where", ["dcp", "torch.save"])
def test_full_disk_in_either_writer_is_one_line(tmp_path, monkeypatch, where):
    from torch.distributed.checkpoint import filesystem
    from gptrain import errors
    model, opt, loader, guard, ckpt = saved_run(tmp_path, steps=(2,))
    if where == "dcp":  # a shard's write fails inside DCP's writer, which reports it in its own exception
        def fail(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(filesystem, "_write_item", fail)
    else:  # torch.save given a path loses the OSError: less free space than a checkpoint needs decides
        def fail(obj, f, *a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        monkeypatch.setattr(ckr.torch, "save", fail)
        monkeypatch.setattr(errors, "free_bytes", lambda path: 1000)
    with pytest.raises(GptrainError) as e:
        ckpt.save(4, tokens_seen=128)
    msg = str(e.value)
    assert "\n" not in msg and "is full" in msg and "checkpoint step_00000004" in msg and "needed" in msg
    assert "step_00000002 (step 2) is intact" in msg and "run the same command again" in msg
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    model, opt, loader, guard, ckpt = saved_run(tmp_path, steps=(2,))

    def bug(obj, f, *a, **k):
        raise RuntimeError("something else")
    monkeypatch.setattr(ckr.torch, "save", bug)
    with pytest.raises(RuntimeError, match="something else"):
        ckpt.save(4, tokens_seen=128)
