"""The README's figures that commands print cannot drift: the memory-plan blocks are what
scripts/readme_figures.py computes now (run it after changing the plan or a preset), and that is what
`gptrain train --plan` prints."""

import importlib.util
import re
from pathlib import Path

import pytest

from gptrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def figures():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_plan_figures_are_what_the_code_computes_now():
    f = figures()
    text = README.read_text()
    assert {m.group("name") for m in f._BLOCK.finditer(text)} == set(f.BLOCKS)
    assert f.render(text) == text, "README.md's plan figures are stale: run python scripts/readme_figures.py"


@pytest.mark.parametrize("row", [0, 2])
def test_a_recipe_row_shows_what_plan_prints(row, capsys):
    f = figures()
    line = f.recipe_row(*f.RECIPES[row])
    assert line in README.read_text()
    flags = re.search(r"\| `([^`]+)`", line).group(1)  # the row's flags, the largest micro-batch filled in
    memory = f.RECIPES[row][1]
    assert main(["train", *flags.split(), "--memory", memory, "--plan", "--plan-world-size", "8",
                 "--device", "cuda"]) == 0
    printed = capsys.readouterr().out
    none, blocks = re.search(r"^  total\s+([\d.]+) GiB\s+([\d.]+) GiB$", printed, re.M).groups()
    total = none if f.config(flags).activation_checkpointing == "none" else blocks
    assert f"| {total} GiB of " in line


def test_the_quick_starts_model_is_the_tiny_preset():
    """README: "a 4-layer, 128-wide GPT-2 (7.2M parameters, 50,257-token vocabulary)", as `gptrain train` prints it."""
    from gptrain.model import GPT, preset
    model = GPT(preset("tiny"))
    c = model.config
    quoted = (f"a {c.n_layer}-layer, {c.n_embd}-wide GPT-2 ({model.num_params(padded=False) / 1e6:.1f}M parameters, "
              f"{c.vocab_size:,}-token vocabulary)")
    assert quoted in " ".join(README.read_text().split())
