"""Continuous batching: requests that share the running batch get exactly what they would get alone."""

import asyncio
import threading
import time

import pytest
import torch

from gptrain.errors import GptrainError
from gptrain.generate import Engine, QueueFull, SamplingParams, Scheduler, complete
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def lively_model(block_size=64, n_layer=2, seed=0):
    """A random tiny GPT whose greedy output varies (default init just repeats one token)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50257, n_layer=n_layer, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


MODEL = lively_model()
TOK = get_tokenizer()
PROMPTS = [TOK.encode(t) for t in ("The quick brown fox jumps over the lazy dog", "Hello,", "I'm a language",
                                   "Once upon a time, in a land far away, there lived", "A")]


def alone(model, prompt, params):
    gen = Engine(model).generate([prompt], params)
    for _ in gen:
        pass
    return gen.ids[0], gen.texts[0], gen.finish_reasons[0]


def collect(reqs):
    return [(r.ids, r.text, r.finish_reason) for r in reqs if [ev for ev in r]]


def test_concurrent_greedy_requests_equal_each_alone():
    params = [SamplingParams(max_new_tokens=n, temperature=0, stop_ids=()) for n in (20, 7, 33, 12, 25)]
    want = [alone(MODEL, p, sp) for p, sp in zip(PROMPTS, params)]
    assert all(len(set(ids)) > 4 for ids, _, _ in want)  # real sequences, not one token repeated
    # 3 slots for 5 requests: two wait, then join as others leave; chunks of 4 split the longer prompts
    with Scheduler(MODEL, max_batch=3, prefill_chunk=4) as s:
        reqs = [s.submit(p, sp) for p, sp in zip(PROMPTS, params)]
        assert collect(reqs) == want
        assert all(r.finish_reason == "length" and r.completion_tokens == sp.max_new_tokens
                   for r, sp in zip(reqs, params))
        assert s.stats() == {"queue_depth": 0, "running": 0, "max_batch": 3, "max_queue": 64, "free_slots": 3,
                             "steps": s.stats()["steps"], "pools": 1, "threads": [s.threads]}
        assert not s._pools[0].rows  # the slot pool is empty after everything finished


def test_seeded_sampled_requests_with_their_own_settings_equal_each_alone():
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, top_k=None, seed=1, stop_ids=()),
              SamplingParams(max_new_tokens=18, temperature=0.8, top_k=20, seed=2, stop_ids=()),
              SamplingParams(max_new_tokens=30, temperature=1.2, top_p=0.9, seed=3, stop_ids=(),
                             repetition_penalty=1.3),
              SamplingParams(max_new_tokens=16, temperature=0, no_repeat_ngram=2, stop_ids=()),
              SamplingParams(max_new_tokens=60, temperature=1.0, seed=5, stop_ids=(), context="slide")]
    want = [alone(MODEL, p, sp) for p, sp in zip(PROMPTS, params)]
    assert len(want[4][0]) == 60  # 1 + 60 tokens in a 64-token window: that row slid while the others ran
    with Scheduler(MODEL, max_batch=5, prefill_chunk=5) as s:
        reqs = [s.submit(p, sp) for p, sp in zip(PROMPTS, params)]
        assert collect(reqs) == want
    # Engine.generate batches too: row b is what a one-prompt call with seed + b gives
    gen = Engine(MODEL).generate(PROMPTS[:3], params[0])
    list(gen)
    assert gen.ids == [alone(MODEL, p, SamplingParams(**{**vars(params[0]), "seed": 1 + b}))[0]
                       for b, p in enumerate(PROMPTS[:3])]


def test_a_request_joining_midway_changes_nothing_for_the_others():
    long = SamplingParams(max_new_tokens=40, temperature=0.9, seed=7, stop_ids=())
    joiner = SamplingParams(max_new_tokens=10, temperature=0, stop_ids=())
    want_long, want_join = alone(MODEL, PROMPTS[0], long), alone(MODEL, PROMPTS[3], joiner)
    steps = []
    with Scheduler(MODEL, max_batch=4, prefill_chunk=3, on_step=lambda *a: steps.append(a)) as s:
        first = s.submit(PROMPTS[0], long)
        events = iter(first)
        got = [next(events) for _ in range(15)]
        before = len(steps)
        second = s.submit(PROMPTS[3], joiner)  # 12 prompt tokens: prefilled 3 per iteration while `first` decodes
        got += list(events)
        list(second)
    assert (first.ids, first.text, first.finish_reason) == want_long
    assert (second.ids, second.text, second.finish_reason) == want_join
    assert [ev.token for ev in got] == first.ids and "".join(ev.text for ev in got) == first.text
    joined = [(b, p) for b, _, p in steps[before:] if p]
    assert len(joined) == 4 and max(p for _, p in joined) <= 3  # the joiner's 11 tokens went in 4 chunks...
    assert all(b >= 1 for b, _ in joined)  # ...each beside a decode step of the running row


def test_stop_ids_and_strings_per_row():
    free = SamplingParams(max_new_tokens=20, temperature=0, stop_ids=())
    ids, text, _ = alone(MODEL, PROMPTS[0], free)
    by_id = SamplingParams(max_new_tokens=20, temperature=0, stop_ids=(ids[5],))
    stop = text[10:15]
    by_text = SamplingParams(max_new_tokens=20, temperature=0, stop_ids=(), stop=(stop, "zzzq"))
    with Scheduler(MODEL, max_batch=3) as s:
        reqs = [s.submit(PROMPTS[0], p) for p in (by_id, by_text, free)]
        events = [list(r) for r in reqs]
    assert reqs[0].ids == ids[:ids.index(ids[5])] and reqs[0].finish_reason == "stop"
    assert events[0][-1].token is None  # the stop token ended it and is not part of the output
    assert reqs[1].text == text[:text.index(stop)] and reqs[1].finish_reason == "stop"
    assert (reqs[2].ids, reqs[2].finish_reason) == (ids, "length")
    for r, evs in zip(reqs, events):
        assert "".join(ev.text for ev in evs) == r.text
        assert [ev.finish_reason for ev in evs[:-1]] == [None] * (len(evs) - 1)
        assert r.submitted_at <= r.first_token_at <= r.finished_at


def test_cancel_frees_the_slot_and_a_queued_request_takes_it():
    endless = SamplingParams(max_new_tokens=10_000, temperature=1.0, stop_ids=(), context="slide")
    with Scheduler(MODEL, max_batch=1, max_queue=2) as s:
        a = s.submit(PROMPTS[0], endless)
        b = s.submit(PROMPTS[1], SamplingParams(max_new_tokens=5, temperature=0, stop_ids=()))
        c = s.submit(PROMPTS[2], endless)
        events = iter(a)
        next(events)
        assert s.stats()["running"] == 1 and s.stats()["queue_depth"] == 2
        c.cancel()  # queued: leaves at once
        assert [ev.finish_reason for ev in c] == ["cancelled"]
        a.cancel()  # running: leaves at the next step, and b gets the slot
        assert list(events)[-1].finish_reason == "cancelled" and a.finish_reason == "cancelled"
        assert list(b)[-1].finish_reason == "length" and b.ids == alone(MODEL, PROMPTS[1], b.params)[0]
        assert s.stats()["free_slots"] == 1 and not s._pools[0].rows


def test_cancelling_a_row_after_the_cache_grew_leaves_the_others_alone():
    """A client hanging up on a long generation (its row leaves after the step resized the cache) ends only its
    own request: the other rows finish with the tokens they get alone."""
    model = lively_model(block_size=256)
    endless = SamplingParams(max_new_tokens=200, temperature=1.0, stop_ids=())
    others = [SamplingParams(max_new_tokens=100, temperature=0.8, seed=i, stop_ids=()) for i in (1, 2)]
    with Scheduler(model, max_batch=4) as s:
        first = s.submit(PROMPTS[0], endless)  # the first slot: removing it moves the last row into its place
        rest = [s.submit(p, sp) for p, sp in zip(PROMPTS[1:3], others)]
        events = iter(first)
        for _ in range(80):  # past 64 tokens: the cache has grown
            next(events)
        first.cancel()
        assert list(events)[-1].finish_reason == "cancelled" and first.error is None
        assert collect(rest) == [alone(model, p, sp) for p, sp in zip(PROMPTS[1:3], others)]
        assert all(r.finish_reason == "length" for r in rest) and not s._pools[0].rows


def test_a_request_admitted_as_another_is_cancelled_leaves_the_others_alone():
    """Both in the same pass of the scheduler's loop (two clients can do it by chance; holding the scheduler's lock
    makes it certain): the new row joins, the cancelled one leaves, and the others finish with their own tokens."""
    params = [SamplingParams(max_new_tokens=30, temperature=0.8, seed=i, stop_ids=()) for i in range(3)]
    with Scheduler(MODEL, max_batch=8) as s:
        a, b = (s.submit(p, sp) for p, sp in zip(PROMPTS[:2], params))
        events = iter(a)
        for _ in range(5):
            next(events)
        with s._lock:
            c = s.submit(PROMPTS[2], params[2])
            a.cancel()
        assert list(events)[-1].finish_reason == "cancelled"
        assert collect([b, c]) == [alone(MODEL, p, sp) for p, sp in zip(PROMPTS[1:3], params[1:])]
        assert b.error is None and c.error is None and not s._pools[0].rows


def test_full_queue_and_bad_requests_are_refused():
    s = Scheduler(MODEL, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    ok = SamplingParams(max_new_tokens=5)
    s.submit([1, 2], ok)
    s.submit([1, 2], ok)  # one in the (not yet taken) slot, one waiting
    with pytest.raises(QueueFull, match="max_batch=1, max_queue=1") as e:
        s.submit([1, 2], ok)
    assert isinstance(e.value, GptrainError) and e.value.retry_after >= 1
    with pytest.raises(GptrainError, match="empty: it needs at least one token"):
        s.submit([], ok)
    with pytest.raises(GptrainError, match="token id 50300 outside the model's vocabulary of 50257"):
        s.submit([1, 50300], ok)
    with pytest.raises(GptrainError, match=r"60 tokens \+ max_new_tokens=5 exceeds .* window of 64"):
        s.submit([1] * 60, ok)
    with pytest.raises(GptrainError, match="temperature=-1 must be >= 0"):
        s.submit([1], SamplingParams(temperature=-1))
    s.close()  # never started: what was queued is cancelled
    with pytest.raises(GptrainError, match="closed"):
        s.submit([1], ok)


def test_events_from_asyncio_do_not_block_the_loop_and_close_cancels_everything():
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_ids=())
    want = alone(MODEL, PROMPTS[0], params)[0]
    s = Scheduler(MODEL, max_batch=2).start()

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        reqs = [s.submit(PROMPTS[0], params), s.submit(PROMPTS[0], params)]
        async def tokens(r):
            return [ev.token async for ev in r.events()]

        outs = await asyncio.gather(*(tokens(r) for r in reqs))
        t.cancel()
        return reqs, outs, ticks

    reqs, outs, ticks = asyncio.run(main())
    assert [r.ids for r in reqs] == [want, want] and [o[:-1] for o in outs] == [want[:-1]] * 2
    assert ticks > 30  # the loop kept running other tasks while tokens came
    steps, cpu = s.stats()["steps"], time.process_time()
    time.sleep(0.3)  # idle: the thread waits on its condition
    assert s.stats()["steps"] == steps and time.process_time() - cpu < 0.1
    running = s.submit(PROMPTS[1], SamplingParams(max_new_tokens=10_000, stop_ids=(), context="slide"))
    queued = [s.submit(PROMPTS[2], params) for _ in range(3)]
    next(iter(running))
    s.close()
    assert running.finish_reason == "cancelled" and all(q.finish_reason == "cancelled" for q in queued)
    assert not all(t.is_alive() for t in s._threads) and not any(t.name == "gptrain-scheduler" for t in threading.enumerate())


def test_compiled_decode_compiles_once_for_generate_and_the_scheduler():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = lively_model(block_size=32, n_layer=1)
    prompts = PROMPTS[:3]
    eager = complete(model, prompts, max_new_tokens=12, temperature=0, stop_ids=[], use_cache=False)
    engine = Engine(model, compile=True)
    gen = engine.generate(prompts, max_new_tokens=12, temperature=0, stop_ids=())
    list(gen)
    assert gen.ids == eager
    assert counters["stats"]["unique_graphs"] == 1  # one decode graph for all 12 decode steps
    list(engine.generate([p[:2] for p in prompts], max_new_tokens=8, temperature=0.8, seed=3))  # same shapes
    params = [SamplingParams(max_new_tokens=n, temperature=0, stop_ids=()) for n in (9, 4, 14, 6, 3)]
    want = [alone(model, p, sp) for p, sp in zip(PROMPTS, params)]
    with Scheduler(model, max_batch=3, compile=True, prefill_chunk=4) as s:  # rows join, leave, queue
        reqs = [s.submit(p, sp) for p, sp in zip(PROMPTS, params)]
        assert collect(reqs) == want
    assert counters["stats"]["unique_graphs"] == 1  # the same graph, whatever the rows and their lengths


def test_a_failing_step_cancels_its_rows_and_the_scheduler_goes_on(capsys):
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=())
    with Scheduler(MODEL, max_batch=2) as s:
        def boom():
            raise RuntimeError("out of memory")

        s._pools[0].step = boom
        failed = s.submit(PROMPTS[0], params)
        assert [ev.finish_reason for ev in failed] == ["cancelled"] and failed.error == "RuntimeError: out of memory"
        ok = s.submit(PROMPTS[0], params)
        assert [ev.token for ev in ok][-1] is not None and ok.ids == alone(MODEL, PROMPTS[0], params)[0]
        assert s.stats()["running"] == 0 and all(t.is_alive() for t in s._threads)
    assert "RuntimeError: out of memory" in capsys.readouterr().err


@pytest.mark.parametrize("pools", [2, 3])
def test_requests_spread_over_pools_and_each_gets_what_it_gets_alone(pools):
    params = [SamplingParams(max_new_tokens=n, temperature=t, seed=7, stop_ids=())
              for n, t in ((20, 0), (7, 0.9), (33, 0), (12, 1.2), (25, 0.7))]
    want = [alone(MODEL, p, sp) for p, sp in zip(PROMPTS, params)]
    with Scheduler(MODEL, max_batch=4, pools=pools, prefill_chunk=4) as s:  # 5 requests, 4 slots: one queues
        reqs = [s.submit(p, sp) for p, sp in zip(PROMPTS, params)]
        assert collect(reqs) == want
        assert {r._pool for r in reqs} == set(range(pools))  # every pool served some
        assert s.stats()["running"] == 0 and s._rows == [0] * pools and not any(p.rows for p in s._pools)


def test_requests_are_spread_evenly_over_the_pools():
    endless = SamplingParams(max_new_tokens=10_000, temperature=1.0, stop_ids=(), context="slide")
    with Scheduler(MODEL, max_batch=8, pools=2) as s:  # two pools of 4 slots
        reqs = [s.submit(PROMPTS[i], endless) for i in range(4)]
        streams = [iter(r) for r in reqs]
        for it in streams:
            next(it)  # every request has its first token: all four are running
        assert s._rows == [2, 2] and [len(p.rows) for p in s._pools] == [2, 2]
        for r in reqs:
            r.cancel()
        assert all(list(it)[-1].finish_reason == "cancelled" for it in streams)
        assert s._rows == [0, 0]


def test_a_pool_takes_its_share_of_a_burst_at_once():
    s = Scheduler(MODEL, max_batch=24, pools=2)  # not started: the admission rule alone; pools of 12 slots
    s._queue.extend(object() for _ in range(7))
    s._rows = [1, 8]  # 16 requests: a share of 8 each; pool 0 under it takes them, pool 1 at it does not
    assert s._may_admit(0) and not s._may_admit(1)
    s._sizes, s._rows = [12, 4], [6, 4]
    s._queue = type(s._queue)([object(), object()])  # 12 requests, pool 1 full: pool 0 goes past its share
    assert s._may_admit(0) and not s._may_admit(1)
    s._queue.clear()


def test_a_failing_pool_cancels_only_its_own_rows():
    params = SamplingParams(max_new_tokens=40, temperature=0, stop_ids=())
    with Scheduler(MODEL, max_batch=2, pools=2) as s:
        def boom():
            raise RuntimeError("out of memory")

        s._pools[0].step = boom
        reqs = [s.submit(PROMPTS[0], params), s.submit(PROMPTS[1], params)]  # one slot in each pool
        ends = [list(r)[-1].finish_reason for r in reqs]
        failed, ok = sorted(reqs, key=lambda r: r._pool)
        assert sorted(ends) == ["cancelled", "length"] and failed.error == "RuntimeError: out of memory"
        assert ok.finish_reason == "length" and ok.ids == alone(MODEL, ok.prompt, params)[0]
        again = s.submit(PROMPTS[0], params)  # the failed pool was replaced by a fresh one
        assert list(again)[-1].finish_reason == "length" and again.ids == alone(MODEL, PROMPTS[0], params)[0]


def test_pools_are_refused_with_compile_and_bad_counts():
    with pytest.raises(GptrainError, match="compile runs one compiled decode step: use pools=1, not 2"):
        Scheduler(MODEL, pools=2, compile=True)
    with pytest.raises(GptrainError, match="pools=0 must be >= 1"):
        Scheduler(MODEL, pools=0)
