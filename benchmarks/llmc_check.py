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


def build(llmc_dir: Path, work: Path) -> Path:
    exe = work / "test_gpt2"
    flags = ["-Ofast", "-march=native", "-I", str(llmc_dir), "-I", str(llmc_dir / "llmc")]
    cmd = ["gcc", *flags, "-fopenmp", "-DOMP", str(llmc_dir / "test_gpt2.c"), "-lm", "-o", str(exe)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:  # no OpenMP: llm.c's Makefile builds without
        subprocess.run([c for c in cmd if c not in ("-fopenmp", "-DOMP")], check=True)
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llmc", required=True, type=Path, help="a checkout of karpathy/llm.c")
    ap.add_argument("--work", type=Path, default=Path("llmc_check"), help="working directory (written)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.llmc / "test_gpt2.c").is_file() or shutil.which("gcc") is None:
        raise SystemExit(f"needs gcc and llm.c's test_gpt2.c under {args.llmc}")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ours = gptrain_side(args.work, args.seed)
    print(f"gptrain: wrote the model, tokenizer and debug state in {time.time() - t0:.0f} s; "
          f"loss {ours['loss']:.6f}", flush=True)
    exe = build(args.llmc, args.work)
    t0 = time.time()
    out = subprocess.run([str(exe.resolve())], cwd=args.work, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).stdout
    (args.work / "test_gpt2.out").write_text(out)
    print(f"llm.c test_gpt2 ran {time.time() - t0:.0f} s; its output in {args.work / 'test_gpt2.out'}")
    for line in out.splitlines():
        if line.startswith(("OK (LOGITS)", "NOT OK (LOGITS)", "LOSS ", "TENSOR ", "overall")):
            print("  llm.c:", line)
    tensors = re.findall(r"^(d\w+)\n(?:(?:NOT )?OK .*\n)*TENSOR (OK|NOT OK), maxdiff = (\S+)", out, re.M)
    print(f"gradient tensors within llm.c's tolerance: {sum(ok == 'OK' for _, ok, _ in tensors)} of {len(tensors)}"
          f" (largest maxdiff {max(float(d) for *_, d in tensors):.3e})")
    steps = [float(v) for v in re.findall(r"^step \d+: loss (\S+)", out, re.M)]
    print("step  llm.c loss   gptrain loss   |diff|")
    for i, (a, b) in enumerate(zip(steps, ours["losses"])):
        print(f"{i:4d}  {a:.6f}     {b:.6f}       {abs(a - b):.2e}")
    print(f"max |diff| over {len(steps)} steps: {max(abs(a - b) for a, b in zip(steps, ours['losses'])):.2e}")


if __name__ == "__main__":
    main()
