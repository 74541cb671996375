"""The recipe sweep behind `tiny-fast` and `gpt2-124m-fast`: which optimizer, learning rates and schedule reach
the current recipe's final validation loss in the fewest tokens, with the model kept GPT-2 exactly.

The current recipe is `--preset tiny` (AdamW, cosine to 10%, warm-up 40, lr 2e-3, embedding 5x) trained for the
full budget; every candidate trains HALF that budget with its own schedule ending there, so a candidate whose final
val loss is at or below the baseline's reached it in at most 50% of the tokens. Two scales (the `tiny` model,
4L x 128, and 6L x 256 with the same recipe), two corpora (the shipped Shakespeare plays; English dialogue built
from ../shared/data: the hh-rlhf harmless-base dialogues' chosen text and the 100 OpenAssistant trees, never
HellaSwag). Val losses are deterministic at a fixed --threads whatever the machine's load, so runs go in parallel,
one thread each (--jobs 2 --threads 1 on two cores). A finished run is not trained again: rerunning the script
prints the table from the runs' metrics.jsonl (add runs to the grid, rerun, only the new ones train).

    python benchmarks/recipe_sweep.py --root runs/sweep --jobs 2 --threads 1            # everything in GRID
    python benchmarks/recipe_sweep.py --root runs/sweep --only 'tiny/shakespeare/*'     # some runs (fnmatch)
    python benchmarks/recipe_sweep.py --root runs/sweep --table                         # table only, trains nothing
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # --shared-data for a clone elsewhere

# scale -> flags on top of --preset tiny
SCALES = {"tiny": [], "6x256": ["--n-layer", "6", "--n-embd", "256", "--n-head", "4"]}
CORPORA = ("shakespeare", "dialogue")

MUON = ["--optimizer", "muon"]
LIN0 = ["--schedule", "linear", "--min-lr-ratio", "0"]
# candidate name -> flags, trained for half the baseline's steps; "base" is the current recipe at the full budget.
CANDIDATES = {
    "base": [],
    "adamw-cosine": [],
    "adamw-linear0": LIN0,
    "muon.02-cosine": MUON + ["--muon-lr", "0.02"],
    "muon.02-linear0": MUON + ["--muon-lr", "0.02"] + LIN0,
    "muon.04-linear0": MUON + ["--muon-lr", "0.04"] + LIN0,
    "muon.01-linear0": MUON + ["--muon-lr", "0.01"] + LIN0,
}
FAST = "muon.02-linear0"  # the finalist (tiny-fast's choices)

# (scale, corpus, the baseline's steps, recipes, seeds), in the order they train. The session that chose tiny-fast
# had two cores shared by six agents (load 8-20: a tiny step took 1-4.5 s at one thread), so the grid is small:
# the finalist against the baseline first, on every cell; the other candidates on the first cell after.
PLAN = [
    ("tiny", "shakespeare", 1000, ["base", FAST, "muon.02-cosine"], (1337,)),
    ("tiny", "shakespeare", 1000, ["base", FAST], (42,)),
    ("tiny", "shakespeare", 2000, [FAST, "base"], (1337,)),  # the demo's budget: tiny-fast in 1,000 steps
    ("tiny", "dialogue", 600, ["base", FAST], (1337,)),
    ("6x256", "shakespeare", 300, ["base", FAST], (1337,)),
    ("6x256", "dialogue", 300, ["base", FAST], (1337,)),
    ("6x256", "shakespeare", 300, ["muon.02-cosine"], (1337,)),  # the 6L x 256 cells' short fall: try cosine
    ("6x256", "dialogue", 300, ["muon.02-cosine"], (1337,)),
    ("tiny", "dialogue", 600, ["base", FAST], (42,)),
    ("6x256", "shakespeare", 300, ["base", FAST], (42,)),
    ("6x256", "dialogue", 300, ["base", FAST], (42,)),
    ("tiny", "shakespeare", 1000, ["muon.04-linear0", "adamw-linear0", "muon.01-linear0", "adamw-cosine"], (1337,)),
    # session 9 (two helpers editing code beside it): 6L x 256 at a budget where warm-up is not a quarter of the
    # candidate's run; the fast recipe wins on both corpora and seeds
    ("6x256", "shakespeare", 800, ["base", FAST, "muon.04-linear0"], (1337,)),
    ("6x256", "dialogue", 800, ["base", FAST, "muon.04-linear0"], (1337,)),
    ("6x256", "shakespeare", 800, ["base", FAST], (42,)),
    ("6x256", "dialogue", 800, ["base", FAST], (42,)),
]


def grid() -> list[tuple[str, list[str], int]]:
    """(name scale/corpus/budget/recipe/seed, flags, steps) of every run in PLAN."""
    runs = []
    for scale, corpus, budget, recipes, seeds in PLAN:
        for seed in seeds:
            for r in recipes:
                steps = budget if r == "base" else budget // 2
                runs.append((f"{scale}/{corpus}/{budget}/{r}/{seed}", SCALES[scale] + CANDIDATES[r], steps))
    return runs


def dialogue_jsonl(path: Path, shared: Path) -> Path:
    """English dialogue as one document a line: each hh-rlhf harmless-base test dialogue's chosen text, then each
    OpenAssistant tree's messages depth-first (written once)."""
    if path.exists():
        return path

    def walk(node):
        yield node["text"]
        for r in node.get("replies", []):
            yield from walk(r)

    docs = [json.loads(line)["chosen"].strip() for line in
            gzip.open(shared / "sft" / "hh-rlhf_harmless-base_test.jsonl.gz", "rt", encoding="utf-8")]
    for line in open(shared / "sft" / "oasst_en_100_tree.jsonl", encoding="utf-8"):
        tree = json.loads(line)
        docs.append("\n\n".join(walk(tree["prompt"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tmp.replace(path)
    return path


def prepare(root: Path, corpus: str, shared: Path = SHARED) -> Path:
    out = root / "data" / corpus
    if not (out / "manifest.json").exists():
        source = "shakespeare" if corpus == "shakespeare" else str(dialogue_jsonl(root / "data" / "dialogue.jsonl", shared))
        subprocess.run([sys.executable, "-m", "gptrain", "prepare", source, "--out", str(out)], check=True)
    return out


def final_val(run: Path) -> tuple[float | None, int | None]:
    """(val loss at the run's last step, that step); (None, None) before it finishes."""
    try:
        cfg = json.loads((run / "config.json").read_text())["train"]
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    except (OSError, ValueError, KeyError):
        return None, None
    vals = [r for r in rows if "val_loss" in r and r["step"] == cfg["max_steps"]]
    return (vals[-1]["val_loss"], cfg["max_steps"]) if vals else (None, None)


def train(root: Path, name: str, flags: list[str], steps: int, threads: int) -> None:
    scale, corpus, budget, cand, seed = name.split("/")
    out = root / "runs" / name.replace("/", "-")
    if final_val(out)[0] is not None:
        return
    log = root / "logs" / (name.replace("/", "-") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gptrain", "train", "--preset", "tiny", "--data", str(root / "data" / corpus),
           "--out", str(out), "--max-steps", str(steps), "--seed", seed, "--threads", str(threads),
           "--dtype", "bfloat16", "--eval-every", str(steps // 4), "--sample-every", "0", "--save-every", "0",
           "--keep-last", "1", "--log-every", "100", "--resume", "auto", *flags]
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
                            ).returncode
    print(f"{name}: rc {rc}, {time.time() - t0:.0f} s, val {final_val(out)[0]}", flush=True)


def table(root: Path, runs) -> str:
    """One row per (scale, corpus, budget, recipe): final val loss per seed, and its difference from the baseline
    of the same seed (negative: the recipe reached the baseline's final loss in half its tokens, or fewer)."""
    seeds = sorted({name.split("/")[4] for name, _, _ in runs}, key=lambda x: -int(x) if x == "1337" else int(x))
    lines = [f"| scale | corpus | recipe | steps | tokens | {' | '.join('seed ' + s for s in seeds)} "
             "| minus the baseline (same seed) |", "|---|---|---|---|---|" + "---|" * len(seeds) + "---|"]
    cells: dict = {}
    for name, _, steps in runs:
        scale, corpus, budget, cand, seed = name.split("/")
        val = final_val(root / "runs" / name.replace("/", "-"))[0]
        cells.setdefault((scale, corpus, budget, cand), {"steps": steps})[seed] = val
    for (scale, corpus, budget, cand), c in cells.items():
        base = cells.get((scale, corpus, budget, "base"), {})
        diffs = [f"{c[s] - base[s]:+.4f}" for s in seeds
                 if cand != "base" and c.get(s) is not None and base.get(s) is not None]
        vals = " | ".join("—" if c.get(s) is None else f"{c[s]:.4f}" for s in seeds)
        lines.append(f"| {scale} | {corpus} | {cand} | {c['steps']} | {c['steps'] * 1024:,} | {vals} "
                     f"| {' / '.join(diffs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/sweep", help="data, runs and logs go here")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (val losses depend on it)")
    ap.add_argument("--only", nargs="+", default=["*"], help="fnmatch patterns over run names "
                                                             "scale/corpus/budget/recipe/seed")
    ap.add_argument("--shared-data", type=Path, default=SHARED, help="the project's ../shared/data (dialogue corpus)")
    ap.add_argument("--table", action="store_true", help="print the table of what has finished; train nothing")
    args = ap.parse_args()
    root = Path(args.root)
    runs = [r for r in grid() if any(fnmatch.fnmatch(r[0], pat) for pat in args.only)]
    if not args.table:
        for corpus in sorted({r[0].split("/")[1] for r in runs}):
            prepare(root, corpus, args.shared_data)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: train(root, r[0], r[1], r[2], args.threads), runs))
    print(table(root, runs))


if __name__ == "__main__":
    main()
