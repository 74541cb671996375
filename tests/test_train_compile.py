"""torch.compile on together with validation, sampling and HellaSwag in one run (CPU inductor, tiny model)."""

import torch

from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer
from gptrain.train.trainer import Trainer

from conftest import SHARED_DATA
from test_train import FixedVal, SeqLoader, small_cfg, tokens


def _run(compile, hellaswag):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    data = tokens()
    cfg = small_cfg(max_steps=4, eval_every=2, sample_every=2, sample_tokens=6, num_samples=2, compile=compile,
                    sample_prompt="Hello, I'm a language model,")
    t = Trainer(cfg, model, SeqLoader(data, 2, 16), FixedVal(data, 2, 16), hellaswag=hellaswag,
                tokenizer=get_tokenizer())
    return t, t.run()


def test_compiled_run_trains_evaluates_and_samples_like_eager():
    import torch._dynamo.utils as dyn
    from gptrain.eval.hellaswag import load_examples
    hs = SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl.gz"  # absent in a user's clone: run without HellaSwag
    examples = load_examples(hs, limit=2) if hs.exists() else None
    eager_t, eager = _run(False, examples)
    dyn.counters.clear()
    comp_t, comp = _run(True, examples)
    assert comp_t.wrapped.fwd is not comp_t.wrapped.raw  # it really ran compiled
    for a, b in zip(comp["train_losses"], eager["train_losses"]):
        assert abs(a - b) < 1e-4, (a, b)
    assert len(comp["train_losses"]) == 4
    assert abs(comp["val_loss"] - eager["val_loss"]) < 1e-4
    if examples is not None:
        assert comp["eval"]["hellaswag_acc_norm"] == eager["eval"]["hellaswag_acc_norm"]
    assert len(comp["samples"]) == 2 and all(s.startswith("Hello, I'm a language model,") for s in comp["samples"])
    assert comp["samples"] == eager["samples"]  # sampling runs on the eager module with the same weights
    # three evaluations and two sampling rounds compiled only the train and eval graphs: no recompile storm
    assert dyn.counters["stats"]["unique_graphs"] <= 3, dict(dyn.counters["stats"])
