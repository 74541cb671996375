"""Rewrite the README's figures that come from `gptrain train --plan` (the memory plan), so they cannot drift.

Each figure lives between `<!-- plan:NAME -->` and `<!-- /plan:NAME -->` in README.md and is computed here with
the code `--plan` prints from (gptrain.train.memory: the same config resolution, the same Plan). After changing
the plan's formulas or a preset, run

    python scripts/readme_figures.py            # rewrites README.md in place
    python scripts/readme_figures.py --check    # exit 1 naming the stale blocks (tests/test_readme_figures.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptrain.train.memory import GiB, gib, plan_for  # noqa: E402

README = ROOT / "README.md"
WORLD = 8  # the recipes' GPUs
_BLOCK = re.compile(r"(<!-- plan:(?P<name>[\w.-]+) -->)(?P<body>.*?)(<!-- /plan:(?P=name) -->)", re.S)


def config(flags: str):
    """The TrainConfig of `gptrain train FLAGS` (the parser and preset resolution the command uses)."""
    from gptrain.cli import build_parser
    from gptrain.config import overrides_from_args
    from gptrain.train.config import TrainConfig, resolve
    args = build_parser("train").parse_args(["train", *flags.split()])
    return resolve(args.preset, overrides_from_args(args, TrainConfig))


def plan(flags: str, world: int = WORLD, device: str = "cuda"):
    """The Plan `gptrain train FLAGS --plan --plan-world-size WORLD --device DEVICE` prints."""
    from gptrain.train.command import model_config
    cfg = config(flags)
    return plan_for(model_config(cfg), cfg, world, device)


def _g(n: float) -> str:
    return f"{n / GiB:.2f}"


def state(p) -> float:
    return p.params() + p.grads() + p.optimizer()


def largest(p, checkpointing: str | None = None) -> str:
    """'largest micro-batch B (X GiB, accumulation A)', or why none fits."""
    b = p.largest_micro_batch(checkpointing)
    if b is None:
        return f"no micro-batch fits ({_g(state(p))} GiB of parameters, gradients and AdamW state alone)"
    return f"largest micro-batch {b} ({_g(p.total(checkpointing, b))} GiB, accumulation {p.rows_per_process // b})"


def steps_of(p) -> str:
    tokens = p.rows_per_process * p.seq_len * p.world_size
    return f"{tokens / (1 << 20):g}M-token steps"


# (model and GPUs, memory, flags; "{b}" is the largest micro-batch that fits; alternatives: (words, extra flags))
RECIPES = [
    ("GPT-2 XL 1.5B", "40GB", "--preset gpt2-1558m --parallel fsdp --activation-checkpointing blocks "
                              "--micro-batch-size {b}",
     [("without checkpointing", "--activation-checkpointing none"),
      ("DDP without checkpointing", "--parallel ddp --activation-checkpointing none")]),
    ("GPT-2 XL 1.5B", "80GB", "--preset gpt2-1558m", [("`--parallel fsdp`", "--parallel fsdp")]),
    ("GPT-3 XL 1.3B", "80GB", "--preset gpt3-1.3b", []),
    ("GPT-3 6.7B", "80GB", "--preset gpt3-6.7b",
     [("without checkpointing", "--activation-checkpointing none"),
      ("DDP", "--parallel ddp")]),
]


def recipe_row(model: str, memory: str, flags: str, alternatives) -> str:
    base = f"{flags} --memory {memory}"
    if "{b}" in flags:
        b = plan(base.format(b=1)).largest_micro_batch()
        flags, base = flags.format(b=b), base.format(b=b)
    p = plan(base)
    how = ("FSDP" if p.parallel == "fsdp" else "DDP") + (" + activation checkpointing" if p.checkpointing == "blocks"
                                                          else "")
    fits = "" if p.fits() else f" **does not fit: {largest(p)}**"
    cell = (f"{_g(p.total())} GiB of {_g(p.usable)} (params {_g(p.params())}, grads {_g(p.grads())}, AdamW "
            f"{_g(p.optimizer())}, activations {_g(p.activations())}); accumulation {p.accumulation}{fits}")
    for words, extra in alternatives:
        cell += f". {words[0].upper() + words[1:]}: {largest(plan(f'{base} {extra}'))}"
    return (f"| {model}, {WORLD} × {memory[:-2]} GB | `{flags}` ({how}, micro-batch {p.micro_batch}, "
            f"T={p.seq_len}, {steps_of(p)}) | {cell} |")


def block_recipes() -> str:
    rows = ["| model, GPUs | flags | plan per GPU (90% limit) |", "|---|---|---|"]
    rows += [recipe_row(*r) for r in RECIPES]
    return "\n" + "".join(f"  {r}\n" for r in rows) + "\n  "  # a table inside a list item, then a blank line


def block_grads_6_7b() -> str:
    return f"{_g(plan('--preset gpt3-6.7b').grads())} GiB for 6.7B on {WORLD} GPUs"


def block_default_run() -> str:
    bf16, fp32 = (plan(f"--dtype {d}", world=1, device="cpu").total() for d in ("bfloat16", "float32"))
    return f"{_g(bf16)} GiB in bf16, {_g(fp32)} GiB in float32"


def block_error_example() -> str:
    """The line a run that does not fit stops with (memory.require_fit's own), for GPT-2 XL under DDP on 40 GB."""
    from types import SimpleNamespace
    from gptrain.errors import GptrainError
    from gptrain.train.memory import require_fit
    from gptrain.train.command import model_config
    cfg = config("--preset gpt2-1558m --memory 40GB")
    try:
        require_fit(model_config(cfg), cfg, SimpleNamespace(device="cuda", device_type="cuda", world_size=WORLD))
    except GptrainError as e:
        return f"`` gptrain: error: {e} ``"
    raise SystemExit("README.md's error example fits now: choose another for plan:error-example")


BLOCKS = {"recipes": block_recipes, "grads-6.7b": block_grads_6_7b, "default-run": block_default_run,
          "error-example": block_error_example}


def render(text: str) -> str:
    """`text` with every plan block recomputed; a block this script does not know is an error."""
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"README.md: unknown block plan:{name} (known: {', '.join(BLOCKS)})")
        return f"{m.group(1)}{BLOCKS[name]()}{m.group(4)}"
    return _BLOCK.sub(fill, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only say whether README.md is current (exit 1 if not)")
    args = ap.parse_args()
    text = README.read_text()
    new = render(text)
    found = {m.group("name") for m in _BLOCK.finditer(text)}
    if missing := set(BLOCKS) - found:
        print(f"README.md lacks the blocks {sorted(missing)}", file=sys.stderr)
        return 1
    if args.check:
        stale = [m.group("name") for m, n in zip(_BLOCK.finditer(text), _BLOCK.finditer(new)) if m.group() != n.group()]
        if stale:
            print(f"README.md is stale in {stale}: run python scripts/readme_figures.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print("README.md: plan figures updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
