import json
import math

import pytest

pytest.importorskip("matplotlib")

from gptrain.cli import main as gptrain_main  # noqa: E402
from gptrain.errors import GptrainError  # noqa: E402
from gptrain.report import load_run, report  # noqa: E402


SHAKESPEARE = {"kind": "shakespeare", "name": "shakespeare"}
FINEWEB_EDU = {"kind": "hub", "path": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train"}


def write_run(path, steps, evals_every, hellaswag=True, partial_tail=True, tokens_per_step=2048, source=SHAKESPEARE):
    """A run directory as the trainer writes it: config.json and metrics.jsonl (step, eval and sample records)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "train": {"model": "tiny", "total_batch_size": tokens_per_step, "seq_len": 128, "micro_batch_size": 16,
                  "max_steps": 400, "lr": 3e-3, "data": "data/shakespeare", "seed": 0},
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}, "world_size": 1,
        "data_source": source}))
    lines = []
    for s in range(steps):
        lines.append({"step": s, "train_loss": 3.3 + 7.7 * math.exp(-s / 30), "lr": 3e-3, "grad_norm": 1.0,
                      "tokens_per_sec": 10000.0 + s})
        if s and s % evals_every == 0:
            ev = {"step": s, "val_loss": 3.4 + 7.6 * math.exp(-s / 30)}
            if hellaswag:
                ev.update(hellaswag_acc=0.25 + s / 4000, hellaswag_acc_norm=0.25 + s / 3000)
            lines.append(ev)
    lines.append({"step": steps - 1, "samples": ["To be, or not to be", "ROMEO: hello"]})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_tail:
        text += '{"step": 999, "train_lo'  # the trainer is writing this line right now
    (path / "metrics.jsonl").write_text(text)
    return path


def test_load_run_tolerates_a_partial_line_and_keeps_the_latest_record_of_a_step(tmp_path):
    run = write_run(tmp_path / "a", steps=120, evals_every=25)
    with open(run / "metrics.jsonl", "a") as f:  # a resume replays step 100 after the cut line
        f.write('\n{"step": 100, "val_loss": 2.5}\n')
    r = load_run(run)
    assert sorted(r.train) == list(range(120)) and r.skipped_lines == 1
    assert r.evals[100]["val_loss"] == 2.5 and r.evals[100]["hellaswag_acc_norm"] == pytest.approx(0.25 + 100 / 3000)
    assert r.samples["samples"][0] == "To be, or not to be"
    assert r.tokens_per_step == 2048


def test_report_overlays_two_runs_with_several_evaluations(tmp_path):
    a = write_run(tmp_path / "run_a", steps=300, evals_every=50)
    b = write_run(tmp_path / "run_b", steps=150, evals_every=30, hellaswag=False, partial_tail=False)
    out = tmp_path / "cmp"
    assert gptrain_main(["report", str(a), str(b), "--out", str(out)]) == 0
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1400, 1000)  # 2 x 2 panels: against steps and against tokens
    md = (out / "report.md").read_text()
    assert "## run_a" in md and "## run_b" in md
    best_a = min(3.4 + 7.6 * math.exp(-s / 30) for s in range(50, 300, 50))
    assert f"best val loss: {best_a:.4f} at step 250" in md
    assert "HellaSwag at step 250: acc_norm 0.3333" in md
    assert "To be, or not to be" in md and "1 unreadable line(s)" in md
    assert "| tokens per step | 2048 |" in md and "tokens/s" in md


def test_the_gpt2_val_loss_is_a_reference_only_for_fineweb_edu_runs(tmp_path):
    fw = write_run(tmp_path / "fw", steps=60, evals_every=20, source=FINEWEB_EDU)
    sh = write_run(tmp_path / "sh", steps=60, evals_every=20)
    assert load_run(fw).on_fineweb_edu and not load_run(sh).on_fineweb_edu
    _, md = report([str(fw), str(sh)], out=str(tmp_path / "both"))
    fw_part, sh_part = md.read_text().split("## sh")
    assert "OpenAI GPT-2 124M: 3.2924" in fw_part and "3.2924" not in sh_part


def test_report_default_out_and_a_run_without_records(tmp_path):
    run = write_run(tmp_path / "r", steps=5, evals_every=2)
    png, md = report([str(run)])
    assert png == run / "report" / "report.png" and md.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 0, "tr')
    with pytest.raises(GptrainError, match="no step or evaluation records yet"):
        report([str(empty)])
    with pytest.raises(GptrainError, match="has no metrics.jsonl"):
        report([str(tmp_path / "nowhere")])


def test_a_hellaswag_panel_without_points_spans_the_runs_steps_and_tokens(tmp_path, monkeypatch):
    import matplotlib.figure
    figs, real = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figs.append(fig), real(fig, *a, **k)))
    report([str(write_run(tmp_path / "r", steps=300, evals_every=50, hellaswag=False))])
    loss_s, hs_s, loss_t, hs_t = figs[0].axes
    assert hs_s.get_xlim() == loss_s.get_xlim() and hs_s.get_xlim()[1] >= 299  # steps, not matplotlib's 0-1
    assert hs_t.get_xlim() == loss_t.get_xlim() and hs_t.get_xlim()[1] >= 299 * 2048
    hint = " ".join(t.get_text() for t in hs_s.texts).replace("\n", " ")  # how to get points, offline too
    assert "gptrain eval hellaswag --model RUN --data FILE" in hint and "--hellaswag-data FILE" in hint
