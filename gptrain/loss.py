"""The language-model loss: cross-entropy over the real vocabulary, computed in chunks with its gradient.

With a 50k vocabulary and a small model, the LM head is most of a training step: three (tokens × 128 × 50,257)
matmuls and every elementwise pass over the (tokens × 50,257) logits. So the eager path

- computes the logits of `chunk_tokens` rows at a time and forms the gradient (softmax − one-hot) in the same
  pass, so the float32 logits of a whole batch never exist at once and no backward pass recomputes them;
- turns each chunk's logits into probabilities with one in-place `torch.softmax` (ATen's CPU kernel works row by
  row, so a row stays in cache for its max, exp-sum and scaling), and reads each row's loss off the probability
  of its target, -log p[t] (= logsumexp − logit[t]); the rare row whose p[t] underflows (a loss above ~69) is
  recomputed with logsumexp;
- runs the three matmuls only on the rows that count (targets -1, SFT's masked positions, skip the head
  entirely), on CPU through oneDNN's linear or torch.mm, whichever this CPU's vendor runs faster
  (gptrain.devices.onednn_lm_head), and under no_grad computes the loss alone.

Float32 gives F.cross_entropy(F.linear(x, w[:vocab]), t, ignore_index=-1) to rounding (~1e-7; tests/test_loss.py).
Under bf16 autocast the logits stay bf16, as autocast's F.linear leaves them; the softmax computes in float32
inside ATen's kernel and writes bf16 probabilities, which feed the two gradient matmuls (as the plain expression
rounds its gradient to bf16 for them) and the loss: read off the target's bf16 probability, a token's loss is
within 0.2% of p (0.002 nats) of the plain expression's and a batch's mean within ~1e-4 (3e-5 measured on 1,024
random tokens). That skips two dtype conversions of every chunk, 12% of the loss's time. dW is accumulated over
chunks in float32. Under torch.compile the plain expression is used and inductor fuses it.

That path is built for a CPU: small chunks, a host sync per chunk (the tail check, the ignored-row test) and the
weight sliced to the real vocabulary. `kernel="cuda"` (the default off the CPU: every FSDP run, `--no-compile` run
and FSDP evaluation on a GPU) is built for an accelerator instead, and runs on a CPU too, so tests compare the two:
chunks of `CUDA_CHUNK_TOKENS` rows, no host sync anywhere (ignored rows are masked, not removed; the loss is
logsumexp − logit[t] in float32, so no underflow check), the padded weight used whole (its alignment kept) with
the padded columns' logits masked to −inf, and float32 softmax, loss and dW accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptrain.devices import onednn_lm_head

# Rows per chunk: the three matmuls lose speed below ~256 rows; 512 rows of float32 logits are 100 MB.
CHUNK_TOKENS = 512
# The accelerator path's rows per chunk: 4,096 rows of float32 logits at the padded 50,304 columns are 0.8 GB, and
# a GPT-2 micro-batch of 32 × 1,024 tokens takes 8 chunks.
CUDA_CHUNK_TOKENS = 4096
KERNELS = ("cpu", "cuda")
_TINY_P = 1e-30  # p[t] below this (a loss above ~69 nats) loses precision to underflow: recompute that row


def lm_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
            chunk_tokens: int | None = None, kernel: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of next-token targets over the real vocabulary (padded rows excluded); -1 is ignored.

    x: (..., C) final hidden states; weight: the (padded) LM head (V_padded, C); targets: x's leading shape.
    kernel: "cpu" or "cuda" (module doc); None picks "cpu" on a CPU and "cuda" on any other device.
    """
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(F.linear(x2, weight[:vocab_size]).float(), t, ignore_index=-1)
    kernel = kernel or ("cpu" if x.device.type == "cpu" else "cuda")
    if kernel not in KERNELS:
        raise ValueError(f"lm_loss kernel {kernel!r}: one of {KERNELS}")
    chunk = chunk_tokens or (CHUNK_TOKENS if kernel == "cpu" else CUDA_CHUNK_TOKENS)
    if torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(x2, weight, t, vocab_size, chunk, kernel)
    # Evaluation: the loss alone (an autograd.Function's forward cannot tell no_grad from training).
    loss_sum, count, *_ = _KERNEL_FNS[kernel](x2, weight, t, vocab_size, chunk, grads=False)
    return loss_sum / count


def _linear_op():
    """oneDNN's linear (x @ w.t(), any strides) where this torch has it and this CPU runs it faster than torch.mm:
    on AMD EPYC the LM head's three float32 matmuls 1.2-1.8x, the bf16 ones ~1.1x; not on Intel Xeon, where
    torch.mm is faster (gptrain.devices.onednn_lm_head, benchmarks/RESULTS.md)."""
    if not torch.backends.mkldnn.is_available() or not onednn_lm_head():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _linear_op()
_ONEDNN_WORKS: dict[torch.dtype, bool] = {}  # checked once per dtype on a small product, strided operand included


def _onednn_works(dtype: torch.dtype) -> bool:
    if dtype not in _ONEDNN_WORKS:
        a = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype)
        b = torch.arange(12, dtype=torch.float32).reshape(3, 4).t().to(dtype)  # (4, 3), not contiguous
        try:
            _ONEDNN_WORKS[dtype] = torch.equal(_ONEDNN_LINEAR(a, b, None, "none", [], ""), a @ b.t())
        except RuntimeError:
            _ONEDNN_WORKS[dtype] = False
    return _ONEDNN_WORKS[dtype]


def _onednn(a: torch.Tensor) -> bool:
    return (_ONEDNN_LINEAR is not None and a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16)
            and _onednn_works(a.dtype))


def _mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.t()"""
    return _ONEDNN_LINEAR(a, b, None, "none", [], "") if _onednn(a) else a @ b.t()


def _row_losses(xc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ((rows, V); float32 or bf16 as the logits) of xc's logits and each row's loss -log p[t]."""
    logits = _mm_nt(xc, w)
    if logits.dtype not in (torch.float32, torch.bfloat16):  # float16's range would underflow p[t] at a loss of 17
        logits = logits.float()
    p = torch.softmax(logits, dim=1, out=logits)  # in place: one buffer serves the loss and the gradient
    rows = torch.arange(p.size(0), device=p.device)
    pt = p[rows, tc].float()
    loss = -pt.log()
    tiny = pt < _TINY_P
    if tiny.any():  # exact for the few rows far out in the tail, from their logits again
        logits = _mm_nt(xc[tiny], w).float()
        loss[tiny] = logits.logsumexp(dim=1) - logits.gather(1, tc[tiny, None]).squeeze(1)
    return p, loss


def _chunked(x, weight, t, vocab_size: int, chunk: int, grads: bool):
    """(summed loss, count, dx of the kept rows, dW transposed, kept row indices or None): the gradients are of
    the summed loss, and None without `grads`."""
    dev = x.device
    cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
    with torch.autocast(dev.type, enabled=False):
        valid = t != -1
        count = valid.sum()
        keep = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        xs, ts = (x, t) if keep is None else (x.index_select(0, keep), t.index_select(0, keep))
        xs, w = xs.to(cdt), weight[:vocab_size].to(cdt)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
        dxs = dw_t = None  # dw_t: dW transposed, (C, V), float32
        if grads:
            w_t = w.t()  # (C, V): dx = p @ w as p @ w_t.t(); oneDNN's fast layout is a contiguous copy
            if _onednn(w):
                w_t = w_t.contiguous()
            dxs = torch.empty_like(xs)
        for i in range(0, xs.size(0), chunk):
            xc, tc = xs[i:i + chunk], ts[i:i + chunk]
            p, loss = _row_losses(xc, w, tc)
            loss_sum += loss.sum()
            if grads:  # d(sum of losses)/d(logits) = softmax − one-hot
                p[torch.arange(p.size(0), device=dev), tc] -= 1.0
                p = p.to(cdt)  # a no-op but for float16
                dxs[i:i + chunk] = _mm_nt(p, w_t)
                part = _mm_nt(xc.t().contiguous(), p.t())
                dw_t = part.float() if dw_t is None else dw_t.add_(part)
        if grads and dw_t is None:  # no row counts
            dw_t = torch.zeros(x.size(1), vocab_size, device=dev, dtype=torch.float32)
    return loss_sum, count, dxs, dw_t, keep


def _chunked_masked(x, weight, t, vocab_size: int, chunk: int, grads: bool):
    """The accelerator path (module doc), `_chunked`'s contract: no host sync, every row kept (`keep` is None; an
    ignored row contributes 0 to the loss and its gradient), dW transposed over the padded columns (the padded
    columns' part is exactly 0)."""
    dev = x.device
    cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
    with torch.autocast(dev.type, enabled=False):
        valid = t != -1
        count = valid.sum()
        tc_all = t.clamp(min=0)
        xs, w = x.to(cdt), weight.to(cdt)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
        dxs = dw_t = None
        if grads:
            dxs = torch.empty_like(xs)
            dw_t = torch.zeros(w.size(1), w.size(0), device=dev, dtype=torch.float32)
        for i in range(0, xs.size(0), chunk):
            xc, tc, vc = xs[i:i + chunk], tc_all[i:i + chunk], valid[i:i + chunk]
            logits = (xc @ w.t()).float()
            logits[:, vocab_size:] = float("-inf")
            lse = logits.logsumexp(dim=1)
            loss_sum += ((lse - logits.gather(1, tc[:, None]).squeeze(1)) * vc).sum()
            if grads:  # d(sum of losses)/d(logits) = softmax − one-hot, zero on ignored rows
                p = logits.sub_(lse[:, None]).exp_()
                p.scatter_add_(1, tc[:, None], torch.full_like(lse[:, None], -1.0))
                p.mul_(vc[:, None])
                p = p.to(cdt)
                dxs[i:i + chunk] = p @ w
                dw_t.add_(xc.t() @ p)
    return loss_sum, count, dxs, dw_t, None


_KERNEL_FNS = {"cpu": _chunked, "cuda": _chunked_masked}


class _ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(F.linear(x, weight[:vocab]).float(), t, ignore_index=-1), chunked over rows (module doc)."""

    @staticmethod
    def forward(ctx, x, weight, t, vocab_size, chunk, kernel):
        loss_sum, count, dxs, dw_t, keep = _KERNEL_FNS[kernel](x, weight, t, vocab_size, chunk, grads=True)
        ctx.shape, ctx.padded, ctx.dtypes = x.shape, weight.size(0), (x.dtype, weight.dtype)
        ctx.save_for_backward(dxs, dw_t, count, keep)
        return loss_sum / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dxs, dw_t, count, keep = ctx.saved_tensors
        scale = g / count
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (dxs.float() * scale).to(ctx.dtypes[0])
            if keep is not None:
                gx = torch.zeros(ctx.shape, device=gx.device, dtype=gx.dtype).index_copy_(0, keep, gx)
        if ctx.needs_input_grad[1]:
            gw = torch.empty(ctx.padded, dw_t.size(0), device=dw_t.device, dtype=ctx.dtypes[1])
            torch.mul(dw_t.t(), scale, out=gw[:dw_t.size(1)])
            gw[dw_t.size(1):] = 0
        return gx, gw, None, None, None, None
