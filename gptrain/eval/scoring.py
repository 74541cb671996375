"""Batched log-likelihood of continuations: the one scorer behind HellaSwag and the lm-eval model class.

A request is (context tokens, continuation tokens); its score is the summed loss of the continuation tokens. Two
things make this fast compared with scoring each request's full row:

- Only the continuation positions are projected to the vocabulary, so the LM head and the softmax (most of the work
  for a small model) run on a fraction of the tokens.
- Requests that share a context share its forward pass. Multiple-choice tasks send one request per choice, all with
  the same context (HellaSwag: 4 endings after a ~25-token context, endings ~14 tokens). Such a group's context runs
  once, left-padded with other groups' into a batch that fills a `KVCache`; the cache row is then copied once per
  continuation (`KVCache.select`) and the continuations run on from there, right-padded. The context's last hidden
  state predicts each continuation's first token. Groups are batched by continuation length, the larger padded
  dimension. The cache holds every layer's keys and values for all rows of a batch, so `batch_size` (rows, that
  is continuations, per forward pass) also bounds its memory.

Requests with a context of their own, and requests longer than the context window, are scored as plain rows: longest
first (so padding is small and an out-of-memory shows up on the first batch), right-padded. A too-long request is cut
from the left to the context window, as lm-evaluation-harness does, so it no longer shares its context with anyone.
Both paths give the same numbers up to float rounding (tests/test_hellaswag.py checks them against whole rows).

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
from gptrain.model import GPT, KVCache

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


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
def score_continuations(model, requests: list[Request], *, batch_size: int = 64, device=None,
                        autocast: torch.dtype | None = None, progress: Progress | None = None) -> list[Score]:
    """Score each (context, continuation) request; `batch_size` counts rows (continuations) per forward pass."""
    net = unwrap(model)
    T = net.config.block_size
    device = torch.device(device) if device is not None else next(net.parameters()).device
    for ctx, cont in requests:
        if not 0 < len(cont) <= T:
            raise GptrainError(f"a continuation of {len(cont)} tokens cannot be scored with a context window of {T}")
        if not ctx:
            raise GptrainError("a request has an empty context, so its first token has nothing to be predicted from; "
                               "start the context with <|endoftext|> (as lm-eval does)")
    groups: dict[tuple[int, ...], list[int]] = {}  # context -> requests that fit the window unshortened
    plain = []
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) + len(cont) - 1 <= T:
            groups.setdefault(tuple(ctx), []).append(i)
        else:
            plain.append(i)
    shared = [g for g in groups.values() if len(g) > 1]
    plain += [g[0] for g in groups.values() if len(g) == 1]

    dtype = autocast or next(net.parameters()).dtype  # what the cached keys/values come out as
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    out: list[Score | None] = [None] * len(requests)

    def record(indices: list[int], h: torch.Tensor, tgt: torch.Tensor) -> None:
        for i, score in zip(indices, _score_rows(net, h, tgt)):
            out[i] = score
        if progress is not None:
            progress.update(len(indices))

    was_training = net.training
    net.eval()
    try:
        with amp:
            for batch in _batch_groups(shared, requests, batch_size, T):
                h, tgt = _shared_rows(net, [[requests[i] for i in g] for g in batch], device, dtype)
                record([i for g in batch for i in g], h, tgt)
            plain.sort(key=lambda i: -min(len(requests[i][0]) + len(requests[i][1]), T + 1))  # longest first
            for s in range(0, len(plain), batch_size):
                chunk = plain[s:s + batch_size]
                record(chunk, *_plain_rows(net, [requests[i] for i in chunk], device))
    finally:
        net.train(was_training)
    return out


def _batch_groups(groups: list[list[int]], requests: list[Request], batch_size: int, T: int):
    """Batches of groups, about `batch_size` continuations each, longest continuation first (then longest context),
    so little is padded; a batch's longest context plus its longest continuation fits the window T."""
    pieces = [g[s:s + batch_size] for g in groups for s in range(0, len(g), batch_size)]
    ctx_len = lambda g: len(requests[g[0]][0])  # noqa: E731
    cont_len = lambda g: max(len(requests[i][1]) for i in g)  # noqa: E731
    batch, rows, widest_ctx, widest_cont = [], 0, 0, 0
    for g in sorted(pieces, key=lambda g: (-cont_len(g), -ctx_len(g))):
        if batch and (rows + len(g) > batch_size or max(widest_ctx, ctx_len(g)) + widest_cont - 1 > T):
            yield batch
            batch, rows, widest_ctx, widest_cont = [], 0, 0, 0
        batch.append(g)
        rows += len(g)
        widest_ctx, widest_cont = max(widest_ctx, ctx_len(g)), max(widest_cont, cont_len(g))
    if batch:
        yield batch


def _shared_rows(net: GPT, groups: list[list[Request]], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (rows, width, C) and their target tokens (-1: not scored), one row per continuation, for groups
    of requests sharing a context: each context runs once, then its continuations run on from a copy of its cache."""
    contexts = [g[0][0] for g in groups]
    conts = [cont for g in groups for _, cont in g]
    ctx_width, cont_width = max(map(len, contexts)), max(map(len, conts)) - 1
    pad = [ctx_width - len(c) for c in contexts]
    idx = torch.zeros((len(contexts), ctx_width), dtype=torch.long)
    for r, ctx in enumerate(contexts):
        idx[r, pad[r]:] = torch.tensor(ctx)
    cache = KVCache(net.config, len(contexts), ctx_width + cont_width, pad=torch.tensor(pad), device=device,
                    dtype=dtype)
    last = net.hidden(idx.to(device), cache)[:, -1:]  # each context's last position predicts its continuations' first
    owner = torch.tensor([r for r, g in enumerate(groups) for _ in g], device=device)
    h = last[owner]
    if cont_width:  # continuations of one token need nothing more
        idx = torch.zeros((len(conts), cont_width), dtype=torch.long)
        for r, cont in enumerate(conts):
            idx[r, :len(cont) - 1] = torch.tensor(cont[:-1])
        h = torch.cat([h, net.hidden(idx.to(device), cache.select(owner))], dim=1)
    tgt = torch.full((len(conts), 1 + cont_width), -1, dtype=torch.long)
    for r, cont in enumerate(conts):
        tgt[r, :len(cont)] = torch.tensor(cont)
    return h, tgt.to(device)


def _plain_rows(net: GPT, requests: list[Request], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and targets as `_shared_rows` gives them, from each request's whole row (context + continuation,
    cut from the left to the window), right-padded."""
    T = net.config.block_size
    rows = [((list(ctx) + list(cont))[-(T + 1):], len(cont)) for ctx, cont in requests]
    width = max(len(toks) for toks, _ in rows) - 1
    idx = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (toks, n) in enumerate(rows):
        L = len(toks) - 1
        idx[r, :L] = torch.tensor(toks[:-1])
        tgt[r, L - n:L] = torch.tensor(toks[L + 1 - n:])
    return net.hidden(idx.to(device)), tgt.to(device)


def _score_rows(net: GPT, h: torch.Tensor, tgt: torch.Tensor) -> list[Score]:
    """One Score per row: only the positions with a target go through the LM head."""
    scored = tgt >= 0
    logits = net.logits(h[scored])
    targets = tgt[scored]
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    miss = (logits.argmax(-1) != targets).long()
    row = scored.nonzero()[:, 0]
    sums = torch.zeros(len(tgt), device=h.device).index_add_(0, row, nll).tolist()
    misses = torch.zeros(len(tgt), dtype=torch.long, device=h.device).index_add_(0, row, miss).tolist()
    counts = scored.sum(1).tolist()
    return [Score(s, n, m == 0) for s, n, m in zip(sums, counts, misses)]
