"""The GPT-3 family presets against the paper's Table 2.1, and the memory plan: its arithmetic, its advice, the
`--plan` command and the stop before step 1 when a run does not fit."""

import dataclasses

import pytest
import torch

from gptrain.cli import main as cli
from gptrain.errors import GptrainError
from gptrain.model import GPT, PRESETS, preset
from gptrain.train import memory
from gptrain.train.config import TrainConfig, resolve
from gptrain.train.trainer import Trainer
from test_train import SeqLoader, small_cfg, tokens

# GPT-3 paper, Table 2.1: name, n_params, n_layers, d_model, n_heads, d_head, batch (tokens), learning rate
TABLE_2_1 = [
    ("gpt3-small", "gpt3-124m", 125e6, 12, 768, 12, 64, 0.5e6, 6.0e-4),
    ("gpt3-medium", "gpt3-350m", 350e6, 24, 1024, 16, 64, 0.5e6, 3.0e-4),
    ("gpt3-large", "gpt3-760m", 760e6, 24, 1536, 16, 96, 0.5e6, 2.5e-4),
    ("gpt3-xl", "gpt3-1.3b", 1.3e9, 24, 2048, 24, 128, 1e6, 2.0e-4),
    ("gpt3-2.7b", "gpt3-2.7b", 2.7e9, 32, 2560, 32, 80, 1e6, 1.6e-4),
    ("gpt3-6.7b", "gpt3-6.7b", 6.7e9, 32, 4096, 32, 128, 2e6, 1.2e-4),
]


@pytest.mark.parametrize("name,recipe,n,layers,d,heads,d_head,batch,lr", TABLE_2_1)
def test_gpt3_presets_follow_table_2_1(name, recipe, n, layers, d, heads, d_head, batch, lr):
    c = preset(name)
    assert (c.block_size, c.n_layer, c.n_embd) == (2048, layers, d)
    assert c.n_embd // c.n_head == d_head  # XL: the table's 24 heads of 128 cannot make 2048; the head size is kept
    assert c.n_head == (heads if name != "gpt3-xl" else 16)
    assert abs(memory.param_count(c) - n) / n < 0.03  # the table's sizes, with GPT-2's vocabulary
    r = resolve(recipe, {})
    assert (r.model, r.seq_len, r.lr) == (name, 2048, lr)
    assert abs(r.total_batch_size - batch) / batch < 0.05  # 0.5M = 2^19, 1M = 2^20, 2M = 2^21 tokens
    assert r.warmup_steps * r.total_batch_size == pytest.approx(375e6, rel=0.01)  # the paper's 375M-token warm-up


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_is_the_models(name):
    with torch.device("meta"):
        model = GPT(preset(name))
    assert memory.param_count(preset(name)) == model.num_params()


def _plan(world, **kw):
    cfg = TrainConfig(**{"model": "gpt2-medium", "seq_len": 1024, "micro_batch_size": 4,
                         "total_batch_size": 4 * 1024 * 4 * 2, "dtype": "float32", "compile": False, **kw})
    return memory.plan_for(preset("gpt2-medium"), cfg, world, "cpu")


def test_sharded_state_shrinks_as_one_over_world_size():
    ddp = [_plan(w, parallel="ddp") for w in (1, 2, 4)]
    fsdp = [_plan(w, parallel="fsdp") for w in (1, 2, 4)]
    n = memory.param_count(preset("gpt2-medium"))
    assert {p.params() + p.optimizer() for p in ddp} == {12 * n}  # every DDP rank holds the whole state
    for w, p in zip((1, 2, 4), fsdp):
        assert p.optimizer() == int(8 * n / w)
        unit = max(n - 24 * memory.block_params(p.model), memory.block_params(p.model))  # the root: embeddings
        assert p.grads(accumulation=1) == int(4 * n / w + 2 * 4 * unit)  # one unit's gradient, in flight twice
    assert fsdp[2].grads() == fsdp[2].grads(accumulation=2) > 4 * n  # accumulating: one unsharded fp32 copy
    hybrid = _plan(4, parallel="fsdp", fsdp_shard_size=2)
    assert hybrid.shards == 2 and hybrid.optimizer() == fsdp[1].optimizer()
    resharded, kept = _plan(2, parallel="fsdp"), _plan(2, parallel="fsdp", reshard_after_forward=False)
    assert kept.params() - resharded.params() > 2 * n  # without resharding every Block stays gathered


def test_muon_keeps_one_buffer_for_the_block_matrices_and_two_for_the_rest(capsys):
    n = memory.param_count(preset("gpt2-medium"))
    matrices = 12 * 1024 * 1024 * 24  # QKV 3C², projection C², MLP 8C² in each of 24 blocks
    assert _plan(1, parallel="ddp", optimizer="muon").optimizer() == 4 * matrices + 8 * (n - matrices)
    fsdp = _plan(4, parallel="fsdp", optimizer="muon")  # plus one gathered 4C x C matrix and its update
    assert fsdp.optimizer() == int((4 * matrices + 8 * (n - matrices)) / 4) + 2 * 4 * 4 * 1024 * 1024
    assert cli(["train", "--preset", "gpt2-124m", "--optimizer", "muon", "--plan", "--plan-world-size", "8",
                "--device", "cuda", "--memory", "80GB"]) == 0
    assert "optimizer state (Muon + AdamW)" in capsys.readouterr().out


def test_activation_checkpointing_keeps_only_block_inputs():
    p = _plan(1)
    none, blocks = p.activations("none"), p.activations("blocks")
    assert blocks < none / 4
    for ck in ("none", "blocks"):  # linear in the micro-batch, plus a fixed part (the loss's gradient buffer)
        a2, a4, a8 = (p.activations(ck, micro_batch=b) for b in (2, 4, 8))
        assert a8 - a4 == pytest.approx(2 * (a4 - a2), abs=8) and a2 - (a4 - a2) > 0


def test_largest_micro_batch_fits_and_the_next_one_does_not():
    p = dataclasses.replace(_plan(2, parallel="fsdp"), memory=12 * memory.GiB)
    for ck in ("none", "blocks"):
        b = p.largest_micro_batch(ck)
        assert b and p.rows_per_process % b == 0 and p.fits(ck, b)
        bigger = [d for d in range(b + 1, p.rows_per_process + 1) if p.rows_per_process % d == 0]
        assert all(not p.fits(ck, d) for d in bigger)
    assert p.largest_micro_batch("blocks") > p.largest_micro_batch("none")


@pytest.mark.parametrize("text,n", [("80GB", 80 << 30), ("40GiB", 40 << 30), ("512MB", 512 << 20), ("1.5T", int(1.5 * (1 << 40)))])
def test_parse_bytes(text, n):
    assert memory.parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["", "lots", "-1GB", "80XB", "0"])
def test_parse_bytes_refuses_with_the_flag(bad):
    with pytest.raises(GptrainError, match="--memory"):
        memory.parse_bytes(bad)


def test_plan_command_prints_the_table_without_data_or_a_gpu(capsys):
    assert cli(["train", "--preset", "gpt3-6.7b", "--plan", "--plan-world-size", "8", "--device", "cuda",
                "--memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "fsdp over 8 processes (8 shards)" in out and "6,658.6M parameters" in out
    assert "bf16 compute, fp32 reduce" in out and "checkpointing blocks (this run): micro-batch 8 fits" in out
    for row in ("parameters", "gradients", "optimizer state (AdamW)", "activations (micro-batch 8)", "total"):
        assert row in out
    assert cli(["train", "--preset", "gpt2-1558m", "--plan", "--plan-world-size", "8", "--device", "cuda",
                "--memory", "40GB"]) == 0
    assert "checkpointing none (this run): micro-batch 8 does not fit; largest micro-batch that fits: 2" in \
        capsys.readouterr().out


def test_a_run_that_does_not_fit_stops_before_its_first_step_naming_the_flag():
    """--memory makes the check happen on the CPU too (on CUDA the GPU's memory is the default)."""
    model = GPT(preset("tiny", n_layer=1, n_embd=32, n_head=2))
    cfg = small_cfg(micro_batch_size=8, seq_len=16, total_batch_size=8 * 16 * 2)
    p = memory.plan_for(model.config, cfg, 1, "cpu")
    between = (p.total(micro_batch=4) + p.total(micro_batch=8)) / 2 / memory.USABLE  # 4 fits, 8 does not

    def build(mem_bytes):
        return Trainer(dataclasses.replace(cfg, memory=f"{mem_bytes / (1 << 20):.3f}MB"), model,
                       SeqLoader(tokens(), 8, 16))

    with pytest.raises(GptrainError) as e:
        build(between)
    msg = str(e.value)
    assert "\n" not in msg and "the memory plan needs" in msg and "use --micro-batch-size 4 (the largest" in msg
    with pytest.raises(GptrainError, match="--parallel fsdp"):  # nothing fits: say what else to change
        build(p.total(micro_batch=1) * 0.9)
    assert build(p.total() / memory.USABLE + 1).plan.fits()


def test_host_ram_is_memavailable_capped_by_a_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert memory._host_available(str(meminfo), str(cg)) == 20000000 * 1024  # no cgroup files: RAM alone
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("123\n")
    assert memory._host_available(str(meminfo), str(cg)) == 20000000 * 1024  # unlimited cgroup
    (cg / "memory.max").write_text(f"{8 << 30}\n")
    (cg / "memory.current").write_text(f"{1 << 30}\n")
    assert memory._host_available(str(meminfo), str(cg)) == 7 << 30  # the container's remaining limit is lower
    assert memory._host_available(str(tmp_path / "absent"), str(cg)) is None  # not Linux: no check


def test_cpu_run_beyond_the_ram_stops_at_once_naming_the_flags(monkeypatch, tmp_path, capsys):
    """Without --preset a run is GPT-2 124M at micro-batch 64: on a CPU with 8 GiB free it must stop before it
    allocates anything (it used to be killed by the kernel minutes in, without a word), and say what fits."""
    monkeypatch.setattr(memory, "_host_available", lambda: 8 << 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    data = tmp_path / "data"  # train needs real data before it builds the trainer
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question.\n" * 9000)
    assert cli(["prepare", str(tmp_path / "t.txt"), "--out", str(data)]) == 0
    capsys.readouterr()
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu",
                "--eval-every", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gptrain: error: the memory plan needs") and "of the 8.00 GiB available (RAM" in err
    assert "use --micro-batch-size" in err and "--preset tiny" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes of this node share the RAM
    assert memory.detected_memory("cpu") == (2 << 30, "RAM available now, shared by 4 processes")


def test_fsdp_plan_charges_no_compiled_logits_and_reduce_scatter_every_keeps_only_the_shard():
    fsdp = _plan(4, parallel="fsdp", compile=True)
    eager = _plan(4, parallel="fsdp", compile=False)
    assert fsdp.activations() == eager.activations()  # FSDP never compiles the root, where the loss is
    ddp = _plan(4, parallel="ddp", compile=True)
    assert ddp.activations() > _plan(4, parallel="ddp", compile=False).activations()  # DDP compiles the loss
    n, unit = fsdp.n_params, fsdp._largest_unit()
    assert fsdp.accumulation == 2
    assert fsdp.grads(reduce_scatter="last") == int(4 * n / 4 + 4 * n + 4 * unit)  # every unsharded fp32 grad
    assert fsdp.grads(reduce_scatter="every") == int(4 * n / 4 + 2 * 4 * unit)  # the shard, one unit in flight
    auto = dataclasses.replace(fsdp, memory=None)
    assert auto.reduce_scatter == "auto" and auto.reduce_scatter_mode() == "last"  # memory unknown: no reason to
    tight = dataclasses.replace(fsdp, memory=int(fsdp._total(None, None, "every") / memory.USABLE) + 1)
    assert tight._total(None, None, "last") > tight.usable
    assert tight.reduce_scatter_mode() == "every" and tight.fits()  # auto chooses it when only that fits
    roomy = dataclasses.replace(fsdp, memory=64 * memory.GiB)
    assert roomy.reduce_scatter_mode() == "last"


def test_the_issues_gpt3_6_7b_plan(capsys):
    """`gptrain train --preset gpt3-6.7b --parallel fsdp --plan --plan-world-size 8 --memory 80GB
    --activation-checkpointing blocks --device cuda`: the figures README quotes."""
    from gptrain.cli import main
    assert main(["train", "--preset", "gpt3-6.7b", "--parallel", "fsdp", "--plan", "--plan-world-size", "8",
                 "--memory", "80GB", "--activation-checkpointing", "blocks", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan for CUDA: 32L/32H/4096C") and "Blocks compiled" in out
    rows = {line.split("  ")[1].strip(): line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["parameters"][-2:] == ["5.02", "GiB"]  # bf16 gathered by FSDP, not autocast's copies
    assert rows["optimizer state (AdamW)"][-2:] == ["6.20", "GiB"]
    assert ("checkpointing blocks (this run): micro-batch 8 fits (reduce-scatter last); largest micro-batch that "
            "fits: 32 (accumulation 4, reduce-scatter every); reduce-scatter on the last micro-step only: 16") in out


def test_memory_without_device_says_which_device_it_planned_for(capsys):
    from gptrain.cli import main
    assert main(["train", "--preset", "gpt2-124m", "--plan", "--memory", "16GB", "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert "note: planned for" in out and "--device cuda" in out
    from conftest import ROOT
    readme = " ".join((ROOT / "README.md").read_text().split())
    cfg = resolve("gpt3-6.7b", {"parallel": "fsdp", "micro_batch_size": 32, "activation_checkpointing": "blocks",
                                "memory": "80GB"})
    total = memory.plan_for(preset("gpt3-6.7b"), cfg, 8, "cuda").total()
    assert (f"the largest micro-batch is 32 with a reduce-scatter every micro-step ({total / memory.GiB:.1f} GiB of "
            "72.0), 16 with one per step") in readme
