"""gptrain against llm.c's own C code: run llm.c's `test_gpt2` (CPU) on a GPT-2 124M written by gptrain.

    python benchmarks/llmc_check.py --llmc PATH/TO/llm.c [--work DIR] [--seed 0] [--threads 2]

Needs a checkout of karpathy/llm.c (not part of gptrain) and gcc. In DIR it writes, from a randomly initialised
gptrain GPT-2 124M (`--seed`; no downloaded weights needed):
- gpt2_124M.bin (gptrain/llmc.py's writer: llm.c model file version 3) and gpt2_tokenizer.bin;
- gpt2_124M_debug_state.bin, llm.c's debug state as its train_gpt2.py `write_state` describes it: header (magic
  20240327, version 2, B, T), x and y (int32, B×T), gptrain's logits (float32, B×T×V), loss (float32), and
  gptrain's gradients of every parameter in the model file's order (wte's padded rows zero);
then compiles llm.c's test_gpt2.c (gcc -Ofast -march=native, OpenMP when available), runs it there and prints
what it printed beside gptrain's own numbers: the logits' and loss's agreement (llm.c checks them), each of the 16
gradient tensors' max difference (llm.c's tolerance 2e-2), and 10 AdamW steps (lr 1e-4, betas 0.9/0.999,
eps 1e-8, weight decay 0.01 on every tensor, as test_gpt2.c's update) against gptrain's losses with
torch.optim.AdamW. test_gpt2.c's own "OK = ..." per step compares with the losses of OpenAI's weights it has
hard-coded, which a random model does not have; the comparison that matters is the column against gptrain.

x and y are the first B·T+1 tokens of the shipped Shakespeare text, B=4, T=64 as test_gpt2's reference.

With `--train-data DIR` (a `gptrain prepare` directory with train_000000.bin and val_000000.bin) it also runs
llm.c's CPU trainer `train_gpt2.c` (41 steps of B=4, T=64, AdamW lr 1e-4, no weight decay; val loss on 5
batches every 10 steps; its model and data paths are fixed, so DIR's shards are linked where it looks) from a
gptrain `tiny` model (random, `--seed`), and `gptrain train` from the same exported file with the same batch,
learning rate, steps and validation tokens (gptrain's AdamW betas are the lecture's 0.9/0.95, llm.c's CPU
trainer's 0.9/0.999; the two data loaders shuffle differently), then `gptrain report` overlays the two
in WORK/train/report/report.png.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from gptrain import llmc
from gptrain.data.sources import resolve_source
from gptrain.model import GPT, preset
from gptrain.tokenizer import get_tokenizer

B, T = 4, 64
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    text = next(iter(resolve_source("shakespeare", "train", "text").documents()))
    ids = torch.tensor(get_tokenizer().encode(text)[: B * T + 1])
    return ids[:-1].view(B, T), ids[1:].view(B, T)


def write_state(model: GPT, x, y, logits, loss, path: Path) -> None:
    header = np.zeros(llmc.HEADER_INTS, dtype="<i4")
    header[:4] = (20240327, 2, B, T)
    vp = llmc.padded_vocab(model.config.vocab_size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(x.numpy().astype("<i4").tobytes())
        f.write(y.numpy().astype("<i4").tobytes())
        f.write(logits.detach().float().contiguous().numpy().tobytes())
        f.write(np.float32(loss.item()).tobytes())
        params = dict(model.named_parameters())
        for name in llmc.tensor_names(model.config.n_layer):
            g = params[name].grad.float()
            if name == "transformer.wte.weight":
                g = torch.cat([g[: model.config.vocab_size], g.new_zeros(vp - model.config.vocab_size, g.shape[1])])
            f.write(g.contiguous().numpy().tobytes())


def gptrain_side(work: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = GPT(preset("gpt2"))
    with torch.no_grad():  # llm.c's file holds zeros there; keep both models identical for the AdamW steps
        model.transformer.wte.weight[model.config.vocab_size:] = 0
    llmc.write_model(model, work / "gpt2_124M.bin")
    llmc.write_tokenizer(work / "gpt2_tokenizer.bin", model.config.vocab_size)
    x, y = batch()
    with torch.no_grad():
        logits, _ = model(x)
    _, loss = model(x, y)
    loss.backward()
    write_state(model, x, y, logits, loss, work / "gpt2_124M_debug_state.bin")
    model.zero_grad()
    opt = torch.optim.AdamW(model.parameters(), foreach=False, **ADAMW)
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"loss": losses[0], "losses": losses}


def build_program(llmc_dir: Path, source: str, exe: Path) -> Path:
    flags = ["-Ofast", "-march=native", "-I", str(llmc_dir), "-I", str(llmc_dir / "llmc")]
    cmd = ["gcc", *flags, "-fopenmp", "-DOMP", str(llmc_dir / source), "-lm", "-o", str(exe)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:  # no OpenMP: llm.c's Makefile builds without
        subprocess.run([c for c in cmd if c not in ("-fopenmp", "-DOMP")], check=True)
    return exe.resolve()


def train_side_by_side(llmc_dir: Path, work: Path, data: Path, seed: int, threads: int) -> None:
    d = work / "train"
    shakespeare = d / "dev" / "data" / "tinyshakespeare"  # where train_gpt2.c looks for its data
    shakespeare.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        link = shakespeare / f"tiny_shakespeare_{split}.bin"
        link.unlink(missing_ok=True)
        link.symlink_to((data / f"{split}_000000.bin").resolve())
    torch.manual_seed(seed)
    model = GPT(preset("tiny"))
    llmc.write_model(model, d / "gpt2_124M.bin")
    llmc.write_tokenizer(d / "gpt2_tokenizer.bin", model.config.vocab_size)
    exe = build_program(llmc_dir, "train_gpt2.c", d / "train_gpt2")
    t0 = time.time()
    out = subprocess.run([str(exe)], cwd=d, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
    (d / "llmc_train_gpt2.txt").write_text(out)
    print(f"llm.c train_gpt2: {time.time() - t0:.0f} s; its output in {d / 'llmc_train_gpt2.txt'}")
    t0 = time.time()
    flags = dict(init_from=d / "gpt2_124M.bin", data=data, out=d / "gptrain-run", micro_batch_size=4, seq_len=64,
                 total_batch_size=256, lr=1e-4, min_lr_ratio=1, warmup_steps=0, weight_decay=0, grad_clip=0,
                 embedding_lr_scale=1, max_steps=41, eval_every=10, val_tokens=5 * 256, sample_every=0,
                 save_every=41, dtype="float32", threads=threads, resume="fresh")
    cmd = ["gptrain", "train", "--preset", "tiny"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    subprocess.run(cmd, check=True, capture_output=True)
    print(f"gptrain train: {time.time() - t0:.0f} s")
    subprocess.run(["gptrain", "report", str(d / "gptrain-run"), "--compare", str(d / "llmc_train_gpt2.txt"),
                    "--compare-tokens-per-step", "256", "--out", str(d / "report")], check=True)
    from gptrain.llmc import read_log
    from gptrain.report import load_run
    theirs, ours = read_log(d / "llmc_train_gpt2.txt"), load_run(d / "gptrain-run")
    print("step  llm.c val   gptrain val   llm.c train   gptrain train")
    for step in sorted(set(theirs[1]) | set(s for s, r in ours.evals.items() if "val_loss" in r)):
        a, b = theirs[1].get(step, {}).get("val_loss"), ours.evals.get(step, {}).get("val_loss")
        ta, tb = theirs[0].get(step, {}).get("train_loss"), ours.train.get(step, {}).get("train_loss")
        print(f"{step:4d}  {a or float('nan'):.6f}    {b or float('nan'):.6f}      {ta or float('nan'):.6f}      "
              f"{tb or float('nan'):.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llmc", required=True, type=Path, help="a checkout of karpathy/llm.c")
    ap.add_argument("--work", type=Path, default=Path("llmc_check"), help="working directory (written)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-data", type=Path, help="a gptrain prepare directory: also run train_gpt2.c beside "
                    "gptrain train from one tiny model (see above)")
    ap.add_argument("--skip-test", action="store_true", help="only the --train-data comparison")
    args = ap.parse_args()
    if not (args.llmc / "test_gpt2.c").is_file() or shutil.which("gcc") is None:
        raise SystemExit(f"needs gcc and llm.c's test_gpt2.c under {args.llmc}")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.skip_test:
        test_side_by_side(args.llmc, args.work, args.seed, args.threads)
    if args.train_data:
        train_side_by_side(args.llmc, args.work, args.train_data, args.seed, args.threads)


def test_side_by_side(llmc_dir: Path, work: Path, seed: int, threads: int) -> None:
    t0 = time.time()
    ours = gptrain_side(work, seed)
    print(f"gptrain: wrote the model, tokenizer and debug state in {time.time() - t0:.0f} s; "
          f"loss {ours['loss']:.6f}", flush=True)
    exe = build_program(llmc_dir, "test_gpt2.c", work / "test_gpt2")
    t0 = time.time()
    out = subprocess.run([str(exe)], cwd=work, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
    (work / "test_gpt2.out").write_text(out)
    print(f"llm.c test_gpt2 ran {time.time() - t0:.0f} s; its output in {work / 'test_gpt2.out'}")
    for line in out.splitlines():
        if line.startswith(("OK (LOGITS)", "NOT OK (LOGITS)", "LOSS ", "overall")):
            print("  llm.c:", line)
    tensors = re.findall(r"^(d\w+)\n(?:(?:NOT )?OK .*\n)*TENSOR (OK|NOT OK), maxdiff = (\S+)", out, re.M)
    print("  llm.c: " + ", ".join(f"{name} {ok} {float(d):.1e}" for name, ok, d in tensors))
    print(f"gradient tensors within llm.c's tolerance: {sum(ok == 'OK' for _, ok, _ in tensors)} of {len(tensors)}"
          f" (largest maxdiff {max(float(d) for *_, d in tensors):.3e})")
    steps = [float(v) for v in re.findall(r"^step \d+: loss (\S+)", out, re.M)]
    print("step  llm.c loss   gptrain loss   |diff|")
    for i, (a, b) in enumerate(zip(steps, ours["losses"])):
        print(f"{i:4d}  {a:.6f}     {b:.6f}       {abs(a - b):.2e}")
    print(f"max |diff| over {len(steps)} steps: {max(abs(a - b) for a, b in zip(steps, ours['losses'])):.2e}")


if __name__ == "__main__":
    main()
