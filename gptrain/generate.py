"""Text generation: a KV-cache engine with the usual sampling controls, streaming, and the `sample` command.

One prefill pass encodes the (left-padded) prompts into a preallocated cache; each further token costs one
forward of a single position per row. The cache has static shapes, so under `compile=True` only that
one-token decode step is compiled, once per batch size: no recompiling per token (the prefill, whose length
changes with every prompt, runs eagerly). `use_cache=False` instead re-runs the full growing sequence of every
row at each token, as the lecture's loop does; it exists to check the cache against, token for token.

Per step, in order: repetition penalty, no-repeat n-gram ban, temperature (0 = greedy argmax), top-k, top-p,
then one draw per row from a `torch.Generator` seeded with `seed`, so a seed fixes the output.

Context window: `context="error"` (default) refuses up front when a prompt plus `max_new_tokens` could exceed
the model's `block_size`. `context="slide"` keeps going: when the window is full, every row keeps its last
`block_size // 2` tokens, which are re-encoded (positions restart at 0), and generation continues from there.
Both paths (cache and no cache) slide at the same moments, so they agree even across a slide.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from gptrain.errors import GptrainError
from gptrain.model import GPT, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate per sample at most"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int | None = field(default=50, metadata={"help": "sample among the k most likely tokens (none = all)"})
    top_p: float | None = field(default=None, metadata={"help": "sample from the smallest set of tokens whose "
                                                                "probability reaches p (nucleus)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "divide positive (multiply negative) logits of tokens already in the prompt or output; 1 = off"})
    no_repeat_ngram: int = field(default=0, metadata={"help": "never repeat an n-gram of this size; 0 = off"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same samples"})
    context: str = field(default="error", metadata={
        "choices": ("error", "slide"),
        "help": "when prompt + new tokens exceed the context window: error, or slide (re-encode the last half)"})
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one generated
    stop_ids: tuple[int, ...] | None = None  # stop tokens (excluded from the output); None = <|endoftext|>

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GptrainError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise GptrainError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise GptrainError(f"top_k={self.top_k} must be at least 1 (or none for no limit)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptrainError(f"top_p={self.top_p} must be in (0, 1] (or none for no limit)")
        if self.repetition_penalty <= 0:
            raise GptrainError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if self.no_repeat_ngram < 0:
            raise GptrainError(f"no_repeat_ngram={self.no_repeat_ngram} must be >= 0 (0 = off)")
        if self.context not in ("error", "slide"):
            raise GptrainError(f"context={self.context!r} must be 'error' or 'slide'")
        if any(not s for s in self.stop):
            raise GptrainError("a stop string is empty; give non-empty stop strings")


@dataclass
class Step:
    """What one decoding step added: per row, the new token (None once the row has finished) and the new text
    that is safe to show (complete UTF-8 characters, never part of a stop string; '' without a tokenizer)."""
    tokens: list[int | None]
    text: list[str]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k, top-p, draw."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


class TextStream:
    """Token ids -> text, incrementally, for one row. Bytes of a character split across tokens are held until
    the character is complete; text that may be the start of a stop string is held until it is known not to be.
    `stopped` turns True once a stop string appears; the text then ends just before it. Special tokens
    (<|endoftext|>, the chat tokens) are markup, not text: they add nothing."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._token_bytes = tokenizer.enc.decode_single_token_bytes
        self._special = set(tokenizer.special_tokens.values())
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.text = ""  # decoded so far, possibly past a stop string
        self.shown = 0  # how much of `text` has been handed out
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped or token in self._special:
            return ""
        self.text += self._utf8.decode(self._token_bytes(token))
        hits = [i for i in (self.text.find(s, self.shown) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(min(hits))
        held = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])), default=0)
        return self._show(len(self.text) - held)

    def finish(self) -> str:
        """The held-back rest, at the end of generation (an incomplete character shows as U+FFFD)."""
        if self.stopped:
            return ""
        self.text += self._utf8.decode(b"", final=True)
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        new, self.shown = self.text[self.shown:max(end, self.shown)], max(end, self.shown)
        if self.stopped:
            self.text = self.text[:self.shown]
        return new


def _last_logits(model: GPT, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    return model.logits(model.hidden(idx, cache)[:, -1]).float()


class _Window:
    """The tokens each row's model currently sees (at most block_size), and the forward passes over them.

    `start()` encodes the prompts; `feed(tokens)` appends one token per row and returns the next logits. When a
    row would exceed the window, every row keeps its last `keep` tokens and is encoded afresh (context='slide').
    """

    def __init__(self, engine: "Engine", prompts: list[list[int]], use_cache: bool, max_new_tokens: int):
        self.engine, self.use_cache = engine, use_cache
        self.block = engine.model.config.block_size
        self.keep = max(1, self.block // 2)
        self.rows = [list(p[-self.block:]) for p in prompts]
        longest = max(len(r) for r in self.rows)
        self.cache_len = self.block if engine.compiled else min(self.block, longest + max_new_tokens)
        self.cache: KVCache | None = None

    @torch.inference_mode()
    def start(self) -> torch.Tensor:
        model, device = self.engine.model, self.engine.device
        if not self.use_cache:
            return torch.cat([_last_logits(model, torch.tensor([r], device=device)) for r in self.rows])
        width = max(len(r) for r in self.rows)
        pad = [width - len(r) for r in self.rows]
        idx = torch.tensor([[0] * p + r for p, r in zip(pad, self.rows)], device=device)
        kind = device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.engine.dtype
        self.cache = KVCache(model.config, len(self.rows), self.cache_len, pad=torch.tensor(pad), device=device,
                             dtype=dtype)  # the dtype keys/values come out in (under autocast, the trainer's)
        return _last_logits(model, idx, self.cache)

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        for r, t in zip(self.rows, tokens):
            r.append(t)
        if max(len(r) for r in self.rows) > self.block:
            self.rows = [r[-self.keep:] for r in self.rows]
            return self.start()
        if not self.use_cache:
            return self.start()
        idx = torch.tensor(tokens, device=self.engine.device).view(-1, 1)
        return self.engine._decode(self.engine.model, idx, self.cache)


class _Penalties:
    """Repetition penalty and no-repeat n-gram ban, over each row's prompt and output so far."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, vocab: int, device):
        self.penalty, self.n = params.repetition_penalty, params.no_repeat_ngram
        self.history = [list(p) for p in prompts]
        self.seen = None
        if self.penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
            for b, p in enumerate(prompts):
                self.seen[b, torch.tensor(p, device=device)] = True
        self.ngrams: list[dict[tuple, set[int]]] = [{} for _ in prompts]
        if self.n:
            for b, h in enumerate(self.history):
                for i in range(len(h) - self.n + 1):
                    self.ngrams[b].setdefault(tuple(h[i:i + self.n - 1]), set()).add(h[i + self.n - 1])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.n:
            for b, h in enumerate(self.history):
                banned = self.ngrams[b].get(tuple(h[len(h) - self.n + 1:]))
                if banned:
                    logits[b, list(banned)] = float("-inf")
        return logits

    def add(self, tokens: list[int]) -> None:
        for b, t in enumerate(tokens):
            h = self.history[b]
            h.append(t)
            if self.n and len(h) >= self.n:
                self.ngrams[b].setdefault(tuple(h[len(h) - self.n:-1]), set()).add(t)
        if self.seen is not None:
            self.seen[torch.arange(len(tokens)), torch.tensor(tokens, device=self.seen.device)] = True


class Generation:
    """One generation over a batch of prompts. Iterate it for `Step`s as tokens come; afterwards (or at any
    point) `ids[b]` holds row b's new tokens (stop tokens excluded), `texts[b]` its text (cut before any stop
    string), `finish_reasons[b]` 'stop' or 'length' (None while running), and `new_tokens`/`seconds` the cost."""

    def __init__(self, engine: "Engine", prompts: list[list[int]], params: SamplingParams, use_cache: bool):
        self.engine, self.prompts, self.params, self.use_cache = engine, prompts, params, use_cache
        self.ids: list[list[int]] = [[] for _ in prompts]
        self.texts = ["" for _ in prompts]
        self.finish_reasons: list[str | None] = [None for _ in prompts]
        self.new_tokens, self.seconds = 0, 0.0
        self._started = False

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        e, p, B = self.engine, self.params, len(self.prompts)
        stop_ids = set(p.stop_ids if p.stop_ids is not None else (e.eot,))
        streams = [TextStream(e.tokenizer, p.stop) for _ in range(B)] if e.tokenizer else None
        generator = torch.Generator(device=e.device).manual_seed(p.seed)
        penalties = _Penalties(self.prompts, p, e.model.config.vocab_size, e.device)
        window = _Window(e, self.prompts, self.use_cache, p.max_new_tokens)
        t0 = time.perf_counter()
        logits = window.start()
        for i in range(p.max_new_tokens):
            with torch.inference_mode():
                logits = penalties.apply(logits)
                tokens = sample_from_logits(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                            generator=generator).tolist()
            step = Step([None] * B, [""] * B)
            for b, t in enumerate(tokens):
                if self.finish_reasons[b]:
                    continue
                step.tokens[b] = t
                self.new_tokens += 1
                if t in stop_ids:
                    self.finish_reasons[b] = "stop"
                else:
                    self.ids[b].append(t)
                    if streams:
                        step.text[b] = streams[b].add(t)
                        if streams[b].stopped:
                            self.finish_reasons[b] = "stop"
                if not self.finish_reasons[b] and i == p.max_new_tokens - 1:
                    self.finish_reasons[b] = "length"
                if self.finish_reasons[b] and streams:
                    step.text[b] += streams[b].finish()
                self.texts[b] += step.text[b]
            self.seconds = time.perf_counter() - t0
            yield step
            if all(self.finish_reasons) or i == p.max_new_tokens - 1:
                break
            penalties.add(tokens)
            logits = window.feed(tokens)
            self.seconds = time.perf_counter() - t0


class Engine:
    """Generates from one model. Holds the (optionally compiled) decode step; each `generate` call has its own
    cache and random generator. Not re-entrant: run one generation at a time (a server serialises with a lock).

    The model may be wrapped by DDP or torch.compile: generation uses the plain module underneath, in its own
    dtype and device."""

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
        self._decode = torch.compile(_last_logits, fullgraph=True) if compile else _last_logits

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, *, use_cache: bool = True,
                 **overrides) -> Generation:
        """Start generating from a batch of token-id prompts (any lengths); iterate the result to run it."""
        from dataclasses import replace
        params = replace(params or SamplingParams(), **overrides)
        params.validate()
        if self.compiled and not use_cache:
            raise GptrainError("compile needs the KV cache: the cache-free path recompiles at every length")
        if params.stop and self.tokenizer is None:
            raise GptrainError(f"stop strings need a tokenizer; the model's vocabulary of "
                               f"{self.model.config.vocab_size} matches none")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GptrainError("every prompt needs at least one token (start an unconditional sample with "
                               "<|endoftext|>)")
        vocab, block = self.model.config.vocab_size, self.model.config.block_size
        for b, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise GptrainError(f"prompt {b} has token id {bad[0]} outside the model's vocabulary of {vocab}")
            if params.context == "error" and len(p) + params.max_new_tokens > block:
                raise GptrainError(
                    f"prompt {b} of {len(p)} tokens + max_new_tokens={params.max_new_tokens} exceeds the model's "
                    f"context window of {block} tokens; shorten the prompt, lower max_new_tokens, or let the "
                    "window slide (context='slide', --context slide)")
        return Generation(self, [list(p) for p in prompts], params, use_cache)


def complete(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_ids: list[int] | None = None, use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt (stop tokens excluded): the one-call form the trainer uses for samples."""
    gen = Engine(model).generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, use_cache=use_cache,
                                 stop_ids=tuple(stop_ids) if stop_ids is not None else None)
    for _ in gen:
        pass
    return gen.ids


# --- the `sample` command -------------------------------------------------------------------------------------

@dataclass
class SampleConfig:
    num_samples: int = field(default=1, metadata={"help": "samples to generate, as one batch"})
    kv_cache: bool = field(default=True, metadata={"help": "use the KV cache (--no-kv-cache: full forward per token)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})


SAMPLE_SEPARATOR = "\n\n---\n\n"  # between samples on stdout


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptrainError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptrainError(f"--device {name} asked for CUDA, which this machine lacks; use --device cpu")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gptrain.config import add_dataclass_args
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="HF GPT-2 directory or hub name (local cache), gptrain run dir or checkpoint")
    parser.add_argument("--prompt", default="", help="text to continue ('' = unconditional; '-' = read stdin)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop a sample at this string (repeatable)")
    add_dataclass_args(parser, SamplingParams, exclude=("stop", "stop_ids"))
    add_dataclass_args(parser, SampleConfig)


def main(args: argparse.Namespace) -> int:
    from gptrain.config import overrides_from_args
    from gptrain.hf import load_model
    params = SamplingParams(**{**overrides_from_args(args, SamplingParams), "stop": tuple(args.stop)})
    cfg = SampleConfig(**overrides_from_args(args, SampleConfig))
    if cfg.num_samples < 1:
        raise GptrainError(f"--num-samples {cfg.num_samples} must be at least 1")
    params.validate()
    model = load_model(args.model).to(resolve_device(cfg.device)).eval()
    engine = Engine(model, compile=cfg.compile)
    if engine.tokenizer is None:
        raise GptrainError(f"model {args.model} has a vocabulary of {model.config.vocab_size} tokens, which no "
                           "gptrain tokenizer reads")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = engine.tokenizer.encode(text) or [engine.eot]
    gen = engine.generate([prompt] * cfg.num_samples, params, use_cache=cfg.kv_cache)
    _print_in_order(gen, cfg.num_samples)
    print(f"gptrain sample: {cfg.num_samples} sample(s), prompt {len(prompt)} tokens, {gen.new_tokens} new "
          f"tokens in {gen.seconds:.2f}s ({gen.new_tokens / max(gen.seconds, 1e-9):.1f} tokens/s, "
          f"{'KV cache' if cfg.kv_cache else 'no cache'}{', compile time included' if cfg.compile else ''}, "
          f"{engine.device})",
          file=sys.stderr)
    return 0


def _print_in_order(gen: Generation, n: int) -> None:
    """Stream sample 0 as it comes; later samples (generated in the same batch) follow in order."""
    out, current, pending = sys.stdout, 0, [""] * n
    for step in gen:
        for b, piece in enumerate(step.text):
            pending[b] += piece
        while current < n:
            out.write(pending[current])
            pending[current] = ""
            if gen.finish_reasons[current] is None:
                break
            current += 1
            out.write(SAMPLE_SEPARATOR if current < n else "\n")
        out.flush()
