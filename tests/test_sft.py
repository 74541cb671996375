import gzip
import json
import re
import shutil
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from gptrain.chat.datasets import load_conversations
from gptrain.chat.format import render_conversation
from gptrain.chat.sft import (ConversationLoader, ConversationValLoader, encode_conversations, split_train_val,
                              widen_to_chat)
from gptrain.cli import main as cli
from gptrain.errors import GptrainError
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer

TOK = get_tokenizer(chat=True)
END = TOK.token_id("<|end|>")


def conv(i, words=1):
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f" answer{i}" * words}]


def test_targets_are_exactly_the_assistant_tokens_and_rows_hold_whole_conversations():
    convs = [conv(i, words=1 + i % 4) for i in range(30)]
    examples, truncated, dropped = encode_conversations(convs, 40, TOK)
    assert (truncated, dropped) == (0, 0)
    loader = ConversationLoader(examples, B=3, T=40, seed=1)
    seen = []
    for _ in range(6):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (3, 40) and x.dtype == y.dtype == torch.int64
        for xr, yr in zip(x.tolist(), y.tolist()):
            assert xr[0] == TOK.eot  # every row starts at a conversation's start
            # split the row back into conversations at each <|endoftext|> start (padding is <|endoftext|> too)
            starts = [i for i, t in enumerate(xr) if t == TOK.eot] + [len(xr)]
            for a, b in zip(starts, starts[1:]):
                if b - a == 1:
                    continue  # padding
                ids = xr[a:b] + ([yr[b - 1]] if yr[b - 1] != -1 else [])
                ref_ids, ref_mask = render_conversation(convs[_index(ids)], TOK)
                assert ids == ref_ids[:len(ids)] and len(ids) == len(ref_ids)  # whole, never cut
                targets = [t for t in yr[a:b] if t != -1]
                assert targets == [t for t, m in zip(ref_ids[1:], ref_mask[1:]) if m]
                seen.append(_index(ids))
    assert len(seen) >= 30 and loader.epoch == 1
    assert sorted(seen[:30]) == list(range(30))  # an epoch visits every conversation exactly once


def _index(ids):
    """Which synthetic conversation these ids render ('question N')."""
    return int(TOK.decode(ids).split("question ")[1].split("<")[0].split()[0])


def test_masked_loss_is_the_mean_over_assistant_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=TOK.n_vocab, n_layer=1, n_head=2, n_embd=32))
    examples, _, _ = encode_conversations([conv(1, 3), conv(2, 5)], 63, TOK)
    T = sum(len(ids) for ids, _ in examples) - 1  # exactly the two conversations in one row
    x, y = ConversationLoader(examples, B=1, T=T, shuffle=False).next_batch()
    _, loss = model(x, y)
    logits, _ = model(x)
    keep = y[0] != -1
    manual = F.cross_entropy(logits[0][keep], y[0][keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    assert keep.sum().item() == sum(int(m[1:].sum()) for _, m in examples)


def test_no_pack_puts_one_conversation_per_row_and_long_ones_are_cut_into_pieces():
    examples, cut, dropped = encode_conversations([conv(i, 2) for i in range(5)] + [conv(9, 60)], 24, TOK)
    assert cut == 1 and dropped == 0 and max(len(ids) for ids, _ in examples) == 25
    whole = render_conversation(conv(9, 60), TOK)[0]
    pieces = [ids.tolist() for ids, _ in examples[5:]]
    assert len(pieces) > 1 and sum((p[1:] for p in pieces), pieces[0][:1]) == whole  # every target once, in order
    x, y = ConversationLoader(examples, B=6, T=24, shuffle=False, pack=False).next_batch()
    for (ids, _), xr, yr in zip(examples, x.tolist(), y.tolist()):
        n = min(len(ids), 24)  # the conversation fills the row's start; the rest is padding, never a target
        assert xr[:n] == ids[:n].tolist() and set(xr[n:]) <= {TOK.eot} and set(yr[len(ids) - 1:]) <= {-1}
    # a long question: the pieces holding only the question have nothing to learn and are dropped; the reply's is kept
    long_question = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    examples, cut, dropped = encode_conversations([long_question], 24, TOK)
    assert (cut, dropped, len(examples)) == (1, 0, 1)
    ids, mask = examples[0]
    assert ids[mask].tolist() == TOK.encode("ok") + [END]


def test_loader_resumes_exactly_and_ranks_share_the_global_batch():
    examples, _, _ = encode_conversations([conv(i, 1 + i % 7) for i in range(50)], 48, TOK)
    a = ConversationLoader(examples, B=4, T=48, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    b = ConversationLoader(examples, B=4, T=48, seed=3)
    b.load_state_dict(state)
    for _ in range(8):  # across an epoch boundary
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch >= 1
    with pytest.raises(GptrainError, match="same --data"):
        ConversationLoader(examples[:-1], B=4, T=48, seed=3).load_state_dict(state)
    whole = ConversationLoader(examples, B=4, T=48, seed=5).next_batch()
    halves = [ConversationLoader(examples, B=2, T=48, seed=5, rank=r, world_size=2).next_batch() for r in (0, 1)]
    assert torch.equal(whole[0], torch.cat([h[0] for h in halves]))


def test_validation_batches_are_fixed_and_cover_every_held_out_token():
    examples, _, _ = encode_conversations([conv(i, 1 + i % 5) for i in range(11)], 32, TOK)
    val = ConversationValLoader(examples, B=2, T=32)
    first = [(x.clone(), y.clone()) for x, y in val.batches()]
    again = list(val.batches())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sum(int((y != -1).sum()) for _, y in first) == sum(int(m[1:].sum()) for _, m in examples)


def test_split_is_by_conversation_and_seeded():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=0)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_train_val(items, 0.1, seed=0) == (train, val) and split_train_val(items, 0.1, seed=1) != (train, val)
    assert split_train_val([1, 2], 0.01, seed=0)[1] != []


def test_widen_gpt2_vocabulary_to_chat_keeps_text_logits():
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    wide = widen_to_chat(base)
    assert wide.config.vocab_size == TOK.n_vocab and wide.config.padded_vocab_size == base.config.padded_vocab_size
    idx = torch.tensor([TOK.encode("Hello there, friend")])
    with torch.no_grad():
        assert torch.equal(wide(idx)[0][..., :50257], base(idx)[0])
        wte = wide.transformer.wte.weight
        new, mean = wte[50257:50261], wte[:50257].mean(0)
        assert (new - mean).abs().max() < 0.1 * wte[:50257].std(0).max() * 6 and len({tuple(r.tolist()) for r in new}) == 4
    assert widen_to_chat(wide) is wide
    with pytest.raises(GptrainError, match="vocabulary 1000"):
        widen_to_chat(GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=32)))


# ---------------------------------------------------------------- end to end, through the command line

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny GPT-2-vocabulary model pretrained briefly on the shipped Shakespeare, saved as a HF directory."""
    from gptrain.hf import save_pretrained
    torch.manual_seed(0)
    text = gzip.decompress((resources.files("gptrain") / "assets" / "shakespeare_plays.txt.gz").read_bytes())
    ids = torch.tensor(get_tokenizer().encode(text[:200_000].decode("utf-8", "ignore")))
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        ix = torch.randint(len(ids) - 65, (4,))
        x = torch.stack([ids[i:i + 64] for i in ix])
        y = torch.stack([ids[i + 1:i + 65] for i in ix])
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    out = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    save_pretrained(model, out)
    return out


SFT_ARGS = ["--max-conversations", "150", "--seq-len", "64", "--micro-batch-size", "2", "--total-batch-size", "128",
            "--lr", "3e-3", "--warmup-steps", "2", "--val-fraction", "0.1", "--sample-every", "0", "--threads", "2",
            "--log-every", "0"]


def held_out_loss(model, data, seed=1337):
    """The masked (assistant-only) loss on the same held-out conversations the run used."""
    convs = load_conversations(str(data), limit=150)
    _, val = split_train_val(convs, 0.1, seed)
    examples, _, _ = encode_conversations(val, 64, TOK)
    total = count = 0
    with torch.no_grad():
        for x, y in ConversationValLoader(examples, 4, 64).batches():
            n = int((y != -1).sum())
            total += model(x, y)[1].item() * n
            count += n
    return total / count


def test_sft_lowers_held_out_assistant_loss(pretrained, shared_data, tmp_path):
    from gptrain.hf import load_model
    data = shared_data / "sft" / "hh-rlhf_harmless-base_test.jsonl.gz"
    run = tmp_path / "sft"
    assert cli(["sft", "--model", str(pretrained), "--data", str(data), "--out", str(run), "--max-steps", "16",
                "--eval-every", "16", "--save-every", "0", *SFT_ARGS]) == 0
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.5, vals
    assert len([e for e in events if "train_loss" in e]) == 16
    config = json.loads((run / "config.json").read_text())
    assert config["tokenizer"] == "gpt2-chat" and config["model"]["vocab_size"] == TOK.n_vocab
    assert config["train"]["model"] is None and config["train"]["init_from"] == str(pretrained)  # no preset name
    assert 0 < config["data"]["val"] <= 15 and config["data"]["assistant_tokens"] > 0
    before = held_out_loss(widen_to_chat(load_model(str(pretrained))), data)
    after = held_out_loss(load_model(str(run)), data)  # the run's newest checkpoint
    assert after < before - 0.5 and abs(before - vals[0]) < 1e-3 and abs(after - vals[-1]) < 1e-3


def test_sft_resumes_exactly(pretrained, shared_data, tmp_path, capsys):
    data = shared_data / "sft" / "hh-rlhf_harmless-base_test.jsonl.gz"
    run = tmp_path / "sft"
    args = ["sft", "--model", str(pretrained), "--data", str(data), "--out", str(run), "--max-steps", "6",
            "--eval-every", "0", "--save-every", "3", *SFT_ARGS]
    assert cli(args) == 0
    full = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if killed between the checkpoints at 3 and 6
    assert cli(args + ["--lr", "1e-3"]) == 2  # another recipe is refused, naming the flag
    assert "--lr 0.003 -> 0.001" in capsys.readouterr().err
    assert cli(args) == 0  # the same command continues the run
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["train_loss"] for e in resumed] == [e["train_loss"] for e in full] and len(full) == 6


def test_bad_sources_are_one_line_errors(pretrained, tmp_path, capsys):
    assert cli(["sft", "--model", str(pretrained), "--data", str(tmp_path / "missing.jsonl"),
                "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptrain: error:") and "missing.jsonl does not exist" in err and "\n" not in err


def test_sft_summary_counts_records_without_a_reply(pretrained, tmp_path, capsys):
    """...and writes every count with thousands separators."""
    data = tmp_path / "hh.jsonl"
    chosen = [f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(1200)]
    chosen[1] = "\n\nHuman: anyone there?\n\nAssistant:"  # an empty final reply: nothing to learn
    data.write_text("".join(json.dumps({"chosen": c, "rejected": ""}) + "\n" for c in chosen))
    run = tmp_path / "sft"
    assert cli(["sft", "--model", str(pretrained), "--data", str(data), "--out", str(run), "--max-steps", "1",
                "--eval-every", "0", "--save-every", "0", "--sample-every", "0", "--micro-batch-size", "1",
                "--threads", "1", "--log-every", "0"]) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sft: "))
    assert summary.startswith(f"sft: 1,199 conversations from 1,200 records of {data} (1 without an assistant "
                              "reply, skipped): 1,1")
    assert not re.search(r"(?<![\d.,])\d{4}", summary.replace(str(data), ""))  # "2,309" beside "2194" was the mix
    recorded = json.loads((run / "config.json").read_text())["data"]
    assert (recorded["conversations"], recorded["records"], recorded["skipped_records"]) == (1199, 1200, 1)


def test_sft_works_offline_on_the_shipped_set_with_its_defaults(pretrained, tmp_path):
    """No --data, no --lr: the shipped oasst-100 conversations and an LR fitted to the model; the held-out
    assistant loss falls and the samples are chat-format replies."""
    run = tmp_path / "chat"
    assert cli(["sft", "--model", str(pretrained), "--out", str(run), "--max-steps", "8", "--eval-every", "8",
                "--sample-every", "8", "--save-every", "0", "--micro-batch-size", "2", "--threads", "2",
                "--log-every", "0"]) == 0
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.1, vals  # 8.63 -> 8.50 in 8 steps for this barely trained model
    (samples,) = [e["samples"] for e in events if "samples" in e]
    assert samples[0].startswith("User: What is the capital of France? | Assistant:")
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["source"] == "oasst-100" and config["data"]["conversations"] == 102
    assert config["train"]["lr"] == pytest.approx(5e-5 * 768 / 32)  # an HF directory: scaled from its width


def test_sft_lr_follows_a_gptrain_runs_pretraining(tmp_path):
    from gptrain.chat.sft import sft_lr
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=128))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {"lr": 2e-3, "embedding_lr_scale": 5.0}}))
    assert sft_lr(str(tmp_path / "run"), model) == (1e-3, 5.0)
    assert sft_lr(str(tmp_path / "run" / "checkpoints" / "step_00000010"), model) == (1e-3, 5.0)
    assert sft_lr(str(tmp_path / "hf"), model) == (pytest.approx(3e-4), 1.0)
