"""GPT-2's BPE through tiktoken, fully offline: the ranks file ships inside the package and is verified on load.

`get_tokenizer()` builds the same encoding as tiktoken's `gpt2` (same ranks, same regex, `<|endoftext|>` = 50256).
`get_tokenizer(chat=True)` adds the conversation tokens in the padded embedding rows (ids 50257 and up), so
pretrained GPT-2 weights stay usable for chat fine-tuning.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cached_property, lru_cache
from importlib import resources

import numpy as np
import tiktoken

from gptrain.errors import GptrainError

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k/gpt2 pre-tokenization regex.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
# Conversation tokens, in the order of their ids from 50257 (see gptrain/chat/format.py for the layout).
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class TokenizerError(GptrainError):
    pass


def _ranks_bytes() -> bytes:
    path = resources.files("gptrain") / "assets" / "gpt2.tiktoken"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"GPT-2 vocabulary {path} is missing; reinstall gptrain (pip install --force-reinstall gptrain)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise TokenizerError(f"GPT-2 vocabulary {path} has sha256 {digest}, expected {GPT2_RANKS_SHA256}; "
                             "the file is altered: reinstall gptrain")
    return data


@lru_cache(maxsize=1)
def gpt2_ranks() -> dict[bytes, int]:
    ranks = {}
    for line in _ranks_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """A tiktoken Encoding plus what gptrain needs to know about it (name, identity hash, special ids)."""

    def __init__(self, chat: bool = False):
        special = {ENDOFTEXT: EOT_ID}
        if chat:
            special.update({tok: EOT_ID + 1 + i for i, tok in enumerate(CHAT_TOKENS)})
        self.name = "gpt2-chat" if chat else "gpt2"
        self.enc = tiktoken.Encoding(name=self.name, pat_str=GPT2_PATTERN, mergeable_ranks=gpt2_ranks(),
                                     special_tokens=special)
        self.special_tokens = special
        self.eot = EOT_ID
        self.n_vocab = self.enc.n_vocab

    @property
    def sha256(self) -> str:
        """Identity of the vocabulary: the ranks file's hash, plus the special tokens for chat variants."""
        if self.name == "gpt2":
            return GPT2_RANKS_SHA256
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.special_tokens.items(), key=lambda kv: kv[1]))
        return hashlib.sha256((GPT2_RANKS_SHA256 + extra).encode()).hexdigest()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ordinary text encoding; special-token strings are encoded as plain text unless allow_special."""
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes behind each token id (int64; 0 for special tokens such as <|endoftext|>, which stand for
        no text). GPT-2's BPE works on bytes, so the bytes of the text behind any tokens are the sum of theirs:
        bits per byte (gptrain/bits_per_byte.py) and prepare's byte counts need no decoding."""
        out = np.zeros(self.n_vocab, dtype=np.int64)
        ranks = gpt2_ranks()
        out[np.fromiter(ranks.values(), dtype=np.int64)] = np.fromiter(map(len, ranks), dtype=np.int64)
        return out

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise TokenizerError(f"{token!r} is not a special token of tokenizer {self.name!r}")
        return self.special_tokens[token]


def get_tokenizer(chat: bool = False) -> Tokenizer:
    """The shared instance: get_tokenizer(), get_tokenizer(False) and get_tokenizer(chat=False) are one object."""
    return _shared_tokenizer(bool(chat))


@lru_cache(maxsize=2)
def _shared_tokenizer(chat: bool) -> Tokenizer:
    return Tokenizer(chat=chat)


def tokenizer_for_vocab(vocab_size: int) -> Tokenizer:
    """The tokenizer a model with this vocabulary reads: GPT-2's, or GPT-2's plus the chat tokens."""
    for chat in (False, True):
        tok = get_tokenizer(chat)
        if tok.n_vocab == vocab_size:
            return tok
    raise TokenizerError(f"no gptrain tokenizer has a vocabulary of {vocab_size} tokens "
                         f"(gpt2 has {get_tokenizer(False).n_vocab}, gpt2-chat {get_tokenizer(True).n_vocab})")
