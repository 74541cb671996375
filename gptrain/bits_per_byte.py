"""Validation loss as bits per byte of the original text: the tokenizer-independent figure (nanochat's), so runs
with different tokenizers, or a model against a compressor, compare.

    bpb = (sum of the evaluated targets' losses in nats) / (ln 2 × UTF-8 bytes of the text those targets stand for)
        = val_loss × targets / (bytes × ln 2)

The bytes are exactly those of the evaluated targets (an evaluation reads the first --val-tokens of the split,
not all of it): each token stands for a fixed byte string (byte-level BPE), so the count is a table lookup
(Tokenizer.token_bytes), no decoding, and works for data prepared before manifests recorded bytes.
`<|endoftext|>` (and the chat tokens) stand for no text: 0 bytes, while their targets' loss counts, as the
cost of coding the document boundaries.
"""

from __future__ import annotations

import math

import torch


class ByteCounter:
    """Bytes of the text behind target ids, on the targets' device (-1, SFT's masked positions, count 0)."""

    def __init__(self, token_bytes, device=None):
        self.table = torch.as_tensor(token_bytes, dtype=torch.int64, device=device)

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        if self.table.device != targets.device:
            self.table = self.table.to(targets.device)
        return torch.where(targets >= 0, self.table[targets.clamp(min=0)], 0).sum()


def bits_per_byte(loss_sum_nats: float, n_bytes: float) -> float | None:
    """None when the targets stand for no text at all."""
    return loss_sum_nats / (math.log(2) * n_bytes) if n_bytes > 0 else None
