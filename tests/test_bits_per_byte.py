"""Bits per byte by hand on a tiny text: prepare records each split's UTF-8 bytes, and the validation loss in bits
per byte is loss × tokens / (bytes × ln 2) over exactly the targets evaluated (not the whole split)."""

import json
import math

import pytest
import torch

from gptrain.data.loader import ValLoader
from gptrain.data.prepare import PrepareConfig, prepare
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer
from gptrain.train.trainer import Trainer
from test_train import SeqLoader, small_cfg

VAL = "Ô Roméo, Roméo! pourquoi es-tu Roméo? — naïve café, 日本語, emoji 🎭. " * 4
TRAIN = ["To be, or not to be, that is the question.", "Ça va? Très bien, merci — déjà vu."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpb")
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in [VAL, *TRAIN]), encoding="utf-8")
    n_val = len(get_tokenizer().encode(VAL)) + 1  # the document and its <|endoftext|>: exactly the val split
    prepare([str(src)], PrepareConfig(out=str(d / "data"), val_tokens=n_val, workers=1), progress=False)
    return d / "data"


def test_prepare_records_each_splits_utf8_bytes(data):
    m = json.loads((data / "manifest.json").read_text())
    assert m["totals"]["val"]["bytes"] == len(VAL.encode("utf-8"))  # <|endoftext|> stands for no text
    assert m["totals"]["train"]["bytes"] == sum(len(t.encode("utf-8")) for t in TRAIN)
    assert len(VAL.encode("utf-8")) > len(VAL)  # the text is not ASCII: bytes, not characters


def test_val_bits_per_byte_is_loss_times_tokens_over_bytes_ln2(data):
    torch.manual_seed(0)
    B, T = 2, 16
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    val = ValLoader(data, B, T, max_tokens=2 * B * T)  # two batches: fewer tokens than the split holds
    targets = torch.cat([y.flatten() for _, y in val.batches()])
    trainer = Trainer(small_cfg(micro_batch_size=B, seq_len=T, total_batch_size=B * T), model,
                      SeqLoader(targets, B, T), val, tokenizer=get_tokenizer())
    ev = trainer.evaluate()
    tok = get_tokenizer()
    by_hand = len(tok.decode(targets.tolist()).encode("utf-8"))  # the evaluated targets' text, decoded
    assert len(targets) == 2 * B * T and by_hand < len(VAL.encode("utf-8"))
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] * len(targets) / (by_hand * math.log(2)), rel=1e-12)
    trainer.wrapped.release()
