"""The state part of checkpoints: one form for every parallelism (sharded tensors, optimizer keyed by parameter
name), checkpoints of the earlier gathered format (model.safetensors + optimizer.pt + state.pt, also with the
oldest position-keyed optimizer file) still load and resume exactly, and a mismatched optimizer is one clear
line."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptrain.errors import GptrainError
from gptrain.model import GPT
from gptrain.train.checkpoint import Checkpointer, find_checkpoint, load_model_weights, sharded
from gptrain.train.optim import make_optimizer
from test_checkpoint import CFG, FakeLoader, make_run, train_steps

# Written by gptrain 581fc9d (the gathered format) with test_checkpoint.saved_run(steps=(2,)): a run of CFG
# checkpointed after 2 steps.
LEGACY = Path(__file__).parent / "fixtures" / "legacy_run"


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    model, opt, loader, guard, ckpt = make_run(tmp_path)
    train_steps(model, opt, loader, guard, 2)
    ckpt.save(2, tokens_seen=64)
    d = find_checkpoint(tmp_path)
    groups = torch.load(d / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    keys = sharded.SafeReader(d).read_metadata().state_dict_metadata
    names = {n for n, _ in model.named_parameters()}  # the tied head appears once, as the embedding
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in keys if k.startswith("optim.")} == names
    assert "lm_head.weight" not in names and {n for g in groups for n in g["params"]} == names


def legacy_run(tmp_path, position_keyed: bool) -> Path:
    """A copy of the gathered-format fixture; position_keyed: its optimizer file as the oldest versions wrote it
    (optimizer.state_dict(), integer ids), the manifest updated to match."""
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    ckpt = run / "checkpoints" / "step_00000002"
    if position_keyed:
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
        ids = {name: i for i, name in enumerate(n for g in saved["param_groups"] for n in g["params"])}
        saved = {"state": {ids[n]: v for n, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in saved["param_groups"]]}
        torch.save(saved, ckpt / "optimizer.pt")
        manifest = json.loads((ckpt / "MANIFEST.json").read_text())
        data = (ckpt / "optimizer.pt").read_bytes()
        manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    return run


@pytest.mark.parametrize("position_keyed", [False, True])
def test_a_checkpoint_of_the_gathered_format_resumes_exactly(tmp_path, position_keyed):
    run = legacy_run(tmp_path, position_keyed)
    d = run / "checkpoints" / "step_00000002"
    model, opt, loader, guard, ckpt = make_run(tmp_path / "new", seed=5)
    assert ckpt.resume(str(run)).step == 2
    # exactly the state in its files: weights, optimizer moments by name, loader, RNG
    weights = load_file(d / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights.get(name, weights["transformer.wte.weight"])), name
    saved = torch.load(LEGACY / "checkpoints" / "step_00000002" / "optimizer.pt", weights_only=True)
    params = dict(model.named_parameters())
    for name, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(opt.state[params[name]][k], v), (name, k)
    rank0 = torch.load(d / "state.pt", weights_only=True)["ranks"][0]
    assert loader.pos == int(rank0["loader"]["pos"]) and torch.equal(torch.get_rng_state(), rank0["rng"]["torch"])
    # commands read it as before; it goes on, and its next checkpoint is sharded and resumes bit for bit
    _, state, meta = load_model_weights(run)
    assert meta["version"] == 1 and torch.equal(state["lm_head.weight"], weights["transformer.wte.weight"])
    train_steps(model, opt, loader, guard, 1, start=2)
    ckpt.save(3, tokens_seen=96)
    expected = train_steps(model, opt, loader, guard, 2, start=3)
    model2, opt2, loader2, guard2, ckpt2 = make_run(tmp_path / "again", seed=9)
    assert ckpt2.resume(str(tmp_path / "new")).step == 3
    assert train_steps(model2, opt2, loader2, guard2, 2, start=3) == expected
    assert np.array_equal(loader2.perm, loader.perm)


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
