"""Linear layers with their weights reordered once into oneDNN's blocked layout, for serving bf16 on CPU.

torch's bfloat16 `F.linear` on CPU runs oneDNN's matmul, which reorders the weight into its blocked layout on
every call; for the few rows of a decode step that reorder costs about as much as the product itself.
`pack_linears(model)` swaps each `nn.Linear` of a model (the blocks' four and the tied `lm_head`) for a
`PackedLinear` that did the reorder once: a decode step of GPT-2 124M at one thread takes 0.7x the CPU time at
one row and 0.8x at 16 (benchmarks/RESULTS.md, issue 22). The same oneDNN kernel runs, so outputs are bit-equal to
`F.linear`; that is checked for every layer when packing, and a layer that differs stays as it was.

The parameters stay where they were (state_dict, the tied head and `parameters()` are unchanged); the packed copy
costs the linear weights' memory once more. Serving applies it to the model it owns (gptrain/serve/service.py);
training never sees a packed layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS_HINT = 16  # oneDNN's reorder takes an expected row count; every row count works with the result


class PackedLinear(nn.Module):
    """`linear`'s product through a weight reordered once (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: nothing is copied or untied
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(param: torch.Tensor) -> bool:
    """Whether this torch and CPU run oneDNN's packed linear for `param`'s device and dtype (bf16 on a CPU with
    AVX512-BF16 or AMX)."""
    return (param.device.type == "cpu" and param.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Swap `model`'s nn.Linear layers for PackedLinear where the packed product is bit-equal to F.linear on a
    probe of a few rows; returns how many were swapped (0 where `can_pack` says no)."""
    if not can_pack(next(model.parameters())):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            packed = PackedLinear(child)
            probe = torch.randn(3, child.in_features, generator=torch.Generator().manual_seed(swapped))
            probe = probe.to(child.weight.dtype)
            if torch.equal(packed(probe), F.linear(probe, child.weight, child.bias)):
                setattr(parent, name, packed)
                swapped += 1
    return swapped
