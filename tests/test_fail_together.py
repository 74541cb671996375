"""A failure on one rank stops every rank within seconds, with the same one-line error (gptrain.train.together):
2 CPU processes over gloo, a failure injected on one of them in the HellaSwag download, a rank's read of it, rank
0's metrics write and rank 0's checkpoint write. The process groups' timeout is 1 minute here, so a rank left
waiting would take over 60 s: the test asks for 30."""

import errno
import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from gptrain.errors import GptrainError
from gptrain.model import GPT, GPTConfig
from gptrain.train import distributed, together
from test_train import SeqLoader, _free_port, small_cfg, tokens

SCENARIOS = ("download", "read", "metrics", "checkpoint")


def _inject(scenario, rank, tmp):
    """The failure, on one rank only."""
    from gptrain.eval import hellaswag
    from gptrain.train import metrics
    from gptrain.train.checkpoint import checkpointer
    if scenario == "download" and rank == 0:
        def fail(*a, **k):
            raise GptrainError("downloading HellaSwag from https://example.invalid failed (Name or service not known)")
        hellaswag.fetch = fail
    if scenario == "read" and rank == 1:
        def fail(*a, **k):
            raise OSError(errno.EIO, "Input/output error")
        hellaswag.read_jsonl = fail
    if scenario == "metrics" and rank == 0:
        def fail(self, event):
            raise OSError(errno.EIO, "Input/output error", str(tmp / "run" / "metrics.jsonl"))
        metrics.MetricsLog.log = fail
    if scenario == "checkpoint" and rank == 0:
        def fail(*a, **k):
            raise OSError(errno.EIO, "Input/output error", str(tmp / "run" / "checkpoints"))
        checkpointer._write_json = fail  # rank 0's part of every save


def _worker(rank, world, port, scenario, tmp):
    from pathlib import Path
    tmp = Path(tmp)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GPTRAIN_CACHE=str(tmp / "cache"))
    torch.set_num_threads(1)
    env = distributed.setup("cpu", "ddp", timeout_min=1)
    outcome = {"error": None}
    try:
        _inject(scenario, rank, tmp)
        cfg = small_cfg(out=str(tmp / "run"), max_steps=3, save_every=2, hellaswag_data="auto", total_batch_size=64)
        t0 = time.monotonic()
        try:
            if scenario in ("download", "read"):
                if scenario == "read":  # a good file that rank 1 cannot read
                    example = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}
                    (tmp / "hs.jsonl").write_text(json.dumps(example) + "\n")
                    cfg = small_cfg(hellaswag_data=str(tmp / "hs.jsonl"))
                from gptrain.train.command import _load_hellaswag
                _load_hellaswag(cfg)
            else:
                from gptrain.train.trainer import Trainer
                torch.manual_seed(0)
                model = GPT(GPTConfig(block_size=32, vocab_size=1024, n_layer=1, n_head=2, n_embd=32))
                trainer = Trainer(cfg, model, SeqLoader(tokens(vocab=1024), 2, 16, rank, world), env=env)
                try:
                    trainer.run()
                finally:
                    trainer.wrapped.release()
        except GptrainError as e:
            outcome = {"error": str(e), "type": type(e).__name__}
        outcome["seconds"] = time.monotonic() - t0
    finally:
        (tmp / f"rank{rank}.json").write_text(json.dumps(outcome))
        distributed.teardown()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_one_rank_fails_every_rank_stops_with_the_same_line(tmp_path, scenario):
    t0 = time.monotonic()
    ctx = mp.start_processes(_worker, args=(2, _free_port(), scenario, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    while not ctx.join(timeout=5):
        assert time.monotonic() - t0 < 180, "the ranks are still waiting"
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert out[0]["error"] and out[0]["error"] == out[1]["error"], out
    assert "\n" not in out[0]["error"]
    assert all(o["seconds"] < 30 for o in out), out
    expected = {"download": "downloading HellaSwag from https://example.invalid failed",
                "read": "rank 1: reading HellaSwag failed: OSError: [Errno 5] Input/output error",
                "metrics": "writing", "checkpoint": "Input/output error"}[scenario]
    assert expected in out[0]["error"], out[0]["error"]


def test_single_process_keeps_the_original_exception():
    """Without a process group both helpers are plain calls: the error is the action's own (its type too)."""
    def fail():
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        together.on_rank0(fail, "writing x")
    with pytest.raises(OSError):
        together.together(fail, "writing x")
    assert together.on_rank0(lambda: 7, "x") == 7 and together.together(lambda: 8, "x") == 8
