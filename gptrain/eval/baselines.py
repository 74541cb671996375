"""Published reference numbers, printed beside every evaluation and drawn as lines in `gptrain report`.

Sources: OpenAI GPT-2 checkpoints scored with the lecture's completion-style HellaSwag rule on all 10,042 validation
examples and with the EleutherAI harness's multiple-choice rule; GPT-3 Small from the GPT-3 paper (Brown et al.
2020, table 3.7 / appendix H, zero-shot); GPT-2 124M validation loss on FineWeb-EDU sample-10BT (first shard), as
the reference lecture reports it.
"""

from __future__ import annotations

import json

GPT2_124M_VAL_LOSS = 3.2924  # FineWeb-EDU validation loss of OpenAI's GPT-2 124M
GPT2_124M_HELLASWAG = 0.2955  # acc_norm, lecture-style scoring
GPT3_SMALL_HELLASWAG = 0.337  # GPT-3 paper, 125M

# name -> {metric: value}; a missing metric was not published.
HELLASWAG = {
    "GPT-2 124M (OpenAI)": {"acc": 0.2859, "acc_norm": GPT2_124M_HELLASWAG},
    "GPT-2 XL 1558M (OpenAI)": {"acc_norm": 0.4893},
    "GPT-3 Small 125M (paper)": {"acc_norm": GPT3_SMALL_HELLASWAG},
}
HELLASWAG_HARNESS = {  # lm-eval's `hellaswag` task (preprocessed text, acc_norm by byte length)
    "GPT-2 124M (OpenAI)": {"acc": 0.2892, "acc_norm": 0.3114},
}
VAL_LOSS = {"GPT-2 124M (OpenAI)": {"val_loss": GPT2_124M_VAL_LOSS}}
HARNESS_TASKS = {"hellaswag": HELLASWAG_HARNESS}  # lm-eval task name -> its baselines


def val_loss_comparable(source: dict | None) -> bool:
    """Whether a loss on data from `source` (a manifest's "source") compares with GPT2_124M_VAL_LOSS: FineWeb-EDU only."""
    return "fineweb-edu" in json.dumps(source).lower()


def table(title: str, rows: dict[str, dict[str, float]], metrics: list[str]) -> str:
    """A plain-text table: one row per model, one column per metric, '-' where a number was not published."""
    width = max(len(name) for name in rows) + 2
    lines = [title, " " * width + "".join(f"{m:>10}" for m in metrics)]
    for name, values in rows.items():
        cells = "".join(f"{values[m]:>10.4f}" if m in values else f"{'-':>10}" for m in metrics)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)
