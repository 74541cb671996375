import gzip
import math
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptrain.errors import GptrainError
from gptrain.eval import hellaswag
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer


def lecture_predictions(model, examples):
    """The lecture's loop, written out plainly: one example at a time, its 4 rows padded to the longest, the loss
    of every position computed, then masked to the ending tokens."""
    tok = get_tokenizer()
    preds = []
    for ex in examples:
        ctx = tok.encode(ex["ctx"])
        ends = [tok.encode(" " + e) for e in ex["endings"]]
        width = max(len(ctx) + len(e) for e in ends)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, e in enumerate(ends):
            tokens[i, :len(ctx) + len(e)] = torch.tensor(ctx + e)
            mask[i, len(ctx):len(ctx) + len(e)] = 1
        with torch.no_grad():
            logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        sum_loss = (losses * shift_mask).sum(dim=1)
        avg_loss = sum_loss / shift_mask.sum(dim=1)
        preds.append((sum_loss.argmin().item(), avg_loss.argmin().item()))
    return preds


@pytest.fixture(scope="module")
def val_gz():
    """The shared copy of the validation set (module-scoped, so read once; skips where it is absent)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent (it exists only on the project's own machines)")
    return path


@pytest.fixture(scope="module")
def val_examples(val_gz):
    return hellaswag.read_jsonl(val_gz)


@pytest.fixture(scope="module")
def opinionated_model():
    """A tiny random GPT with large embeddings, so its endings' losses are far apart (no near-ties to flip)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=192, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)
    return model.eval()


def _accuracy(preds, examples):
    n = len(examples)
    return (sum(p == ex["label"] for (p, _), ex in zip(preds, examples)) / n,
            sum(p == ex["label"] for (_, p), ex in zip(preds, examples)) / n)


def test_batched_scoring_equals_the_lecture_loop(val_examples, opinionated_model):
    examples = val_examples[:32]
    ref = lecture_predictions(opinionated_model, examples)
    got = hellaswag.predict(opinionated_model, examples, batch_size=7)  # batches mix examples and lengths
    assert got == ref
    # The two rules disagree somewhere, so the test tells acc from acc_norm.
    assert any(a != b for a, b in ref)
    acc, acc_norm = _accuracy(ref, examples)
    assert hellaswag.evaluate(opinionated_model, examples, batch_size=5) == {"acc": acc, "acc_norm": acc_norm, "n": 32}


def test_compiled_model_scores_as_the_lecture_loop(val_examples, opinionated_model):
    torch._dynamo.reset()
    compiled = torch.compile(opinionated_model, dynamic=True)
    examples = val_examples[:6]
    ref = lecture_predictions(compiled, examples)  # the lecture's loop through the compiled graph
    assert hellaswag.predict(compiled, examples, batch_size=4) == ref
    assert hellaswag.predict(opinionated_model, examples, batch_size=4) == ref
    assert hellaswag.evaluate(compiled, examples)["n"] == 6


def test_ranks_split_examples_and_cover_them_all(val_examples, opinionated_model):
    examples = val_examples[:10]
    whole = hellaswag.predict(opinionated_model, examples)
    parts = [hellaswag.evaluate(opinionated_model, examples, rank=r, world_size=3) for r in range(3)]
    # without a process group each rank reports its own share; together they are the whole set
    assert sum(p["n"] for p in parts) == 10
    assert sum(p["acc_norm"] * p["n"] for p in parts) == pytest.approx(_accuracy(whole, examples)[1] * 10)


def test_render_matches_the_lecture():
    tok = get_tokenizer()
    ex = {"ctx": "A man is sitting on a roof. he", "endings": ["a", "b c", "d", "e"], "label": 3}
    ctx, ends, label = hellaswag.render(ex)
    assert ctx == tok.encode("A man is sitting on a roof. he")
    assert ends[1] == tok.encode(" b c") and label == 3


def test_left_truncation_to_the_context_window(val_examples):
    # A model with a window shorter than the rows still scores them, dropping the context's start.
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, n_layer=1, n_head=1, n_embd=16))
    res = hellaswag.evaluate(model, val_examples[:3])
    assert res["n"] == 3 and 0 <= res["acc"] <= 1


# ---------------------------------------------------------------- data: --data, download, cache

class _Server:
    """Serves one payload on 127.0.0.1; `claimed_length` lets a test promise more bytes than it sends."""

    def __init__(self, payload: bytes, claimed_length: int | None = None):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(claimed_length or len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.hits = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hellaswag_val.jsonl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def val_bytes(val_gz):
    return gzip.decompress(val_gz.read_bytes())


def test_download_verifies_caches_and_reuses(val_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path))
    server = _Server(val_bytes)
    try:
        examples = hellaswag.load_examples(url=server.url, limit=5)
        again = hellaswag.load_examples(url=server.url)
    finally:
        server.close()
    assert server.hits == 1  # the second load read the cache
    assert len(examples) == 5 and len(again) == hellaswag.N_VAL
    assert examples[0]["ctx"] == "A man is sitting on a roof. he" and examples[0]["label"] == 3
    assert [p.name for p in (tmp_path / "hellaswag").iterdir()] == ["hellaswag_val.jsonl"]


@pytest.mark.parametrize("damage", ["truncated", "short_read", "altered"])
def test_bad_download_is_a_clear_error_and_caches_nothing(val_bytes, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path))
    lines = val_bytes.splitlines(keepends=True)
    if damage == "truncated":  # a complete HTTP response holding only part of the file
        server = _Server(b"".join(lines[:5000]))
        expect = "holds 5000 examples, expected 10042"
    elif damage == "short_read":  # the connection closes before Content-Length bytes arrive
        server = _Server(val_bytes[:100_000], claimed_length=len(val_bytes))
        expect = "failed"
    else:  # one ending changed: right count and structure, wrong content
        ex = json.loads(lines[7])
        ex["endings"][0] += " and then some"
        lines[7] = (json.dumps(ex) + "\n").encode()
        server = _Server(b"".join(lines))
        expect = "content sha256"
    try:
        with pytest.raises(GptrainError, match=expect) as err:
            hellaswag.load_examples(url=server.url)
    finally:
        server.close()
    assert "\n" not in str(err.value) and server.url in str(err.value)
    assert not any((tmp_path / "hellaswag").iterdir())  # no partial file, nothing cached


def test_data_path_reads_jsonl_and_gz_and_rejects_garbage(val_bytes, val_gz, tmp_path):
    gz = hellaswag.load_examples(val_gz, limit=3)
    plain = tmp_path / "val.jsonl"
    plain.write_bytes(b"".join(val_bytes.splitlines(keepends=True)[:3]))
    assert hellaswag.load_examples(plain) == gz
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(GptrainError, match=r"bad.jsonl:1 is not a HellaSwag example"):
        hellaswag.load_examples(bad)
    with pytest.raises(GptrainError, match="no such file"):
        hellaswag.load_examples(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- the `gptrain eval` command

def test_eval_hellaswag_command_prints_baselines_and_writes_json(val_gz, opinionated_model, tmp_path, capsys):
    from gptrain.cli import main as gptrain_main
    from gptrain.hf import save_pretrained
    save_pretrained(opinionated_model, tmp_path / "model")
    out = tmp_path / "hs.json"
    assert gptrain_main(["eval", "hellaswag", "--model", str(tmp_path / "model"), "--data", str(val_gz),
                         "--limit", "12", "--batch-size", "5", "--device", "cpu", "--json", str(out)]) == 0
    examples = hellaswag.read_jsonl(val_gz)[:12]
    acc, acc_norm = _accuracy(lecture_predictions(opinionated_model, examples), examples)
    assert json.loads(out.read_text()) == {"acc": acc, "acc_norm": acc_norm, "n": 12}
    printed = capsys.readouterr().out
    assert "GPT-2 124M (OpenAI)" in printed and "0.2955" in printed and "0.4893" in printed
    assert gptrain_main(["eval", "hellaswag", "--model", str(tmp_path / "model"), "--data", str(val_gz),
                         "--limit", "0"]) == 2


def test_eval_val_command_on_prepared_shards(tmp_path, capsys):
    from gptrain.cli import main as gptrain_main
    from gptrain.hf import save_pretrained
    corpus = tmp_path / "corpus.jsonl"  # 40 documents: the first ones form the validation split
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 10})
                              + "\n" for i in range(40)))
    assert gptrain_main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--val-tokens", "1000",
                         "--workers", "1"]) == 0
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(block_size=64, n_layer=1, n_head=1, n_embd=16)), tmp_path / "model")
    out = tmp_path / "val.json"
    assert gptrain_main(["eval", "val", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
                         "--batch-size", "2", "--seq-len", "32", "--val-tokens", "512", "--device", "cpu",
                         "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tokens"] == 512  # 4 batches of 2 x 32
    assert abs(res["val_loss"] - math.log(50257)) < 0.5  # an untrained model is near-uniform
    assert "3.2924" in capsys.readouterr().out
