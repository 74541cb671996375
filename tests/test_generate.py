import pytest
import torch

from gptrain.errors import GptrainError
from gptrain.generate import Engine, TextStream, complete, sample_from_logits
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262], [15496, 11], [40, 1101, 257, 3303]]


def lively_model(block_size=64, n_layer=2, seed=0):
    """A random tiny GPT whose greedy output varies (default init just repeats one token)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50257, n_layer=n_layer, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def run(engine, prompts=PROMPTS, **kw):
    gen = engine.generate(prompts, **kw)
    steps = list(gen)
    return gen, steps


def test_greedy_with_cache_equals_full_forward_for_ragged_batch():
    model = lively_model()
    kw = dict(max_new_tokens=24, temperature=0, stop_ids=[])
    cached = complete(model, PROMPTS, **kw)
    full = complete(model, PROMPTS, **kw, use_cache=False)
    assert cached == full
    assert all(len(set(row)) > 8 for row in cached)  # a real sequence, not one token repeated
    # Each row of the batch decodes as it would alone (left padding is invisible).
    assert [complete(model, [p], **kw)[0] for p in PROMPTS] == cached


def test_sliding_window_agrees_with_and_without_cache():
    model = lively_model(block_size=16)
    engine = Engine(model)
    a, _ = run(engine, max_new_tokens=30, temperature=0, stop_ids=(), context="slide")
    b, _ = run(engine, max_new_tokens=30, temperature=0, stop_ids=(), context="slide", use_cache=False)
    assert a.ids == b.ids and all(len(r) == 30 for r in a.ids)  # 7 + 30 tokens > 16: slid at least twice


def test_context_window_error_is_clear():
    model = lively_model(block_size=16)
    with pytest.raises(GptrainError, match=r"prompt 0 of 7 tokens \+ max_new_tokens=10 exceeds .* context window "
                                           r"of 16 tokens; .*lower --max-new-tokens, or .*--context slide\)?$"):
        Engine(model).generate(PROMPTS, max_new_tokens=10)


def test_seed_fixes_samples():
    engine = Engine(lively_model())
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=None, stop_ids=())
    a, _ = run(engine, seed=1, **kw)
    b, _ = run(engine, seed=1, **kw)
    c, _ = run(engine, seed=2, **kw)
    assert a.ids == b.ids and a.ids != c.ids


def test_top_k_1_and_tiny_top_p_are_greedy():
    engine = Engine(lively_model())
    greedy, _ = run(engine, max_new_tokens=10, temperature=0, stop_ids=())
    k1, _ = run(engine, max_new_tokens=10, temperature=1.5, top_k=1, stop_ids=(), seed=5)
    p0, _ = run(engine, max_new_tokens=10, temperature=1.5, top_k=None, top_p=1e-6, stop_ids=(), seed=6)
    assert greedy.ids == k1.ids == p0.ids


def test_samples_stay_inside_top_k_and_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    g = torch.Generator().manual_seed(0)
    allowed_k = torch.topk(logits, 5).indices
    for _ in range(200):
        t = sample_from_logits(logits, temperature=1.3, top_k=5, generator=g)
        assert all(t[b] in allowed_k[b] for b in range(4))
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    drawn = lambda **kw: {int(sample_from_logits(probs.log(), generator=g, **kw)) for _ in range(300)}  # noqa: E731
    assert drawn(top_p=0.5) == {1} and drawn(top_p=0.8) == {1, 3} and drawn(top_p=0.81) == {1, 3, 2}
    assert drawn(top_p=1.0) == drawn(top_k=None) == {0, 1, 2, 3} and drawn(top_k=3, top_p=0.99) == {1, 3, 2}
    assert drawn(top_k=2) == {1, 3}


def test_stops_at_endoftext_by_default_and_at_given_ids():
    model = lively_model()
    with torch.no_grad():  # every hidden state becomes <|endoftext|>'s embedding: EOT is the greedy choice
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[50256])
    gen, _ = run(Engine(model), max_new_tokens=5, temperature=0)
    assert gen.ids == [[], [], []] and gen.finish_reasons == ["stop"] * 3

    model = lively_model()
    full = complete(model, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[])
    stop = full[0][3]
    gen, steps = run(Engine(model), max_new_tokens=10, temperature=0, stop_ids=(stop,))
    assert gen.ids[0] == full[0][:full[0].index(stop)] and gen.finish_reasons[0] == "stop"
    assert [s.tokens[0] for s in steps[:4]] == full[0][:4]  # the stop token is reported, then the row is done
    assert all(s.tokens[0] is None for s in steps[4:])


def test_stop_strings_cut_text_even_across_tokens():
    engine = Engine(lively_model())
    free, _ = run(engine, max_new_tokens=20, seed=4, stop_ids=())
    text = free.texts[1]
    stop = text[12:18]  # six characters, very likely spanning a token boundary
    assert stop.strip()
    gen, steps = run(engine, max_new_tokens=20, seed=4, stop_ids=(), stop=("zzzzqqq", stop))
    assert gen.texts[1] == text[:text.index(stop)] and gen.finish_reasons[1] == "stop"
    assert "".join(s.text[1] for s in steps) == gen.texts[1]
    assert gen.texts[0] == free.texts[0] or gen.finish_reasons[0] == "stop"


def test_text_stream_holds_split_utf8_and_stop_prefixes():
    tok = get_tokenizer()
    text = "naïve café 😀 — 世界 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    stream = TextStream(tok)
    pieces = [stream.add(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)

    stream = TextStream(tok, stop=("lo w",))
    shown = [stream.add(t) for t in tok.encode("Hello world, hello")]
    assert "".join(shown) + stream.finish() == "Hel" and stream.stopped


def test_no_repeat_ngram_and_repetition_penalty():
    torch.manual_seed(0)
    dull = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    plain = complete(dull, PROMPTS[:1], max_new_tokens=20, temperature=0, stop_ids=[])[0]
    assert len(set(plain)) < 5  # default init repeats itself
    engine = Engine(dull)
    gen, _ = run(engine, PROMPTS[:1], max_new_tokens=20, temperature=0, stop_ids=(), no_repeat_ngram=2)
    seq = PROMPTS[0] + gen.ids[0]
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))
    gen, _ = run(engine, PROMPTS[:1], max_new_tokens=20, temperature=0, stop_ids=(), repetition_penalty=100)
    assert len(set(gen.ids[0])) > len(set(plain))


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "temperature=-1 must be >= 0"),
    (dict(top_k=0), "top_k=0 must be at least 1"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
    (dict(repetition_penalty=1e-300), r"repetition_penalty=1e-300 must be in \[0.01, 100\]"),
])
def test_bad_sampling_settings_are_clear_errors(kw, message):
    with pytest.raises(GptrainError, match=message):
        Engine(lively_model()).generate(PROMPTS, **kw)


def test_bad_prompts_are_clear_errors():
    engine = Engine(lively_model())
    with pytest.raises(GptrainError, match="at least one token"):
        engine.generate([[1, 2], []])
    with pytest.raises(GptrainError, match="token id 50300 outside the model's vocabulary of 50257"):
        engine.generate([[1, 50300]])


def test_sample_command_prints_only_the_generated_text(tmp_path, capsys):
    import os
    import subprocess
    import sys
    from gptrain.cli import main
    from gptrain.generate import SAMPLE_SEPARATOR
    model = lively_model()
    model.save_pretrained(tmp_path / "m")
    tok = get_tokenizer()
    prompt = "Hello, I'm a language model,"
    args = ["sample", "--model", str(tmp_path / "m"), "--prompt", prompt, "--num-samples", "2",
            "--max-new-tokens", "12", "--temperature", "0"]
    proc = subprocess.run([sys.executable, "-m", "gptrain", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    expected = complete(model, [tok.encode(prompt)] * 2, max_new_tokens=12, temperature=0)
    assert proc.stdout == SAMPLE_SEPARATOR.join(tok.decode(ids) for ids in expected) + "\n"
    assert "tokens/s" in proc.stderr
    assert main(args + ["--no-kv-cache"]) == 0
    assert capsys.readouterr().out == proc.stdout
    # --echo (the demo's): each sample is the prompt followed by its continuation
    assert main(args + ["--echo"]) == 0
    assert capsys.readouterr().out == SAMPLE_SEPARATOR.join(prompt + tok.decode(ids) for ids in expected) + "\n"

    # Defaults fit the model: the default 128 new tokens are capped to what the 64-token window leaves (a tiny
    # model's 128-token window is the same case), said on stderr; a --max-new-tokens that does not fit is an error.
    prompt, n = "In the beginning", len(tok.encode("In the beginning"))
    assert main(["sample", "--model", str(tmp_path / "m"), "--prompt", prompt]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and f"max_new_tokens capped at {64 - n}: the model's 64-token window less the {n}-token" in err
    assert main(["sample", "--model", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "64"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "context='slide'" not in err
    assert err.startswith(f"gptrain: error: the prompt of {n} tokens + --max-new-tokens 64 exceeds the model's "
                          f"context window of 64 tokens; lower --max-new-tokens to at most {64 - n}, or pass "
                          "--context slide")
    assert main(["sample", "--model", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "100",
                 "--context", "slide", "--temperature", "0"]) == 0
    assert "capped" not in capsys.readouterr().err


def test_tiny_temperature_is_greedy_not_a_crash(tiny_config):
    """logits / 5e-324 overflowed to inf and made the draw fail (found by the server's fuzz run)."""
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    greedy = complete(model, PROMPTS[:1], max_new_tokens=8, temperature=0, stop_ids=[])
    assert complete(model, PROMPTS[:1], max_new_tokens=8, temperature=5e-324, top_k=None, stop_ids=[]) == greedy


def test_a_row_added_and_another_removed_before_the_next_step():
    """The scheduler adds the rows it admits and removes the cancelled ones before it steps: a row added beyond the
    cache's rows (it holds the rows in use at the last step) moves into a freed slot, and every row still gets
    exactly its own tokens."""
    from gptrain.engine import SlotPool
    from gptrain.sampling import SamplingParams
    engine = Engine(lively_model())
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=i, stop_ids=()) for i in range(3)]
    want = []
    for p, sp in zip(PROMPTS, params):
        gen = engine.generate([p], sp)
        list(gen)
        want.append(gen.ids[0])
    pool = SlotPool(engine, 8)
    seqs = [engine.sequence(p, sp) for p, sp in zip(PROMPTS, params)]
    pool.add(seqs[0])
    pool.add(seqs[1])
    pool.step()
    assert pool.cache.lens.size(0) == 2
    pool.add(seqs[2])  # slot 2, beyond the cache's 2 rows
    pool.remove(seqs[0])  # slot 2's row moves into slot 0
    while pool.rows:
        pool.step()
    assert [seqs[1].ids, seqs[2].ids] == want[1:]


@pytest.mark.parametrize("seed", [0, 4, 7])  # 4 and 7 add a row beyond the cache's rows, then remove another
def test_random_joins_leaves_and_steps_give_every_row_its_own_tokens(seed):
    """Rows join, are removed (cancelled) and step in a random order, as a server's clients make them; the cache
    grows and shrinks under them. A row that ran to the end has exactly its tokens alone; a cancelled one a
    prefix of them."""
    import random
    from gptrain.engine import SlotPool
    from gptrain.sampling import SamplingParams
    rng = random.Random(seed)
    engine = Engine(lively_model(block_size=160, n_layer=1))
    jobs = [(rng.choice(PROMPTS) * rng.randint(1, 12), SamplingParams(
        max_new_tokens=rng.randint(1, 90), temperature=0.8, seed=i, stop_ids=())) for i in range(30)]
    want = []
    for prompt, sp in jobs:
        gen = engine.generate([prompt], sp)
        list(gen)
        want.append(gen.ids[0])
    pool, todo, cancelled = SlotPool(engine, 8, prefill_chunk=16), list(range(len(jobs))), set()
    seqs = [engine.sequence(p, sp) for p, sp in jobs]
    while todo or pool.rows:
        op = rng.random()
        if op < 0.4 and todo and pool.free_slots:
            pool.add(seqs[todo.pop(0)])
        elif op < 0.5 and pool.rows:
            row = rng.choice(pool.rows)
            pool.remove(row)
            cancelled.add(seqs.index(row))
        elif pool.rows:
            pool.step()
    for i, (seq, ids) in enumerate(zip(seqs, want)):
        assert seq.ids == ids if i not in cancelled else seq.ids == ids[:len(seq.ids)], i
    assert 0 < len(cancelled) < len(jobs)


def test_cache_rows_and_room_follow_the_pool_and_tokens_stay_the_same():
    """The eager cache holds the rows in use (a power of two, at least 2) and room for the longest window; rows
    join, leave (one cancelled from outside the step, as the scheduler does) and cross 64 tokens, and every row
    still gets exactly the tokens it gets alone."""
    from gptrain.engine import SlotPool
    from gptrain.sampling import SamplingParams
    model = lively_model(block_size=256, n_layer=1)
    engine = Engine(model)
    long_prompt = (PROMPTS[0] * 20)[:150]
    rows = [(long_prompt, 5), (PROMPTS[1], 90), (PROMPTS[2], 70), (PROMPTS[0], 60), (PROMPTS[1], 40)]
    # the long row leaves early; rows 1 and 2 cross 64; rows 3 and 4 join later; row 3 is cancelled
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, seed=i, stop_ids=()) for i, (_, n) in enumerate(rows)]
    want = []
    for (prompt, _), sp in zip(rows, params):
        gen = engine.generate([prompt], sp)
        list(gen)
        want.append(gen.ids[0])
    pool = SlotPool(engine, 8, prefill_chunk=64)
    seqs = [engine.sequence(p, sp) for (p, _), sp in zip(rows, params)]
    for s in seqs[:3]:
        pool.add(s)
    shapes, steps = [], 0
    while pool.rows:
        pool.step()
        steps += 1
        if steps == 10:
            pool.add(seqs[3])
            pool.add(seqs[4])
        if steps == 30:
            pool.remove(seqs[3])  # outside inference mode, after the cache was resized inside it
        shapes.append((pool.cache.lens.size(0), pool.cache.max_len))
    assert [s.ids for i, s in enumerate(seqs) if i != 3] == [w for i, w in enumerate(want) if i != 3]
    assert seqs[3].ids == want[3][:len(seqs[3].ids)] and 0 < len(seqs[3].ids) < 60
    changes = [r for i, r in enumerate(shapes) if i == 0 or r != shapes[i - 1]]
    # 3 rows: 4 rows of the 150-token prompt's room; it leaves: 2 rows of 64 (half the room or less shrinks it);
    # 2 rows join: 4 rows; when rows 1 and 2 cross 64 tokens, the others have left: 2 rows of 128 (a resize takes
    # the rows in use then, though 2 of 4 alone would not have shrunk the cache)
    assert changes == [(4, 192), (2, 64), (4, 64), (2, 128)], changes
    assert all(rows <= 8 for rows, _ in shapes)
