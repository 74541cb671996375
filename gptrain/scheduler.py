"""Continuous batching for a server: requests join and leave one running decode batch while it keeps going.

`Scheduler(model, ...)` owns one `engine.SlotPool` of `max_batch` slots and runs it on a background thread:
each iteration admits queued requests into free slots, drops cancelled rows, then runs one `SlotPool.step()`
(a prefill chunk, then one decode step of every ready row) and hands each new token to its request. When there
is nothing to do the thread waits on a condition (no spinning). Each request has its own `SamplingParams` and
generator, so its tokens are what it would get alone.

Callers on any thread: `submit` (QueueFull when `max_queue` requests already wait for a slot), iterate the
returned `Request` (blocking) or `async for` over `request.events()` (from an asyncio loop: events are handed
over with `loop.call_soon_threadsafe`, so the loop never blocks), `request.cancel()`, `stats()`, `close()`.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from gptrain.decode_threads import ThreadChoice, same_logits
from gptrain.engine import Engine, SlotPool
from gptrain.errors import GptrainError
from gptrain.sampling import SamplingParams, Sequence


class QueueFull(GptrainError):
    """The scheduler's queue is full; try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Event:
    """One step of a request: the new token (None when there is none, e.g. the stop token that ended it, which
    is not part of the output), the new text that is safe to show, and on the last event the finish reason
    ('stop', 'length' or 'cancelled')."""
    token: int | None
    text: str
    finish_reason: str | None = None


class Request:
    """A submitted prompt. Iterate it (blocking) or `async for ev in req.events()` for its Events; the last one
    has `finish_reason` set. Leaving either iteration before the end cancels the request. After the end: `ids`
    (new tokens, stop tokens excluded), `text`, `finish_reason`, `completion_tokens`; `error` says why a request
    was cancelled by the scheduler itself (None otherwise)."""

    def __init__(self, id: int, prompt: list[int], params: SamplingParams, scheduler: "Scheduler",
                 on_done: Callable[[], None] | None = None):
        self.id, self.prompt, self.params, self.on_done = id, prompt, params, on_done
        self.prompt_tokens = len(prompt)
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._scheduler = scheduler
        self._seq: Sequence | None = None
        self._pool: int | None = None  # which of the scheduler's pools runs it
        self._cancel = False
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def cancel(self) -> None:
        """Stop generating: the row leaves the batch at the next step (a queued request leaves at once)."""
        self._scheduler._cancel(self)

    def _push(self, ev: Event) -> None:
        """Scheduler thread: record an event and wake whoever waits for it."""
        now = time.perf_counter()
        if ev.finish_reason:
            self.finish_reason, self.finished_at = ev.finish_reason, now
        with self._cond:
            self._events.append(ev)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # that event loop has closed: nobody listens there any more
                pass
        if ev.finish_reason and self.on_done is not None:
            self.on_done()

    def __iter__(self) -> Iterator[Event]:
        i = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: len(self._events) > i)
                    ev = self._events[i]
                i += 1
                yield ev
                if ev.finish_reason:
                    return
        finally:
            if self.finish_reason is None:
                self.cancel()

    async def events(self):
        """The Events, as an async iterator for an asyncio loop (never blocks it)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            for ev in self._events:
                queue.put_nowait(ev)
            self._listeners.append((loop, queue))
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.finish_reason:
                    return
        finally:
            with self._cond:
                self._listeners.remove((loop, queue))
            if self.finish_reason is None:
                self.cancel()


class Scheduler:
    """Continuous batching over one model (see the module docstring). The model is on its device and dtype.

    `prefill_chunk` caps the prompt tokens encoded per iteration (None: a whole prompt at once), so that a long
    prompt stalls the running streams for one chunk's time at most. `on_step(batch_size, seconds,
    prefill_tokens)` is called on a scheduler thread after each iteration (for metrics).

    `pools` > 1 splits the batch into that many pools, each stepped by its own thread; the requests are spread
    evenly over them. On a 2-core CPU two 1-thread pools decode 16 rows ~1.3x faster in-process than one pool on 2
    threads; behind a server's HTTP side the gain shrinks and first tokens come later (benchmarks/RESULTS.md, issue
    22). A row's tokens still do not depend on its pool or its neighbours: every pool runs the same arithmetic with
    the same thread count. Not with `compile` (one compiled step, one pool).

    `threads` are torch's intra-op threads for decoding, divided among the pools (None: torch's count when the
    scheduler is made). Each pool thread sets its share and, on CPU, decodes on one thread while that is faster
    (gptrain/decode_threads.py: another process competing for the cores). The caller's own thread should run torch
    on one thread (`torch.set_num_threads(1)` before it loads the model, as `gptrain serve` does): libgomp gives
    each thread that runs a parallel op a team of its own, and with more OpenMP threads than cores its waiting
    threads stop spinning and sleep at each of the ~100 barriers of a step (the 8-row step took 1.4x as long,
    benchmarks/RESULTS.md). A count set here is torch's for threads started after it (`torch.set_num_threads` is
    process-wide for new threads)."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, max_queue: int = 64, compile: bool = False,
                 prefill_chunk: int | None = 256, pools: int = 1, threads: int | None = None,
                 on_step: Callable[[int, float, int], None] | None = None):
        if max_batch < 1 or max_queue < 0 or (prefill_chunk is not None and prefill_chunk < 1) or pools < 1 \
                or (threads is not None and threads < 1):
            raise GptrainError(f"max_batch={max_batch} and pools={pools} must be >= 1, max_queue={max_queue} >= 0, "
                               f"threads={threads} >= 1 (or None) and prefill_chunk={prefill_chunk} >= 1 (or None)")
        if compile and pools > 1:
            raise GptrainError(f"compile runs one compiled decode step: use pools=1, not {pools}")
        self.engine = Engine(model, tokenizer, compile=compile)
        self.tokenizer = self.engine.tokenizer
        self.max_batch, self.max_queue, self.on_step = max_batch, max_queue, on_step
        self.prefill_chunk = prefill_chunk
        pools = min(pools, max_batch)
        self.threads = max(1, (threads or torch.get_num_threads()) // pools)  # per pool
        self._sizes = [max_batch // pools + (i < max_batch % pools) for i in range(pools)]
        self._pools = [self._new_pool(i) for i in range(pools)]
        self._choices = [ThreadChoice(self.threads, switch=False) for _ in range(pools)]  # set by each pool thread
        self._rows = [0] * pools  # per pool: requests admitted and not finished; touched under _lock
        self._queue: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # id(Request) -> the request; touched under _lock
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._closing = False
        self.steps = 0
        self._service_s = 1.0  # moving average of a request's time in the batch, for retry_after

    def _new_pool(self, i: int) -> SlotPool:
        return SlotPool(self.engine, self._sizes[i], prefill_chunk=self.prefill_chunk)

    # ------------------------------------------------------------ callers, any thread
    def start(self) -> "Scheduler":
        with self._lock:
            if self._closing:
                raise GptrainError("the scheduler is closed")
            if not self._threads:
                self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"gptrain-scheduler-{i}",
                                                  daemon=True) for i in range(len(self._pools))]
                for t in self._threads:
                    t.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               on_done: Callable[[], None] | None = None) -> Request:
        """Queue a prompt; its tokens come through the returned Request (`on_done()` is called once it has ended,
        however). GptrainError for a bad request, QueueFull when `max_queue` requests already wait for a slot."""
        params = params or SamplingParams()
        prompt = list(prompt_ids)
        self.engine.check(prompt, params)
        with self._lock:
            if self._closing:
                raise GptrainError("the scheduler is closed")
            waiting = len(self._queue) - (self.max_batch - len(self._running))
            if waiting >= self.max_queue:
                retry = max(1.0, self._service_s * (waiting + 1) / self.max_batch)
                raise QueueFull(f"{len(self._running)} requests are running and {max(waiting, 0)} waiting, the most "
                                f"this server takes (max_batch={self.max_batch}, max_queue={self.max_queue}); "
                                f"retry in {retry:.0f}s", retry_after=retry)
            req = Request(next(self._ids), prompt, params, self, on_done)
            self._queue.append(req)
            self._lock.notify_all()
        return req

    def warm_up(self) -> None:
        """Run one two-token request through the running batch and wait for it: a compiled decode step compiles
        (and on CUDA captures its graph) here, before a server says it is ready, not on a client's request."""
        req = self.submit([self.engine.eot], SamplingParams(max_new_tokens=2, temperature=0.0, stop_ids=()))
        for _ in req:
            pass
        if req.error:
            raise GptrainError(f"the warm-up generation failed: {req.error}")

    @property
    def service_seconds(self) -> float:
        """A request's recent time in the batch (a moving average): what a client should wait before retrying."""
        return self._service_s

    def stats(self) -> dict:
        with self._lock:
            running = len(self._running)
            return {"queue_depth": len(self._queue), "running": running, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "free_slots": self.max_batch - running, "steps": self.steps,
                    "pools": len(self._pools), "threads": [c.threads for c in self._choices]}

    def close(self) -> None:
        """Cancel everything queued or running and stop the threads."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            threads = list(self._threads)
        others = [t for t in threads if t is not threading.current_thread()]
        for t in others:
            t.join()
        if not others:
            self._cancel_all()

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancel(self, req: Request) -> None:
        with self._lock:
            if req.finish_reason is not None:
                return
            if req in self._queue:
                self._queue.remove(req)
                queued = True
            else:
                req._cancel, queued = True, False
                self._lock.notify_all()
        if queued:
            req._push(Event(None, "", "cancelled"))

    # ------------------------------------------------------------ the scheduler threads, one per pool
    def _may_admit(self, i: int) -> bool:
        """Under _lock: whether pool i takes the next queued request. Each pool fills up to its share of all the
        requests (running and queued, split evenly, within its size) in one go, so a burst joins at the pool's
        next step rather than one request per step; past its share only when no other pool is under its own."""
        rows = self._rows
        if not self._queue or rows[i] >= self._sizes[i]:
            return False
        share = -(-(sum(rows) + len(self._queue)) // len(rows))
        under = [n < min(size, share) for n, size in zip(rows, self._sizes)]
        return under[i] or not any(under)

    def _loop(self, i: int) -> None:
        torch.set_num_threads(self.threads)
        self._choices[i] = ThreadChoice(self.threads, self._may_switch_threads())
        mine = lambda: [r for r in self._running.values() if r._pool == i]  # noqa: E731
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closing or self._may_admit(i) or self._rows[i] > 0)
                if self._closing:
                    break
                admitted = []
                while self._may_admit(i):
                    req = self._queue.popleft()
                    req._pool, self._running[id(req)] = i, req
                    self._rows[i] += 1
                    admitted.append(req)
                cancelled = [r for r in mine() if r._cancel]
            pool = self._pools[i]
            try:
                for req in admitted:
                    req._seq, req.admitted_at = self.engine.sequence(req.prompt, req.params), time.perf_counter()
                    pool.add(req._seq)
                for req in cancelled:
                    pool.remove(req._seq)
                    self._finish(req, "cancelled")
                if pool.rows:
                    self._step(i)
            except Exception as e:  # noqa: BLE001 -- a failed step must not take the server down with it
                traceback.print_exc(file=sys.stderr)
                with self._lock:
                    failed = mine()
                    for req in failed:
                        del self._running[id(req)]
                    self._rows[i] = 0
                self._pools[i] = self._new_pool(i)
                for req in failed:
                    req.error = f"{type(e).__name__}: {e}"
                    req._push(Event(None, "", "cancelled"))
        self._cancel_all(i)

    def _may_switch_threads(self) -> bool:
        """Whether a pool may decode on one thread instead of its share: on CPU, eagerly, where the logits are the
        same either way (a failed check says no)."""
        e = self.engine
        if e.device.type != "cpu" or e.compiled or self.threads == 1:
            return False
        try:
            return same_logits(e, (self.threads, 1))
        except Exception:  # noqa: BLE001 -- the pool then keeps its share of threads; its steps report real errors
            traceback.print_exc(file=sys.stderr)
            return False

    def _step(self, i: int) -> None:
        pool, choice = self._pools[i], self._choices[i]
        threads = choice.threads
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        drawn = pool.step()
        seconds = time.perf_counter() - t0
        if pool.last_decode_rows and not pool.last_prefill_tokens:
            choice.record(seconds)
        with self._lock:  # counted before its tokens go out: a client that has its last token sees the step in stats
            self.steps += 1
            by_seq = {id(r._seq): r for r in self._running.values() if r._pool == i}
        for seq, token, text in drawn:
            req = by_seq[id(seq)]
            if req.first_token_at is None:
                req.first_token_at = time.perf_counter()
            req.ids, req.text = seq.ids, seq.text
            if seq.finish_reason:
                output = token if token not in seq.stop_ids else None
                self._finish(req, seq.finish_reason, Event(output, text, seq.finish_reason))
            else:
                req._push(Event(token, text))
        if self.on_step is not None:
            try:
                self.on_step(pool.last_decode_rows, seconds, pool.last_prefill_tokens)
            except Exception:  # noqa: BLE001 -- a metrics hook's bug must not stop generation
                traceback.print_exc(file=sys.stderr)

    def _finish(self, req: Request, reason: str, last: Event | None = None) -> None:
        with self._lock:
            if self._running.pop(id(req), None) is not None:
                self._rows[req._pool] -= 1
            if req.admitted_at is not None:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - req.admitted_at)
            self._lock.notify_all()
        req._push(last or Event(None, "", reason))

    def _cancel_all(self, i: int | None = None) -> None:
        """Cancel pool i's requests and everything queued (i None: every pool's, when no thread ever ran)."""
        with self._lock:
            reqs = [r for r in self._running.values() if i is None or r._pool == i] + list(self._queue)
            for req in reqs:
                if self._running.pop(id(req), None) is not None:
                    self._rows[req._pool] -= 1
            self._queue.clear()
        for req in reqs:
            pool = self._pools[req._pool] if req._pool is not None else None
            if pool is not None and req._seq is not None and req._seq in pool.rows:
                pool.remove(req._seq)
            if req.finish_reason is None:
                req._push(Event(None, "", "cancelled"))
