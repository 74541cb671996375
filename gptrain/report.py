"""The `report` command: a run's losses and HellaSwag against steps and tokens, beside the GPT-2/GPT-3 baselines.

`gptrain report RUN [RUN ...] [--out DIR]` writes DIR/report.png (loss and HellaSwag panels, against optimizer steps
and against training tokens when the run's config gives tokens per step; several runs overlaid) and DIR/report.md
(per run: config, throughput, best val loss, latest HellaSwag, latest samples). The reference lines are the ones
the lecture's notebook draws: OpenAI GPT-2 124M's validation loss and HellaSwag, and GPT-3 Small's HellaSwag.

A RUN (or a `--compare LOG`) may also be an llm.c run: its main.log or printed output (gptrain/llmc.py reads it),
drawn on the same panels so the two trainers compare on one plot.

It reads RUN/metrics.jsonl and RUN/config.json as the trainer writes them, and works while a run is still going:
a line that does not parse (the partial last line of a run being written, or one cut by a crash before a resume)
is skipped and counted. After a resume the later record of a step replaces the earlier one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gptrain import llmc
from gptrain.errors import GptrainError, require
from gptrain.eval import baselines


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    train: dict[int, dict] = field(default_factory=dict)  # step -> step record
    evals: dict[int, dict] = field(default_factory=dict)  # step -> merged evaluation record(s)
    samples: dict | None = None  # the latest {"step", "samples"} record
    skipped_lines: int = 0

    @property
    def tokens_per_step(self) -> int | None:
        return (self.config.get("train") or self.config).get("total_batch_size")

    @property
    def on_fineweb_edu(self) -> bool:
        """Whether the published GPT-2 val loss (measured on FineWeb-EDU) is comparable with this run's."""
        return baselines.val_loss_comparable(self.config.get("data_source"))

    def series(self, records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
        pts = sorted((s, r[key]) for s, r in records.items() if isinstance(r.get(key), (int, float)))
        return [s for s, _ in pts], [v for _, v in pts]


def load_run(path: str | Path, tokens_per_step: int | None = None) -> Run:
    """A gptrain run directory, or an llm.c log (`tokens_per_step`: its total batch size, which it does not record)."""
    path = Path(path)
    if (log := llmc.log_file(path)) is not None:
        train, evals = llmc.read_log(log)
        config = {"train": {"total_batch_size": tokens_per_step}} if tokens_per_step else {}
        return Run(f"llm.c {log.parent.resolve().name}/{log.name}", log, config, train, evals)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise GptrainError(f"{path} has no metrics.jsonl; pass a run directory written by `gptrain train --out RUN` "
                           "or an llm.c log (main.log, or its printed output saved to a file)")
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError:
            config = {}  # being rewritten right now, or damaged: the plots do not need it
    run = Run(path.resolve().name, path, config)
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                run.skipped_lines += bool(line.strip())
                continue
            if "samples" in rec:
                run.samples = rec
            elif "train_loss" in rec:
                run.train[step] = rec
            elif any(k in rec for k in ("val_loss", "hellaswag_acc", "hellaswag_acc_norm")):
                run.evals.setdefault(step, {}).update(rec)
    return run


# ---------------------------------------------------------------- plots

def plot(runs: list[Run], out: Path) -> Path:
    mpl = require("matplotlib", "gptrain report")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    with_tokens = all(r.tokens_per_step for r in runs)
    axes_x = [("steps", lambda r, s: s)] + ([("tokens", lambda r, s: [x * r.tokens_per_step for x in s])]
                                             if with_tokens else [])
    # sharex by row: a HellaSwag panel with no points spans the run's steps (or tokens), not matplotlib's 0-1
    fig, axes = plt.subplots(len(axes_x), 2, figsize=(14, 5 * len(axes_x)), squeeze=False, sharex="row")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (xlabel, xmap) in zip(axes, axes_x):
        loss_ax, hs_ax = row
        shown = []
        for i, run in enumerate(runs):
            c = colors[i % len(colors)]
            label = f"{run.name} " if len(runs) > 1 else ""
            s, v = run.series(run.train, "train_loss")
            if s:
                loss_ax.plot(xmap(run, s), v, color=c, alpha=0.45, lw=0.8, label=f"{label}train loss")
                shown += v[len(v) // 50:]  # skip the first steps' ~11 so the interesting range fills the panel
            s, v = run.series(run.evals, "val_loss")
            if s:
                sparse, note = len(s) < 30, ""
                if sparse and len(s) > 1 and s[0] == 0:  # the untrained model's ~11 lies above the chart: a line
                    note, s, v = f" (step 0: {v[0]:.2f})", s[1:], v[1:]  # to it would be one long diagonal
                loss_ax.plot(xmap(run, s), v, color=c, lw=1 if sparse else 2, marker="o" if sparse else None,
                             ms=5, label=f"{label}val loss{note}")
                shown += [x for step, x in zip(s, v) if step > 0] or v  # the untrained model's ~11 too
            s, v = run.series(run.evals, "hellaswag_acc_norm")
            if s:
                sparse = len(s) < 30
                hs_ax.plot(xmap(run, s), v, color=c, lw=1 if sparse else 2, marker="o" if sparse else None, ms=5,
                           label=f"{label}HellaSwag acc_norm")
        if any(run.on_fineweb_edu for run in runs):  # the published number is a FineWeb-EDU loss
            loss_ax.axhline(baselines.GPT2_124M_VAL_LOSS, color="r", ls="--",
                            label=f"OpenAI GPT-2 (124M) checkpoint val loss ({baselines.GPT2_124M_VAL_LOSS})")
            shown.append(baselines.GPT2_124M_VAL_LOSS)
        if shown:
            loss_ax.set_ylim(0.95 * min(shown), 1.05 * max(shown))
        if not any(run.series(run.evals, "hellaswag_acc_norm")[0] for run in runs):
            hs_ax.text(0.5, 0.6, "no HellaSwag evaluations in this run\n(offline: gptrain eval hellaswag --model RUN "
                       "--data FILE,\nFILE: HellaSwag's val .jsonl[.gz]; or train with\n--hellaswag-data FILE, or auto "
                       "to download it)",
                       ha="center", va="center", transform=hs_ax.transAxes, color="0.4")
        hs_ax.axhline(baselines.GPT2_124M_HELLASWAG, color="r", ls="--",
                      label=f"OpenAI GPT-2 (124M) checkpoint ({baselines.GPT2_124M_HELLASWAG})")
        hs_ax.axhline(baselines.GPT3_SMALL_HELLASWAG, color="g", ls="--",
                      label=f"OpenAI GPT-3 (124M) checkpoint ({baselines.GPT3_SMALL_HELLASWAG})")
        hs_ax.axhline(0.25, color="0.6", ls=":", lw=1, label="chance (0.25)")
        for ax, title, ylabel in ((loss_ax, "Loss", "cross-entropy (nats per token)"),
                                  (hs_ax, "HellaSwag eval (acc_norm)", "acc_norm")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} vs {xlabel}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / "report.png"
    tmp = out / ".report.png.tmp"  # written aside and renamed, so a viewer never sees half a file
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(png)
    return png


# ---------------------------------------------------------------- summary

def _fmt(v, spec=".4f"):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def summarize(run: Run) -> str:
    cfg = run.config.get("train") or {}
    model = run.config.get("model") or {}
    lines = [f"## {run.name}", "", f"`{run.path}`", ""]
    if cfg or model:
        shape = (f"{model.get('n_layer')} layers, {model.get('n_head')} heads, width {model.get('n_embd')}, "
                 f"context {model.get('block_size')}" if model else "")
        lines += ["| setting | value |", "|---|---|"]
        for k, v in (("model", f"{cfg.get('model', '')} ({shape})" if shape else cfg.get("model")),
                     ("data", cfg.get("data")), ("tokens per step", cfg.get("total_batch_size")),
                     ("micro batch x seq len", f"{cfg.get('micro_batch_size')} x {cfg.get('seq_len')}"
                      if cfg.get("seq_len") else None),
                     ("GPUs/processes", run.config.get("world_size")), ("max lr", cfg.get("lr")),
                     ("steps", cfg.get("max_steps")), ("seed", cfg.get("seed"))):
            if v is not None:
                lines.append(f"| {k} | {v} |")
        lines.append("")
    steps = sorted(run.train)
    if steps:
        recent = [run.train[s] for s in steps[-50:]]
        tps = statistics.median(r["tokens_per_sec"] for r in recent if "tokens_per_sec" in r) \
            if any("tokens_per_sec" in r for r in recent) else None
        mfus = [r["mfu"] for r in recent if isinstance(r.get("mfu"), (int, float))]
        tail = [run.train[s]["train_loss"] for s in steps[-10:]]
        progress = f"{steps[-1] + 1}" + (f" / {cfg['max_steps']}" if cfg.get("max_steps") else "")
        if run.tokens_per_step:
            progress += f" ({(steps[-1] + 1) * run.tokens_per_step:,} tokens)"
        lines += [f"- steps done: {progress}",
                  f"- train loss (mean of the last {len(tail)} steps): {sum(tail) / len(tail):.4f}",
                  f"- throughput (median of the last {len(recent)} steps): {_fmt(tps, ',.0f')} tokens/s"
                  + (f", MFU {100 * statistics.median(mfus):.1f}%" if mfus else "")]
    s, v = run.series(run.evals, "val_loss")
    if s:
        best = min(range(len(v)), key=v.__getitem__)
        reference = f"; OpenAI GPT-2 124M: {baselines.GPT2_124M_VAL_LOSS}" if run.on_fineweb_edu else ""
        bpb = run.evals[s[-1]].get("val_bpb")
        lines.append(f"- best val loss: {v[best]:.4f} at step {s[best]} (latest {v[-1]:.4f} at step {s[-1]}"
                     f"{reference}); latest bits per byte: {_fmt(bpb)}")
    s, v = run.series(run.evals, "hellaswag_acc_norm")
    if s:
        acc = run.evals[s[-1]].get("hellaswag_acc")
        lines.append(f"- HellaSwag at step {s[-1]}: acc_norm {v[-1]:.4f}, acc {_fmt(acc)} (best acc_norm {max(v):.4f}; "
                     f"GPT-2 124M {baselines.GPT2_124M_HELLASWAG}, GPT-3 Small {baselines.GPT3_SMALL_HELLASWAG})")
    if run.skipped_lines:
        lines.append(f"- {run.skipped_lines} unreadable line(s) in metrics.jsonl skipped (a run still writing, or "
                     "a line cut by a crash)")
    if run.samples:
        lines += ["", f"Latest samples (step {run.samples['step']}):", ""]
        for text in run.samples.get("samples") or []:
            lines += ["```", str(text).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def report(run_dirs: list[str], out: str | None = None, compare: list[str] = (),
           compare_tokens_per_step: int | None = None) -> tuple[Path, Path]:
    """`compare` runs are overlaid on the same panels (an llm.c log among them or among `run_dirs` is a step per
    `compare_tokens_per_step` tokens, which llm.c's log does not record)."""
    runs = [load_run(p, compare_tokens_per_step) for p in [*run_dirs, *compare]]
    if not any(r.train or r.evals for r in runs):
        raise GptrainError(f"{', '.join(run_dirs)}: metrics.jsonl has no step or evaluation records yet; "
                           "run the report again once training has logged a step")
    if any(r.tokens_per_step for r in runs) and not all(r.tokens_per_step for r in runs):
        unknown = ", ".join(str(r.path) for r in runs if not r.tokens_per_step)
        print(f"note: {unknown} does not say how many tokens a step is, so the runs are drawn against steps only; "
              "--compare-tokens-per-step N (llm.c's -d, its total batch size) draws them against tokens too",
              file=sys.stderr)
    first = Path(run_dirs[0])
    out_dir = Path(out) if out else ((first.parent if first.is_file() else first) / "report" if len(run_dirs) == 1
                                     else Path("report"))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(runs, out_dir)
    md = out_dir / "report.md"
    text = "# Training report\n\n![losses and HellaSwag](report.png)\n\n" + "\n".join(summarize(r) for r in runs)
    tmp = md.with_name(".report.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(md)
    return png, md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (gptrain train --out RUN) or llm.c "
                        "logs (main.log, the directory of llm.c's -o, or train_gpt2's printed output); several are "
                        "overlaid")
    parser.add_argument("--compare", action="append", default=[], metavar="LOG",
                        help="overlay another run: llm.c's main.log (or its -o directory) or a gptrain run directory "
                             "(repeatable)")
    parser.add_argument("--compare-tokens-per-step", type=int, ge=1, metavar="N",
                        help="tokens per optimizer step of the llm.c logs (llm.c's -d), which their log does not "
                             "record; with it the runs are also drawn against tokens")
    parser.add_argument("--out", metavar="DIR", help="where to write report.png and report.md "
                        "(default: RUN/report for one run, ./report for several)")


def main(args: argparse.Namespace) -> int:
    if args.out:
        from gptrain.config import check_output_dir
        check_output_dir(args.out, "--out")
    png, md = report(args.runs, args.out, args.compare, args.compare_tokens_per_step)
    print(f"wrote {png} and {md}")
    return 0
