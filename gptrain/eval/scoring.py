"""Batched log-likelihood of continuations: the one scorer behind HellaSwag and the lm-eval model class.

A request is (context tokens, continuation tokens). Requests are sorted longest first (so padding is small and an
out-of-memory shows up on the first batch), right-padded into batches and run through the model once; only the
continuation positions are projected to the vocabulary, so the LM head and the softmax run on a fraction of the
tokens. Too-long requests are cut from the left to the context window, as lm-evaluation-harness does.

The model runs eagerly: `unwrap` strips DDP and torch.compile wrappers. HellaSwag alone has ~160 distinct row
lengths, so a compiled graph would recompile or force padding to a few large shapes, and evaluation is a small
share of a training run; eager batched scoring gives the same numbers with no compile stalls.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gptrain.errors import GptrainError
from gptrain.model import GPT


class Score(NamedTuple):
    nll: float  # summed negative log-likelihood of the continuation tokens
    n: int  # continuation tokens scored
    greedy: bool  # every continuation token is the model's argmax


def unwrap(model) -> GPT:
    """The plain GPT inside DDP / torch.compile wrappers (their parameters are the same tensors)."""
    while not isinstance(model, GPT):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a gptrain GPT (possibly wrapped by DDP or torch.compile), got {type(model).__name__}")
        model = inner
    return model


class Progress:
    """A one-line progress meter on stderr (rate and ETA), redrawn at most twice a second."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.t0, self.shown = 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.shown > 0.5 or self.done >= self.total):
            self.shown = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            end = "\n" if self.done >= self.total else ""
            print(f"\r{self.desc}: {self.done}/{self.total} {self.unit} | {rate:.1f} {self.unit}/s | eta {eta:.0f}s",
                  end=end, file=sys.stderr, flush=True)


@torch.no_grad()
def score_continuations(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 64,
                        device=None, autocast: torch.dtype | None = None,
                        progress: Progress | None = None) -> list[Score]:
    """Score each (context, continuation) request; `batch_size` counts rows per forward pass."""
    net = unwrap(model)
    T = net.config.block_size
    device = torch.device(device) if device is not None else next(net.parameters()).device
    rows = []
    for ctx, cont in requests:
        if not 0 < len(cont) <= T:
            raise GptrainError(f"a continuation of {len(cont)} tokens cannot be scored with a context window of {T}")
        rows.append(((list(ctx) + list(cont))[-(T + 1):], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext())
    out: list[Score | None] = [None] * len(rows)
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = len(rows[chunk[0]][0]) - 1  # longest first
            idx = torch.zeros((len(chunk), width), dtype=torch.long)
            tgt = torch.full((len(chunk), width), -1, dtype=torch.long)
            for r, i in enumerate(chunk):
                toks, n = rows[i]
                L = len(toks) - 1
                idx[r, :L] = torch.tensor(toks[:-1])
                tgt[r, L - n:L] = torch.tensor(toks[L + 1 - n:])
            idx, tgt = idx.to(device), tgt.to(device)
            scored = tgt >= 0
            with amp:
                logits = net.logits(net.hidden(idx)[scored])
            targets = tgt[scored]
            nll = F.cross_entropy(logits.float(), targets, reduction="none")
            miss = (logits.argmax(-1) != targets).long()
            row = scored.nonzero()[:, 0]
            sums = torch.zeros(len(chunk), device=device).index_add_(0, row, nll).tolist()
            misses = torch.zeros(len(chunk), dtype=torch.long, device=device).index_add_(0, row, miss).tolist()
            for r, i in enumerate(chunk):
                out[i] = Score(sums[r], rows[i][1], misses[r] == 0)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        net.train(was_training)
    return out
