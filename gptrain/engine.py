"""The generation engine: a pool of KV-cache slots that rows join and leave while the batch keeps decoding.

`Engine` holds the model and its (optionally compiled) one-token decode step and checks requests. `SlotPool` is
the running batch: up to `max_batch` rows of one `KVCache`, each row with its own length (slot i is row i; when
a row leaves, the last row moves into its place, so the rows in use are always the first ones). One
`SlotPool.step()` is one iteration of continuous batching:

1. Prefill: rows that have joined (or slid their window) encode their tokens into their slot, in chunks of at
   most `prefill_chunk` tokens cut at fixed offsets from the row's start, and only as many chunks per iteration
   as fit in `prefill_chunk` tokens, so a long prompt does not freeze the others. Rows in neighbouring slots
   prefill together, one forward of (rows, longest chunk). Prefill runs eagerly and stops one token short: a
   row's last token goes through the decode step.
2. Decode: every row whose window is encoded but for its last token feeds that token, all in one forward of
   shape (rows, 1); each such row then draws its next token with its own `Sequence` (sampling.py).

Eagerly the decode step covers the rows in use and the first slots up to the longest row (rounded up to 64),
so attention reads only what is filled. Under `compile=True` it always covers the whole pool and the whole
window: one static shape, compiled once; rows not decoding feed a dummy token whose key/value lands beyond
their length, where the next real write overwrites it. A row's tokens do not depend on what else is in the
batch: its prefill chunks, its sampling and its generator are its own (tests check batched equals alone).

`use_cache=False` instead re-runs each row's whole window per token, as the lecture's loop does; it exists to
check the cache against, token for token. `Engine.generate` runs a batch of prompts on a pool of their own
(every prompt prefilled before the first step, so step i gives each row its i-th token); `scheduler.Scheduler`
runs one long-lived pool on a thread for a server.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from gptrain.errors import GptrainError
from gptrain.model import GPT, KVCache
from gptrain.sampling import SamplingParams, Sequence, sample_rows

SPAN_STEP = 64  # the eager decode step attends over a multiple of this many slots
MIN_ROWS = 2  # every forward of the pool multiplies at least this many rows (see SlotPool)
AUTO_BATCH_MAX = 32  # a server's running batch when not given: at most this many rows


def auto_batch(config, param: torch.Tensor) -> int:
    """Rows for a server's running batch: as many as a quarter of the memory available now holds in KV cache
    (a row keeps keys and values for the whole window, float32 on CPU), from 1 to AUTO_BATCH_MAX; 8 where memory
    is unknown."""
    from gptrain.train.memory import detected_memory
    size = 4 if param.device.type == "cpu" else param.element_size()
    row = 2 * config.n_layer * config.block_size * config.n_embd * size
    memory, _ = detected_memory(str(param.device))
    return 8 if memory is None else max(1, min(AUTO_BATCH_MAX, memory // 4 // row))


def _last_logits(model: GPT, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    return model.logits(model.hidden(idx, cache)[:, -1]).float()


class Engine:
    """Generates from one model: holds the (optionally compiled) decode step; checks prompts and settings.
    Each `generate` call runs on a slot pool of its own; for concurrent requests use `scheduler.Scheduler`.

    The model may be wrapped by DDP or torch.compile: generation uses the plain module underneath, in its own
    dtype and device (or, under autocast, the autocast dtype)."""

    def __init__(self, model, tokenizer=None, *, compile: bool = False):
        model = getattr(model, "module", model)  # DDP
        self.model: GPT = getattr(model, "_orig_mod", model)  # torch.compile
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if tokenizer is None:
            from gptrain.tokenizer import TokenizerError, tokenizer_for_vocab
            try:
                tokenizer = tokenizer_for_vocab(self.model.config.vocab_size)
            except TokenizerError:
                tokenizer = None  # a toy vocabulary: ids only, no text
        self.tokenizer = tokenizer
        self.eot = tokenizer.eot if tokenizer else 50256
        self.compiled = compile
        # On CUDA the compiled step is also captured in a CUDA graph (one launch per token): its shapes are
        # static and its KV cache stays at fixed addresses (SlotPool marks them), as graphs require.
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.decode = torch.compile(_last_logits, fullgraph=True, mode=mode) if compile else _last_logits

    def check(self, prompt: list[int], params: SamplingParams, which: str = "the prompt") -> None:
        """GptrainError unless `prompt` with `params` can be generated from (params.validate() included)."""
        params.validate()
        if params.stop and self.tokenizer is None:
            raise GptrainError(f"stop strings need a tokenizer; the model's vocabulary of "
                               f"{self.model.config.vocab_size} matches none")
        self.check_tokens(prompt, which)
        block = self.model.config.block_size
        if params.context == "error" and len(prompt) + params.max_new_tokens > block:
            raise GptrainError(
                f"{which} of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds the model's "
                f"context window of {block} tokens; shorten the prompt, lower --max-new-tokens, or let the "
                "window slide with --context slide")

    def check_tokens(self, prompt: list[int], which: str = "the prompt") -> None:
        if len(prompt) == 0:
            raise GptrainError(f"{which} is empty: it needs at least one token (start an unconditional sample "
                               "with <|endoftext|>)")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not (isinstance(t, numbers.Integral) and 0 <= t < vocab)]
        if bad:
            raise GptrainError(f"{which} has token id {bad[0]!r} outside the model's vocabulary of {vocab}")

    def sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        c = self.model.config
        return Sequence(prompt, params, tokenizer=self.tokenizer, eot=self.eot, vocab=c.vocab_size,
                        block_size=c.block_size, device=self.device)

    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: on CPU float32, so that decode attention accumulates in float32 through plain
        matmuls (CPU has no bf16 matmul with a float32 result, and its fused attention kernels are several times
        slower for a one-token query); elsewhere the dtype keys/values come out in (under autocast, e.g. the
        trainer's samples, the autocast dtype)."""
        kind = self.device.type
        if kind == "cpu":
            return torch.float32
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.dtype

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, *, use_cache: bool = True,
                 **overrides) -> "Generation":
        """Start generating from a batch of token-id prompts (any lengths); iterate the result to run it.

        Row b draws from its own generator seeded `seed + b`, so it gives exactly what a one-prompt call with
        that seed gives."""
        params = replace(params or SamplingParams(), **overrides)
        params.validate()
        if self.compiled and not use_cache:
            raise GptrainError("compile needs the KV cache: the cache-free path recompiles at every length")
        if not prompts:
            raise GptrainError("no prompts given: pass at least one (start an unconditional sample with "
                               "<|endoftext|>)")
        for b, p in enumerate(prompts):
            self.check_tokens(p, f"prompt {b}")
        for b, p in enumerate(prompts):
            self.check(p, params, f"prompt {b}")
        return Generation(self, [list(p) for p in prompts], params, use_cache)


class SlotPool:
    """The running batch: up to `max_batch` rows in the slots of one KV cache (see the module docstring).

    `add(seq)` puts a row in the first free slot; `remove(seq)` takes it out (the last row moves into its slot);
    `step()` runs one iteration and returns (row, token, new text) for each token drawn; rows that finished
    are removed already.
    `prefill_chunk=None` prefills every waiting row whole in the next iteration.

    No forward runs on a single row of tokens: oneDNN multiplies one row (a matrix-vector product) in another
    order than two or more, so a bf16 row alone would round differently from the same row in a batch. A lone
    decoding row is joined by a free slot's dummy row, a one-token prefill is padded to two tokens (the cache has
    at least MIN_ROWS slots for that)."""

    def __init__(self, engine: Engine, max_batch: int, max_len: int | None = None, *,
                 prefill_chunk: int | None = None, use_cache: bool = True):
        self.engine, self.max_batch, self.use_cache = engine, max_batch, use_cache
        self.prefill_chunk = prefill_chunk
        block = engine.model.config.block_size
        self.max_len = block if engine.compiled or max_len is None else min(block, max_len)
        self.rows: list[Sequence] = []
        self._cached: list[int] = []  # per slot: tokens of the row's window in the cache (the truth for cache.lens)
        if engine.compiled:  # the whole pool and window: one static shape
            rows, room = max(MIN_ROWS, max_batch), self.max_len
        else:  # grown and shrunk with the rows (`_fit_cache`)
            rows, room = MIN_ROWS, min(self.max_len, SPAN_STEP)
        self.cache = KVCache(engine.model.config, rows, room, device=engine.device,
                             dtype=engine.cache_dtype()) if use_cache else None
        if engine.compiled and use_cache and engine.device.type == "cuda":  # a CUDA graph's inputs that the step
            # mutates in place must stay at fixed addresses
            for t in self.cache.k + self.cache.v + [self.cache.lens, self.cache.pad]:
                torch._dynamo.mark_static_address(t)
        self.last_prefill_tokens = self.last_decode_rows = 0

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    def add(self, seq: Sequence) -> None:
        if not self.free_slots:
            raise RuntimeError("no free slot in the pool")
        self.rows.append(seq)
        self._cached.append(0)

    @torch.inference_mode()  # the cache's buffers are inference tensors once `step` has resized them
    def remove(self, seq: Sequence) -> None:
        s, last = self.rows.index(seq), len(self.rows) - 1
        if s != last:
            self.rows[s], self._cached[s] = self.rows[last], self._cached[last]
            if self.cache is not None and self._cached[s]:  # a row added since the last step has nothing cached,
                self.cache.move(last, s, self._cached[s])  # and may lie beyond the cache's rows (`_fit_cache`)
        self.rows.pop()
        self._cached.pop()

    def _needs_prefill(self, s: int) -> int:
        """Tokens row s must still encode before its last token can go through the decode step."""
        if self.cache is None:
            return 0
        return len(self.rows[s].window) - 1 - self._cached[s]

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int, str]]:
        for s, row in enumerate(self.rows):
            if row.slid:  # the window slid: encode the kept tokens afresh
                row.slid, self._cached[s] = False, 0
        if self.cache is not None and not self.engine.compiled:
            self._fit_cache()
        self.last_prefill_tokens = self._prefill()
        ready = [s for s in range(len(self.rows)) if self._needs_prefill(s) == 0]
        self.last_decode_rows = len(ready)
        if not ready:
            return []
        logits = self._decode(ready)
        tokens = sample_rows([self.rows[s] for s in ready], logits)
        out = []
        for row, token in zip([self.rows[s] for s in ready], tokens):
            out.append((row, token, row.accept(token)))
            if row.finish_reason:
                self.remove(row)
        return out

    def _fit_cache(self) -> None:
        """Eagerly the cache holds the rows in use (a power of two of them, at least MIN_ROWS) and each row's room
        follows the longest window in the pool, in steps of SPAN_STEP. Attention then reads every row's keys
        from one contiguous stretch of memory: over a window-sized row the same reads are spread in short runs
        far apart, which made the 16-row decode step's attention 2x slower on CPU (benchmarks/RESULTS.md). And a
        resize copies and zeroes only the rows in use: 8 rows of a 32-slot pool move a quarter of the bytes.
        Grown when the rows or a window need more; shrunk when they need a quarter or less of the rows, or half
        or less of the room."""
        need = max((len(r.window) for r in self.rows), default=1)
        room = min(self.max_len, -(-need // SPAN_STEP) * SPAN_STEP)
        rows = max(MIN_ROWS, min(self.max_batch, 1 << (len(self.rows) - 1).bit_length()))
        have, size = self.cache.lens.size(0), self.cache.max_len
        if room > size or room <= size // 2 or rows > have or rows <= have // 4:
            self.cache.resize(rows, room, len(self.rows), max(self._cached, default=0))

    def _prefill(self) -> int:
        """Encode waiting rows' tokens, whole chunks while they fit in `prefill_chunk` tokens (at least one).
        Each round takes every waiting row's next chunk; rows in neighbouring slots go through one forward,
        shorter chunks padded (see `_prefill_rows`)."""
        budget, done = self.prefill_chunk, 0
        while True:
            chunks = []  # (slot, start, n) of this round
            for s in range(len(self.rows)):
                todo = self._needs_prefill(s)
                if todo <= 0:
                    continue
                start = self._cached[s]
                n = todo if self.prefill_chunk is None else min(todo, self.prefill_chunk - start % self.prefill_chunk)
                if budget is not None and done and done + n > budget:
                    break
                chunks.append((s, start, n))
                done += n
            if not chunks:
                return done
            group = [chunks[0]]
            for c in chunks[1:] + [None]:
                if c is not None and self._joins(group, c):
                    group.append(c)
                else:
                    self._prefill_rows(group)
                    group = [c]

    def _joins(self, group: list[tuple[int, int, int]], chunk: tuple[int, int, int]) -> bool:
        """Whether `chunk` can share a forward with `group`: the next slot, padding within the window, and the
        padded tokens at most `prefill_chunk` (or twice the real ones)."""
        s, start, n = chunk
        t = max(n, *(g[2] for g in group))
        padded = t * (len(group) + 1)
        real = n + sum(g[2] for g in group)
        return (s == group[-1][0] + 1 and max(start, *(g[1] for g in group)) + t <= self.cache.max_len
                and padded <= max(self.prefill_chunk or 0, 2 * real))

    def _prefill_rows(self, group: list[tuple[int, int, int]]) -> None:
        """One forward of the chunks of rows in consecutive slots, (rows, longest chunk): a shorter chunk is
        padded with token 0, whose keys/values land beyond the row's length, where nothing attends to them and
        the row's next real tokens overwrite them. A row's chunk boundaries are its own, so each row's cache is
        what it would be alone."""
        first, t = group[0][0], max(n for _, _, n in group)
        t = max(t, -(-MIN_ROWS // len(group)))  # a lone token gets a padding token (start + 2 <= len(window))
        span = max(start for _, start, _ in group) + t
        view = self.cache.view(slice(first, first + len(group)), span)
        view.lens.copy_(torch.tensor([start for _, start, _ in group]))
        idx = torch.tensor([self.rows[s].window[start:start + n] + [0] * (t - n) for s, start, n in group],
                           device=self.engine.device)
        self.engine.model.hidden(idx, view)
        for s, _, n in group:
            self._cached[s] += n

    def _decode(self, ready: list[int]) -> torch.Tensor:
        """Logits (len(ready), V) of the next token of each ready row."""
        e, dev = self.engine, self.engine.device
        if self.cache is None:
            return torch.cat([_last_logits(e.model, torch.tensor([self.rows[s].window], device=dev))
                              for s in ready])
        n = self.cache.lens.size(0) if e.compiled else max(MIN_ROWS, len(self.rows))
        tokens, lens = [0] * n, self._cached + [0] * (n - len(self.rows))
        for s in ready:
            tokens[s] = self.rows[s].window[-1]
        if e.compiled:
            cache = self.cache
        else:
            span = min(self.cache.max_len, -(-(max(lens) + 1) // SPAN_STEP) * SPAN_STEP)
            cache = self.cache.view(slice(0, n), span)
        cache.lens.copy_(torch.tensor(lens))
        logits = e.decode(e.model, torch.tensor(tokens, device=dev).view(-1, 1), cache)
        for s in ready:
            self._cached[s] += 1
        return logits[ready] if len(ready) < n else logits


@dataclass
class Step:
    """What one decoding step added: per row, the new token (None once the row has finished) and the new text
    that is safe to show (complete UTF-8 characters, never part of a stop string; '' without a tokenizer)."""
    tokens: list[int | None]
    text: list[str]


class Generation:
    """One generation over a batch of prompts. Iterate it for `Step`s as tokens come; afterwards (or at any
    point) `ids[b]` holds row b's new tokens (stop tokens excluded), `texts[b]` its text (cut before any stop
    string), `finish_reasons[b]` 'stop' or 'length' (None while running), and `new_tokens`/`seconds` the cost."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, use_cache: bool):
        self.engine, self.prompts, self.params, self.use_cache = engine, prompts, params, use_cache
        self.rows = [engine.sequence(p, replace(params, seed=params.seed + b)) for b, p in enumerate(prompts)]
        self.new_tokens, self.seconds = 0, 0.0
        self._started = False

    @property
    def ids(self) -> list[list[int]]:
        return [r.ids for r in self.rows]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [r.finish_reason for r in self.rows]

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        longest = max(len(r.window) for r in self.rows)
        pool = SlotPool(self.engine, len(self.rows), longest + self.params.max_new_tokens, use_cache=self.use_cache)
        for r in self.rows:
            pool.add(r)
        where = {id(r): b for b, r in enumerate(self.rows)}
        t0 = time.perf_counter()
        while pool.rows:
            drawn = pool.step()
            step = Step([None] * len(self.rows), [""] * len(self.rows))
            for row, token, text in drawn:
                b = where[id(row)]
                step.tokens[b], step.text[b] = token, text
            self.new_tokens += len(drawn)
            self.seconds = time.perf_counter() - t0
            yield step
