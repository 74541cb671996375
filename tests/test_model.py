import math

import pytest
import torch
import torch.nn.functional as F

from gptrain.model import GPT, GPTConfig, KVCache, PRESETS, preset


def test_gpt2_parameter_counts():
    model = GPT(preset("gpt2"))
    assert model.config.padded_vocab_size == 50304
    assert model.num_params(padded=False) == 124_439_808
    assert model.num_params() == 124_475_904
    assert model.lm_head.weight is model.transformer.wte.weight


def test_presets_have_published_shapes():
    shapes = {k: (c.n_layer, c.n_head, c.n_embd, c.block_size) for k, c in PRESETS.items()}
    assert shapes["gpt2-medium"] == (24, 16, 1024, 1024)
    assert shapes["gpt2-large"] == (36, 20, 1280, 1024)
    assert shapes["gpt2-xl"] == (48, 25, 1600, 1024)
    assert shapes["gpt3-small"] == (12, 12, 768, 2048)


def test_initialisation_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=6, n_head=4, n_embd=256)
    model = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "ln" in name:
            assert torch.all(p == 1), name
        elif name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        else:
            assert p.mean().item() == pytest.approx(0, abs=2e-3), name
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


def test_flops_per_token_formula():
    model = GPT(preset("gpt2"))
    n = model.num_params() - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 1024 * 768


def test_padded_rows_never_reach_logits_or_loss(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    assert model.config.padded_vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 16))
    logits, _ = model(idx)
    assert logits.shape == (2, 16, 50257)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    # Making the padded rows huge changes nothing a user sees.
    with torch.no_grad():
        model.transformer.wte.weight[50257:] = 100.0
    logits2, _ = model(idx)
    _, loss2 = model(idx[:, :-1], idx[:, 1:])
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50257), idx[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_ignore_index_targets(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    idx = torch.randint(0, 50257, (1, 8))
    tgt = torch.randint(0, 50257, (1, 8))
    masked = tgt.clone()
    masked[:, :4] = -1
    logits, _ = model(idx)
    _, loss = model(idx, masked)
    expected = F.cross_entropy(logits[0, 4:], tgt[0, 4:])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_kv_cache_matches_full_forward_with_left_padding(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    a = torch.randint(0, 50257, (1, 12))
    b = torch.randint(0, 50257, (1, 7))
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, 5:] = a[0], b[0]
    cache = KVCache(model.config, 2, 16, pad=torch.tensor([0, 5]))
    with torch.no_grad():
        first, _ = model(batch[:, :9], cache=cache)
        rest, _ = model(batch[:, 9:], cache=cache)
        la, _ = model(a)
        lb, _ = model(b)
    out = torch.cat([first, rest], 1)
    assert torch.allclose(out[0], la[0], atol=1e-5)
    assert torch.allclose(out[1, 5:], lb[0], atol=1e-5)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="context window of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
