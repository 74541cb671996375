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
from gptrain.eval import hellaswag, scoring
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


def _full_row_score(model, ctx, cont):
    """A request scored the obvious way: its whole row (cut from the left to the window) through the model."""
    toks = (ctx + cont)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([toks[:-1]]))
    logits, targets = logits[0, -len(cont):], torch.tensor(cont)
    return F.cross_entropy(logits, targets, reduction="sum").item(), bool((logits.argmax(-1) == targets).all())


def test_shared_contexts_score_as_whole_rows(monkeypatch):
    """Requests sharing a context (run once, its cache copied per continuation) score as their own full rows do:
    groups of 1..5, contexts of 1..20 tokens in one batch, one-token continuations, greedy ones, and over-long
    requests that fall back to left-truncated plain rows while their group's other members share."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_size=300)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)  # decisive logits, so greedy continuations are unambiguous
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    requests = []
    for size, ctx_len in [(4, 20), (1, 7), (3, 1), (5, 12), (2, 16), (4, 3)]:
        ctx = rand(ctx_len)
        greedy = []
        with torch.no_grad():
            for _ in range(4):
                greedy.append(model(torch.tensor([ctx + greedy]))[0][0, -1].argmax().item())
        requests += [(ctx, greedy)] + [(ctx, rand(1 + (3 * k + ctx_len) % 11)) for k in range(size - 1)]
    long_ctx = rand(26)
    # 36 and 34 tokens: cut to the window's 33 (32 inputs + the last target); 33 and 28 tokens fit and share
    requests += [(long_ctx, rand(10)), (long_ctx, rand(8)), (long_ctx, rand(7)), (long_ctx, rand(2))]
    order = torch.randperm(len(requests), generator=g).tolist()
    requests = [requests[i] for i in order]

    shared_rows = []  # the batches of groups that went through the shared path
    real = scoring._shared_rows
    monkeypatch.setattr(scoring, "_shared_rows", lambda net, groups, *a: shared_rows.append(groups)
                        or real(net, groups, *a))
    got = scoring.score_continuations(model, requests, batch_size=7)
    assert len(shared_rows) > 1 and any(len({len(grp[0][0]) for grp in b}) > 1 for b in shared_rows)
    assert sum(len(grp) for b in shared_rows for grp in b) == len(requests) - 3  # all but a 1-group and 2 cut
    for (ctx, cont), score in zip(requests, got):
        nll, greedy = _full_row_score(model, ctx, cont)
        assert score.n == len(cont) and score.nll == pytest.approx(nll, rel=1e-5, abs=1e-5)
        assert score.greedy == greedy
    assert sum(s.greedy for s in got) == 6 and not all(s.greedy for s in got)

    bf16 = scoring.score_continuations(model, requests, batch_size=7, autocast=torch.bfloat16)
    assert [s.nll for s in bf16] == pytest.approx([s.nll for s in got], rel=0.05, abs=0.5)


def test_empty_context_is_a_clear_error():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=16))
    with pytest.raises(GptrainError, match="empty context.*<\\|endoftext\\|>"):
        scoring.score_continuations(model, [([], [1, 2])])


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
    assert "3.2924" not in capsys.readouterr().out  # the FineWeb-EDU baseline is not a reference for this data

    # On a training run, the defaults are the run's own batch shape, tokens, dtype and attention kernel: its last
    # in-loop val_loss, bit for bit (float32 sums depend on the batch shape: the default 8 rows differ)
    assert gptrain_main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                         "--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--seq-len", "32",
                         "--micro-batch-size", "2", "--total-batch-size", "64", "--max-steps", "2",
                         "--eval-every", "2", "--val-tokens", "200", "--sample-every", "0", "--threads", "1",
                         "--dtype", "float32"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert gptrain_main(["eval", "val", "--model", str(tmp_path / "run"), "--device", "cpu", "--json", str(out)]) == 0
    assert f"eval val: --data {tmp_path / 'data'} (the data --model {tmp_path / 'run'} was trained on)" in \
        capsys.readouterr().err  # no --data: the run's own, said
    res = json.loads(out.read_text())
    last = [r for r in logged if "val_loss" in r][-1]
    assert (res["val_loss"], res["val_bpb"], res["tokens"]) == (last["val_loss"], last["val_bpb"], 192)  # 3 x 2 x 32
    assert res["bytes"] > 0
    assert gptrain_main(["eval", "val", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                         "--device", "cpu", "--autocast", "bfloat16", "--json", str(out)]) == 0
    assert abs(json.loads(out.read_text())["val_loss"] - res["val_loss"]) < 0.05  # bf16: close, not equal
    # A run of 2 processes evaluated whole rounds of 2 x 2 x 32 tokens of its 200: one, 128 tokens
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(record, world_size=2)))
    assert gptrain_main(["eval", "val", "--model", str(tmp_path / "run"), "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"] == 128
    # A run trained under bf16 autocast is evaluated under it by default, with the loop's math attention kernel
    # (the CPU's at T <= 128, which rounds bf16 differently from the default one): its own val_loss again, exactly
    assert gptrain_main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "bf16"),
                         "--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--seq-len", "32",
                         "--micro-batch-size", "2", "--total-batch-size", "64", "--max-steps", "1", "--eval-every", "1",
                         "--val-tokens", "256", "--sample-every", "0", "--threads", "1", "--dtype", "bfloat16"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert gptrain_main(["eval", "val", "--model", str(tmp_path / "bf16"), "--data", str(tmp_path / "data"),
                         "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["val_loss"] == [r for r in logged if "val_loss" in r][-1]["val_loss"]


def test_eval_val_without_data_needs_a_run_that_recorded_it(tmp_path, capsys):
    """--data may be left out only for a gptrain run whose data directory is still there; otherwise one line asks
    for it, before any model is loaded."""
    from gptrain.cli import main as gptrain_main
    from gptrain.hf import save_pretrained
    save_pretrained(GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=16)), tmp_path / "export")
    sft_run = tmp_path / "chat"  # an sft run records its conversations, not a prepared directory
    (sft_run / "checkpoints").mkdir(parents=True)
    (sft_run / "config.json").write_text(json.dumps({"train": {"data": "oasst-100"}}))
    for model, says in [(tmp_path / "export", "records no training data"),
                        (sft_run, "was trained on --data oasst-100, which is not a prepared data directory here")]:
        assert gptrain_main(["eval", "val", "--model", str(model), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gptrain: error: eval val needs --data DIR") and says in err and err.count("\n") == 1
