"""bf16 serving on CPU: packed linear layers give F.linear's exact outputs, and a row's logits are the same bits
whether it decodes alone or in a batch (oneDNN multiplies a single row in another order than several)."""

import pytest
import torch

from gptrain.engine import Engine, SlotPool
from gptrain.model import GPT, GPTConfig
from gptrain.packed_linear import can_pack, pack_linears
from gptrain.sampling import SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_width_model(seed=0) -> GPT:
    """GPT-2's width (768, MLP 3072: where single-row products round differently), two layers, a toy vocabulary."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=12, n_embd=768)).to(torch.bfloat16).eval()


def decode_logits(engine, prompts, seeds, steps=12):
    """Each row's logits at every decode step, rows decoding together in one pool."""
    out = {i: [] for i in range(len(prompts))}
    pool = SlotPool(engine, 8, prefill_chunk=16)
    rows = [engine.sequence(p, SamplingParams(max_new_tokens=steps, temperature=1.0, top_k=None, seed=seed,
                                              stop_ids=())) for p, seed in zip(prompts, seeds)]
    for r in rows:
        pool.add(r)
    decode = pool._decode

    def recording(ready):
        logits = decode(ready)
        for j, s in enumerate(ready):
            out[rows.index(pool.rows[s])].append(logits[j].clone())
        return logits
    pool._decode = recording
    while pool.rows:
        pool.step()
    return out, [r.ids for r in rows]


PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 1, 42, 11], [300, 2], [9] * 23, list(range(40, 71)), [1]]


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_row_decodes_the_same_bits_alone_and_in_a_batch(packed):
    model = gpt2_width_model()
    if packed:
        if not can_pack(next(model.parameters())):
            pytest.skip("this CPU or torch has no oneDNN bf16 linear")
        assert pack_linears(model) == 2 * 4 + 1  # four per block and the head
    engine = Engine(model)
    together, ids = decode_logits(engine, PROMPTS, range(len(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        alone, alone_ids = decode_logits(engine, [p], [i])
        assert alone_ids[0] == ids[i]
        assert all(torch.equal(a, b) for a, b in zip(alone[0], together[i], strict=True))


def test_packed_layers_keep_the_parameters_and_the_outputs():
    model = gpt2_width_model()
    if not can_pack(next(model.parameters())):
        pytest.skip("this CPU or torch has no oneDNN bf16 linear")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 512, (3, 20))
    with torch.no_grad():
        want = model(x)[0]
        pack_linears(model)
        got = model(x)[0]
    assert torch.equal(got, want)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_nothing_is_packed_in_float32():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    assert pack_linears(model) == 0 and type(model.lm_head) is torch.nn.Linear
