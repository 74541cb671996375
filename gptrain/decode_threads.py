"""How many intra-op threads a server's decode step runs on: all it was given while they are faster, one while
another process competes for the cores.

`gptrain serve`'s OpenMP threads spin briefly while they wait (gptrain/openmp.py): on an otherwise idle 2-core
CPU its 8-row decode step then takes 25-28 ms on 2 threads against 38 ms on one. But threads that wait for each
other need their cores: beside one busy process, 8 streams decoded on 2 threads at 25 tokens/s with libgomp's
default spin and 112 with a spin of 3,000, against ~200 on one thread (benchmarks/RESULTS.md, issue 22).
`ThreadChoice` times the steps and, now and then, a few steps at the other count, and keeps the faster.

Changing the count must not change a request's tokens: `same_logits` checks at start that the model's prefill
and decode give the same logits bit for bit on one thread and on all of them (bf16 through oneDNN's packed
products did on the machines seen; float32 through MKL did not); where they differ, the count never changes.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable

import torch

from gptrain.model import KVCache


class ThreadChoice:
    """The thread count of one pool's next decode step: `most`, or 1 while that is faster (`switch=False`:
    always `most`). Feed it each decode step's time (`record`, steps without prefill only); read `threads`.

    A check runs `PROBE` steps at the other count (just one, if that one is `SLOWER` times the current median)
    and compares their median with the last `PROBE` steps at the current count; the other count must be `MARGIN`
    faster to be taken. Checks come `FIRST` seconds after a decision, then at twice the interval each time the
    count stays (up to `LONGEST`), and at once when two steps in a row take `SLOWER` times the median of the last
    decision (a process that starts competing is noticed in two steps; one slow step, e.g. the one that grew the
    KV cache, is not)."""

    PROBE, FIRST, LONGEST, SLOWER, MARGIN = 3, 2.0, 64.0, 2.5, 0.1

    def __init__(self, most: int, switch: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.most, self.clock = most, clock
        self.switch = switch and most > 1
        self.current, self.checking = most, False
        self.recent: deque[float] = deque(maxlen=self.PROBE)  # the latest steps at `current`
        self.trial: list[float] = []  # a check's steps at the other count
        self.typical: float | None = None  # the median at `current` when last decided
        self.wait = self.FIRST
        self.due = clock() + self.wait
        self.checks = self.switches = self.slow = 0

    @property
    def other(self) -> int:
        return 1 if self.current == self.most else self.most

    @property
    def threads(self) -> int:
        return self.other if self.checking else self.current

    def record(self, seconds: float) -> None:
        if not self.switch:
            return
        if self.checking:
            self.trial.append(seconds)
            if len(self.trial) == self.PROBE or seconds > self.SLOWER * statistics.median(self.recent):
                self._decide()  # (a step far slower than now's ends the check: its count will not win)
            return
        self.recent.append(seconds)
        if len(self.recent) < self.PROBE:
            return
        if self.typical is None:
            self.typical = statistics.median(self.recent)
        self.slow = self.slow + 1 if seconds > self.SLOWER * self.typical else 0
        if self.slow == 2:  # (one slow step is a cache resize or a pause; two in a row is the machine)
            self.recent = deque(list(self.recent)[-2:], maxlen=self.PROBE)  # compared with now, not before
        if self.slow == 2 or self.clock() >= self.due:
            self.checking, self.trial, self.slow = True, [], 0

    def _decide(self) -> None:
        self.checks += 1
        if statistics.median(self.trial) * (1 + self.MARGIN) < statistics.median(self.recent):
            self.current, self.wait, self.switches = self.other, self.FIRST, self.switches + 1
            self.recent = deque(self.trial, maxlen=self.PROBE)
        else:
            self.wait = min(self.LONGEST, 2 * self.wait)
        self.typical, self.checking = statistics.median(self.recent), False
        self.due = self.clock() + self.wait


@torch.inference_mode()
def same_logits(engine, counts: tuple[int, ...], rows: tuple[int, ...] = (2, 9, 32)) -> bool:
    """Whether `engine`'s model gives bit-equal logits at each of these thread counts: a prefill of 4 tokens
    and one decode step for each row count, on a small cache of the server's dtype. Leaves the thread count as
    it found it."""
    model, config, before = engine.model, engine.model.config, torch.get_num_threads()
    t = min(4, config.block_size - 1)
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            out = []
            for r in rows:
                idx = torch.randint(config.vocab_size, (r, t + 1), generator=torch.Generator().manual_seed(r))
                idx = idx.to(engine.device)
                cache = KVCache(config, r, t + 1, device=engine.device, dtype=engine.cache_dtype())
                model.hidden(idx[:, :t], cache)
                out.append(model.logits(model.hidden(idx[:, t:], cache)))
            results.append(out)
    finally:
        torch.set_num_threads(before)
    return all(torch.equal(a, b) for res in results[1:] for a, b in zip(results[0], res))
