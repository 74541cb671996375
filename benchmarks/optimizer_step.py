"""The optimizer update alone: AdamW (as the trainer builds it) against Muon + AdamW (`--optimizer muon`), the two
alternating on the same model shape and random gradients, median of the timed updates. Muon's Newton-Schulz is
five rounds of three matrix products on each block matrix, so its cost grows with C³ per matrix while a step's
forward and backward grow with tokens × C²: this says what it adds to a step at a shape.

    python benchmarks/optimizer_step.py --model tiny --threads 1         # the demo's shape
    python benchmarks/optimizer_step.py --model gpt2 --device cuda       # GPT-2 124M on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptrain.model import GPT, preset  # noqa: E402
from gptrain.train.optim import make_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(preset(a.model)).to(a.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kind = a.device.split(":")[0]
    opts = {"adamw": make_optimizer(model, lr=1e-4, weight_decay=0.1, device_type=kind),
            "muon + adamw": make_optimizer(model, lr=1e-4, weight_decay=0.1, device_type=kind, optimizer="muon",
                                           muon_ns_dtype=a.ns_dtype)}
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(a.steps + 2):
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    c = model.config
    print(f"# optimizer update, {a.model} ({c.n_layer}L/{c.n_embd}C, {model.num_params() / 1e6:.1f}M params), "
          f"{a.device}, Newton-Schulz in {a.ns_dtype}, threads {torch.get_num_threads()}, median of {a.steps}")
    print("| optimizer | ms per update |\n|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.1f} |")


if __name__ == "__main__":
    main()
