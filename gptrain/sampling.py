"""Sampling: the settings of one request, logits filtering, and the per-row state that turns logits into tokens
and tokens into text.

Per token, in order: repetition penalty, no-repeat n-gram ban, temperature (0 = greedy argmax), top-k, top-p,
then one draw: a uniform number from the row's own `torch.Generator` seeded with `seed`, turned into a token by
the inverse of the kept tokens' cumulative distribution. A seed therefore fixes a row's output whatever else runs
in the same batch, and `sample_rows` samples a whole batch at once (rows of the same settings filtered together,
one copy of the tokens to the host per step, not one per row).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import torch

from gptrain.errors import GptrainError


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate per sample at most", "ge": 1})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy", "ge": 0})
    top_k: int | None = field(default=50, metadata={"help": "sample among the k most likely tokens (none = all)",
                                                     "ge": 1})
    top_p: float | None = field(default=None, metadata={"help": "sample from the smallest set of tokens whose "
                                                                "probability reaches p (nucleus)", "gt": 0, "le": 1})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "divide positive (multiply negative) logits of tokens already in the prompt or output; 1 = off",
        "ge": 0.01, "le": 100})
    no_repeat_ngram: int = field(default=0, metadata={"help": "never repeat an n-gram of this size; 0 = off",
                                                      "ge": 0})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same samples",
                                           "ge": -(1 << 63), "le": (1 << 63) - 1})
    context: str = field(default="error", metadata={
        "choices": ("error", "slide"),
        "help": "when prompt + new tokens exceed the context window: error, or slide (re-encode the last half)"})
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one generated
    stop_ids: tuple[int, ...] | None = None  # stop tokens (excluded from the output); None = <|endoftext|>

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GptrainError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not self.temperature >= 0:
            raise GptrainError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise GptrainError(f"top_k={self.top_k} must be at least 1 (or none for no limit)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptrainError(f"top_p={self.top_p} must be in (0, 1] (or none for no limit)")
        if not 0.01 <= self.repetition_penalty <= 100:
            raise GptrainError(f"repetition_penalty={self.repetition_penalty} must be in [0.01, 100] (1 = off)")
        if self.no_repeat_ngram < 0:
            raise GptrainError(f"no_repeat_ngram={self.no_repeat_ngram} must be >= 0 (0 = off)")
        if self.context not in ("error", "slide"):
            raise GptrainError(f"context={self.context!r} must be 'error' or 'slide'")
        if any(not s for s in self.stop):
            raise GptrainError("a stop string is empty; give non-empty stop strings")


def sample_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k, top-p
    (the smallest set of the most likely tokens whose probability reaches p), one draw from what is left.

    The draw is over the kept tokens only (top-k 50 draws among 50, not among the whole vocabulary). It takes
    row b's uniform number u in [0, 1) from `uniform` (B,) when given, else from `generator`, and returns the
    first kept token whose cumulative probability exceeds u times the total; u is kept below 1 - 2^-23, so that
    product stays below the total in float32 and a token of probability 0 (filtered, or banned by
    no_repeat_ngram) is never drawn."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that float32 would divide by zero
        return logits.argmax(-1)
    logits = logits.float()
    # Shifted by the row's maximum first (the softmax is unchanged), so a tiny temperature cannot overflow to inf.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    index = None
    if top_k is not None and top_k < logits.size(-1):
        logits, index = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    if top_p is not None and top_p < 1.0:
        if index is None:
            logits, index = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches p
        outside[:, 0] = False  # the most likely token always stays (a tiny p can round to 0 in float32)
        logits = logits.masked_fill(outside, float("-inf"))
    if uniform is None:
        uniform = torch.rand(logits.size(0), generator=generator, device=logits.device)
    cdf = logits.softmax(-1).cumsum(-1)
    pick = torch.searchsorted(cdf, uniform.float().clamp(max=1 - 2 ** -23).view(-1, 1) * cdf[:, -1:], right=True)
    return (pick if index is None else index.gather(-1, pick)).view(-1)


def sample_rows(rows: list["Sequence"], logits: torch.Tensor) -> list[int]:
    """The next token of each row from the batch's logits (len(rows), V), as `Sequence.pick` would give each row
    alone: a row's penalties apply to its own logits, rows with the same temperature/top-k/top-p are filtered and
    drawn together (each with its own uniform number), and the tokens reach the host in one copy."""
    logits = logits.float()
    adjusted = [i for i, r in enumerate(rows) if r.adjusts]
    if adjusted:
        logits = logits.clone()
        for i in adjusted:
            logits[i:i + 1] = rows[i].adjust(logits[i:i + 1])
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.params.temperature, r.params.top_k, r.params.top_p), []).append(i)
    if len(groups) == 1:
        [(temperature, top_k, top_p)] = groups
        return _draw(rows, logits, temperature, top_k, top_p).tolist()
    picks = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    for (temperature, top_k, top_p), idx in groups.items():
        sel = torch.tensor(idx, device=logits.device)
        picks[sel] = _draw([rows[i] for i in idx], logits[sel], temperature, top_k, top_p)
    return picks.tolist()


def _draw(rows, logits, temperature, top_k, top_p) -> torch.Tensor:
    uniform = None if temperature < torch.finfo(torch.float32).tiny else torch.cat([r.uniform() for r in rows])
    return sample_from_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform)


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


class Sequence:
    """One row being generated: its settings, own generator, penalties, text stream, and what the model sees.

    `sample_rows([row, ...], logits)` draws the next token of rows; `accept(token)` records it and returns the
    new text that is safe to show, setting `finish_reason` ('stop' for a stop id or stop string, 'length' at
    `max_new_tokens`). `ids` are the new tokens (stop tokens excluded), `text` their text (cut before a stop
    string), `sampled` every token drawn. `window` is the tokens the model currently conditions on (at most
    `block_size`): when a token would overflow it (context='slide'), the row keeps its last `block_size // 2`
    tokens and `slid` tells the engine to encode them afresh.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, *, tokenizer, eot: int, vocab: int,
                 block_size: int, device):
        self.prompt, self.params = [int(t) for t in prompt], params
        self.stop_ids = set(params.stop_ids if params.stop_ids is not None else (eot,))
        self.stream = TextStream(tokenizer, params.stop) if tokenizer is not None else None
        self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.block, self.keep = block_size, max(1, block_size // 2)
        self.window = self.prompt[-block_size:]
        self.slid = False
        self.ids: list[int] = []
        self.text = ""
        self.sampled = 0
        self.finish_reason: str | None = None
        self._history = list(self.prompt)  # prompt and output: what the penalties look at
        self._seen = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self._seen[0, torch.tensor(self.prompt, device=device)] = True
        self._ngrams: dict[tuple, set[int]] = {}
        n = params.no_repeat_ngram
        for i in range(len(self._history) - n + 1 if n else 0):
            self._ngrams.setdefault(tuple(self._history[i:i + n - 1]), set()).add(self._history[i + n - 1])

    @property
    def adjusts(self) -> bool:
        """Whether this row changes its logits before drawing (a repetition penalty, a no-repeat n-gram size)."""
        return self._seen is not None or bool(self.params.no_repeat_ngram)

    def uniform(self) -> torch.Tensor:
        """This row's next uniform number (1,), from its own generator."""
        return torch.rand(1, generator=self.generator, device=self.generator.device)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits (1, V) after its repetition penalty and no-repeat n-gram ban."""
        p = self.params
        if self._seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self._seen, penalised, logits)
        if p.no_repeat_ngram:
            banned = self._ngrams.get(tuple(self._history[len(self._history) - p.no_repeat_ngram + 1:]))
            if banned:
                logits = logits.index_fill(1, torch.tensor(sorted(banned), device=logits.device), float("-inf"))
        return logits

    def accept(self, token: int) -> str:
        self.sampled += 1
        piece = ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            if self.stream:
                piece = self.stream.add(token)
                if self.stream.stopped:
                    self.finish_reason = "stop"
        if not self.finish_reason and self.sampled >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason:
            piece += self.stream.finish() if self.stream else ""
        else:
            self._remember(token)
        self.text += piece
        return piece

    def _remember(self, token: int) -> None:
        h, n = self._history, self.params.no_repeat_ngram
        h.append(token)
        if n and len(h) >= n:
            self._ngrams.setdefault(tuple(h[len(h) - n:-1]), set()).add(token)
        if self._seen is not None:
            self._seen[0, token] = True
        self.window.append(token)
        if len(self.window) > self.block:
            self.window, self.slid = self.window[-self.keep:], True
