"""The chunked cross-entropy (gptrain.loss.lm_loss) equals the plain expression, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from gptrain import loss as loss_module
from gptrain.loss import lm_loss


@pytest.fixture(autouse=True, params=["onednn", "torch.mm"])
def lm_head_kernel(request, monkeypatch):
    """Every test runs on both kernels the loss may pick for this CPU (gptrain.devices.onednn_lm_head)."""
    if request.param == "onednn":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch has no oneDNN")
        monkeypatch.setattr(loss_module, "_ONEDNN_LINEAR", torch.ops.mkldnn._linear_pointwise)
    else:
        monkeypatch.setattr(loss_module, "_ONEDNN_LINEAR", None)
    return request.param


def _reference(x, w, t, vocab):
    return F.cross_entropy(F.linear(x, w[:vocab]).reshape(-1, vocab).float(), t.reshape(-1), ignore_index=-1)


def _grads(fn, x, w, t, vocab):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t, vocab)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), x.grad, w.grad


def test_chunked_loss_matches_plain_cross_entropy():
    torch.manual_seed(0)
    vocab, padded = 1000, 1024
    x, w = torch.randn(5, 120, 16), torch.randn(padded, 16) * 0.3
    t = torch.randint(0, vocab, (5, 120))
    t[0, :50] = -1  # ignored positions (SFT masks)
    t[2] = -1  # a whole chunk ignored
    chunked = lambda *a: lm_loss(*a, chunk_tokens=64)  # noqa: E731  (forces 10 chunks, the last one partial)
    (l1, gx1, gw1), (l2, gx2, gw2) = _grads(chunked, x, w, t, vocab), _grads(_reference, x, w, t, vocab)
    assert torch.allclose(l1, l2, atol=1e-6, rtol=0)
    assert torch.allclose(gx1, gx2, atol=1e-7) and torch.allclose(gw1, gw2, atol=1e-7)
    assert gx1.shape == x.shape and gw1.shape == w.shape
    assert torch.count_nonzero(gw1[vocab:]) == 0  # padded rows get no gradient
    with torch.no_grad():
        assert torch.allclose(lm_loss(x, w, t, vocab, chunk_tokens=64), l2, atol=1e-6, rtol=0)


def test_chunked_loss_under_bf16_autocast_matches_plain():
    torch.manual_seed(0)
    vocab = 500
    x, w, t = torch.randn(300, 32), torch.randn(512, 32) * 0.3, torch.randint(0, vocab, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (l2, gx2, gw2) = _grads(_reference, x, w, t, vocab)
        for kwargs in ({"chunk_tokens": 64}, {}):  # 5 chunks accumulated in float32; the default: one chunk
            (l1, gx1, gw1) = _grads(lambda *a: lm_loss(*a, **kwargs), x, w, t, vocab)
            assert gx1.dtype == torch.float32 and gw1.dtype == torch.float32
            assert torch.allclose(l1, l2, atol=1e-3)
            assert torch.allclose(gx1, gx2, atol=2e-3, rtol=2e-2) and torch.allclose(gw1, gw2, atol=2e-3, rtol=2e-2)
            assert torch.count_nonzero(gw1[vocab:]) == 0


def test_rows_far_in_the_tail_and_partial_gradients():
    """A target whose probability underflows float32 (loss ~ 200) is still exact; x or w alone may need grads."""
    torch.manual_seed(1)
    vocab = 300
    x, w, t = torch.randn(40, 8), torch.randn(320, 8), torch.randint(0, vocab, (40,))
    w[t[:3]] = -30 * x[:3]  # rows 0-2: the target's logit far below the others
    ref = _reference(x, w, t, vocab)
    assert ref > 5
    for xg, wg in ((True, False), (False, True)):
        xx, ww = x.clone().requires_grad_(xg), w.clone().requires_grad_(wg)
        loss = lm_loss(xx, ww, t, vocab, chunk_tokens=16)
        loss.backward()
        assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-6)
        assert (xx.grad is not None) == xg and (ww.grad is not None) == wg
    assert torch.isnan(lm_loss(x, w, torch.full_like(t, -1), vocab)) and torch.isnan(_reference(x, w, torch.full_like(t, -1), vocab))


def test_float16_autocast_keeps_losses_far_in_the_tail():
    """float16 probabilities would underflow at a loss of ~17: those chunks use float32 for the softmax."""
    torch.manual_seed(2)
    vocab = 200
    x, w, t = torch.randn(30, 8), torch.randn(256, 8), torch.randint(0, vocab, (30,))
    w[t[:2]] = -6 * x[:2]  # two targets ~50 nats down
    with torch.autocast("cpu", dtype=torch.float16):
        got, ref = lm_loss(x, w, t, vocab), _reference(x, w, t, vocab)
    assert torch.isfinite(got) and torch.allclose(got, ref, rtol=1e-2)


def test_cuda_path_on_cpu_equals_todays_path_loss_and_gradients(monkeypatch):
    """kernel="cuda" (large chunks, no host syncs, the padded weight with its extra columns masked) gives today's
    loss and gradients; run on the CPU by naming the kernel. No host sync: every tensor op only, so it also runs
    with `.item()`/`bool()` on tensors forbidden."""
    torch.manual_seed(0)
    vocab, padded = 1000, 1024
    x, w = torch.randn(5, 120, 16), torch.randn(padded, 16) * 0.3
    t = torch.randint(0, vocab, (5, 120))
    t[0, :50] = -1
    t[2] = -1
    today = _grads(lambda *a: lm_loss(*a, chunk_tokens=64, kernel="cpu"), x, w, t, vocab)
    for chunk in (64, None):  # many chunks, the last partial; the default (one chunk here)
        monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("host sync (.item) in the cuda path"))
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host sync (bool) in the cuda path"))
        cuda = _grads(lambda *a: lm_loss(*a, chunk_tokens=chunk, kernel="cuda"), x, w, t, vocab)
        monkeypatch.undo()
        for a, b in zip(cuda, today):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(cuda[2][vocab:]) == 0  # padded rows get no gradient
    with torch.no_grad():
        assert torch.allclose(lm_loss(x, w, t, vocab, kernel="cuda"), today[0], atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, float32 softmax and accumulation
        ref = _grads(_reference, x, w, t, vocab)
        bf = _grads(lambda *a: lm_loss(*a, kernel="cuda"), x, w, t, vocab)
    assert torch.allclose(bf[0], ref[0], atol=1e-3)
    assert torch.allclose(bf[1], ref[1], atol=2e-3, rtol=2e-2) and torch.allclose(bf[2], ref[2], atol=2e-3, rtol=2e-2)
