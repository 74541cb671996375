"""GPT-2, top to bottom, exactly as OpenAI's (so published weights load and published numbers mean something).

Learned positions, pre-LayerNorm blocks, tanh-GELU MLP of width 4C, fused QKV, causal attention through
`scaled_dot_product_attention`, final LayerNorm, `lm_head` tied to `wte`. The embedding table is padded to a
multiple of 64 rows for speed; rows at or above `vocab_size` (the tokenizer's vocabulary) never reach a user:
`forward` returns logits for real tokens only and the loss never sees the padded rows, so a model loaded with
50257 rows trains and scores exactly as it would unpadded.

The model knows nothing of DDP, FSDP or torch.compile: those are applied from outside (gptrain/train/distributed.py).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptrain.loss import lm_loss


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # context window (T)
    vocab_size: int = 50257  # the tokenizer's vocabulary: ids the model can read and emit
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    pad_vocab_to: int = 64  # embedding rows are padded up to a multiple of this (50257 -> 50304)

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_to)
        return ((self.vocab_size + m - 1) // m) * m

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_head dividing n_embd")
        for f in fields(self):
            if getattr(self, f.name) <= 0 and f.name != "pad_vocab_to":
                raise ValueError(f"model config {f.name}={getattr(self, f.name)} must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


# Named shapes. The GPT-3 family is the paper's Table 2.1 (T = 2048) with dense attention in every layer (the paper
# alternates dense and locally banded sparse layers; that is not reproduced). XL is listed there as 24 heads of
# 128 for d_model 2048, which cannot both hold: gptrain keeps d_model and the head size, so 16 heads (README).
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "gpt3-small": GPTConfig(block_size=2048, n_layer=12, n_head=12, n_embd=768),
    "gpt3-medium": GPTConfig(block_size=2048, n_layer=24, n_head=16, n_embd=1024),
    "gpt3-large": GPTConfig(block_size=2048, n_layer=24, n_head=16, n_embd=1536),
    "gpt3-xl": GPTConfig(block_size=2048, n_layer=24, n_head=16, n_embd=2048),
    "gpt3-2.7b": GPTConfig(block_size=2048, n_layer=32, n_head=32, n_embd=2560),
    "gpt3-6.7b": GPTConfig(block_size=2048, n_layer=32, n_head=32, n_embd=4096),
    "tiny": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),  # the CPU demo (see train preset "tiny")
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


class KVCache:
    """Preallocated keys/values for incremental decoding: `batch_size` rows ("slots") of `max_len` positions,
    each row with its own fill level, so rows of different lengths decode together.

    `lens[b]` is how many slots row b has filled; its next token goes to slot `lens[b]`. A left-padded batch
    (`pad[b]` leading padding slots, all rows filled alike) and a pool of independent rows (pad 0, each row its
    own length: gptrain/engine.py's continuous batching) are the same thing. Padding slots are never attended
    to and positions count from a row's first real token, so each row decodes exactly as it would alone.

    Shapes are static: attention spans all `max_len` slots (unfilled ones masked out) and the fill levels are a
    tensor, so a compiled decode step sees the same shapes and no changing Python int at every token, and
    compiles once. `view(rows, span)` narrows a cache (no copy) to some rows and the first `span` slots, for
    eager steps that need not attend over the whole window; `resize` changes the rows and every row's room (the
    eager pool's cache follows its rows in use and its longest row). The caller keeps `lens + t <= max_len`.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, pad: torch.Tensor | None = None,
                 device=None, dtype=torch.float32):
        if max_len > config.block_size:
            raise ValueError(f"KV cache of {max_len} tokens exceeds the model's context window of {config.block_size}")
        hd = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hd)
        # One tensor per layer, so an in-place write mutates a whole graph input rather than a view of one.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pad = (pad if pad is not None else torch.zeros(batch_size, dtype=torch.long)).to(device)
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots filled, per row
        self.max_len = max_len
        self._where = None  # where this forward's keys/values go, in every layer (set by begin)

    def begin(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a forward of t tokens per row: their position ids (B, t) and the boolean (B, 1, t, max_len)
        attention mask, causal within each row, padding slots never attended by real tokens; `update` then
        writes each layer's keys/values at the rows' next t slots.

        A padding slot attends to itself, so no row of the mask is empty (an empty row gives NaN on some
        attention kernels, and NaN in a padding slot would leak through the zero weights of real rows).
        """
        dev, (B, H) = self.lens.device, self.k[0].shape[:2]
        slots = self.lens[:, None] + torch.arange(t, device=dev)  # (B, t)
        # index_put_, not scatter_, in update: scatter_ is ~100x slower in bf16 on CPU
        self._where = (torch.arange(B, device=dev)[:, None, None], torch.arange(H, device=dev)[None, :, None],
                       slots[:, None, :])
        k = torch.arange(self.max_len, device=dev)
        real = k >= self.pad[:, None, None]
        mask = ((k <= slots[:, :, None]) & (real | (k == slots[:, :, None])))[:, None]
        return (slots - self.pad[:, None]).clamp(min=0), mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values (B, H, t, hd) where `begin` said; return the whole (masked) buffers."""
        self.k[layer].index_put_(self._where, k.to(self.k[layer].dtype))
        self.v[layer].index_put_(self._where, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        self.lens.add_(t)

    def view(self, rows: slice, span: int) -> "KVCache":
        """This cache narrowed to `rows` and the first `span` slots, sharing its memory (writes go through)."""
        out = copy.copy(self)
        out.k = [k[rows, :, :span] for k in self.k]
        out.v = [v[rows, :, :span] for v in self.v]
        out.pad, out.lens, out.max_len = self.pad[rows], self.lens[rows], span
        return out

    def resize(self, batch_size: int, max_len: int, rows: int, filled: int) -> None:
        """Make room for `batch_size` rows of `max_len` slots, keeping the first `filled` slots of the first `rows`
        rows (those it has). One layer at a time, so the memory held at once grows by one layer's buffers, not the
        whole cache's."""
        rows = min(rows, self.lens.size(0), batch_size)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                bufs[i] = old.new_zeros(batch_size, old.size(1), max_len, old.size(3))
                bufs[i][:rows, :, :filled] = old[:rows, :, :filled]
        self.pad, self.lens = (torch.cat([t[:rows], t.new_zeros(batch_size - rows)]) for t in (self.pad, self.lens))
        self.max_len = max_len

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy row src's first n slots (and its fill level) into row dst."""
        for buf in self.k + self.v:
            buf[dst, :, :n] = buf[src, :, :n]
        self.pad[dst], self.lens[dst] = self.pad[src], self.lens[src]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache made of the given rows of this one (a row may repeat), at the same fill levels.

        Lets one prefilled prompt continue as several rows: gptrain/eval/scoring.py runs a shared context once,
        then scores each of its continuations on a copy of that context's row.
        """
        rows = rows.to(self.lens.device)
        out = copy.copy(self)
        out.k = [k.index_select(0, rows) for k in self.k]
        out.v = [v.index_select(0, rows) for v in self.v]
        out.pad, out.lens = self.pad.index_select(0, rows), self.lens.index_select(0, rows)
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.update(layer, k, v)  # in the cache's dtype (float32 for a bf16 model on CPU: engine.py)
            q = q.to(k.dtype)
            if T == 1 and q.device.type == "cpu":
                y = _decode_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.to(x.dtype)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def _decode_attention(q, k, v, mask):
    """One new token's attention (B, H, 1, hd) over the cache: matmul, softmax, matmul. On CPU this is 3-8x
    faster than scaled_dot_product_attention's kernels for a query of one token (benchmarks/RESULTS.md)."""
    scores = (q @ k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5).masked_fill_(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        x = x + self.attn(self.ln_1(x), layer, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # N(0, 0.02) everywhere; residual projections scaled by 1/sqrt(2 * n_layer) (two per block); biases zero.
        if isinstance(module, nn.Linear):
            std = 0.02 * (2 * self.config.n_layer) ** -0.5 if getattr(module, "RESIDUAL_SCALE", False) else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C)."""
        B, T = idx.size()
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context window of {self.config.block_size}")
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            pos, mask = cache.begin(T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, cache, mask)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Returns (logits over the real vocabulary, mean loss or None). Targets equal to -1 are ignored."""
        x = self.hidden(idx, cache)
        if targets is not None:
            return None, lm_loss(x, self.lm_head.weight, targets, self.config.vocab_size)
        return self.logits(x), None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)[..., : self.config.vocab_size]

    def num_params(self, padded: bool = True) -> int:
        """Parameter count (tied weights once). padded=False counts only the real vocabulary's rows."""
        n = sum(p.numel() for p in self.parameters())
        if not padded:
            n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·T·C (PaLM appendix B, as nanoGPT's MFU)."""
        c = self.config
        T = seq_len or c.block_size
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * T * c.n_embd

    def estimate_mfu(self, tokens_per_sec: float, seq_len: int, peak_flops: float) -> float:
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    @classmethod
    def from_pretrained(cls, src: str, **kwargs) -> "GPT":
        """Load from a Hugging Face GPT-2 directory, a hub name in the local HF cache, or a gptrain run/checkpoint."""
        from gptrain.hf import load_model
        return load_model(src, **kwargs)

    def save_pretrained(self, out_dir: str, **kwargs) -> None:
        """Write a directory that transformers' AutoModelForCausalLM / AutoTokenizer load offline."""
        from gptrain.hf import save_pretrained
        save_pretrained(self, out_dir, **kwargs)

