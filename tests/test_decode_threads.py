"""A server's decode threads: all of them while they are faster, one while another process competes for the cores
(gptrain/decode_threads.py), and a request's tokens the same whichever count decodes it."""

import pytest
import torch

from gptrain.decode_threads import ThreadChoice, same_logits
from gptrain.engine import Engine
from gptrain.generate import SamplingParams, Scheduler
from gptrain.model import GPT, GPTConfig
from gptrain.packed_linear import can_pack, pack_linears

pytestmark = pytest.mark.usefixtures("one_thread")  # (restores the thread count a test changes)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(choice, clock, seconds_at, steps, step_gap=0.03):
    """`steps` decode steps, each taking seconds_at[threads] and reported to the choice; the counts used."""
    used = []
    for _ in range(steps):
        n = choice.threads
        used.append(n)
        clock.now += step_gap
        choice.record(seconds_at[n])
    return used


def test_keeps_all_threads_while_they_are_faster_and_checks_ever_less_often():
    clock = Clock()
    choice = ThreadChoice(2, clock=clock)
    used = run(choice, clock, {2: 0.025, 1: 0.038}, 3000)  # 90 s of an idle machine's steps
    assert choice.current == 2 and choice.switches == 0
    assert choice.checks == 5 and used.count(1) == 3 * 5  # checks at 2, 6, 14, 30, 62 s; 3 steps at 1 thread each
    assert choice.wait == 64.0  # the longest wait between checks


def test_goes_to_one_thread_within_steps_of_a_competing_process_and_back_after_it_ends():
    clock = Clock()
    choice = ThreadChoice(2, clock=clock)
    run(choice, clock, {2: 0.025, 1: 0.038}, 400)
    assert choice.current == 2
    used = run(choice, clock, {2: 0.300, 1: 0.050}, 5)  # a busy process starts: spinning threads stall each other
    assert used == [2, 2, 1, 1, 1] and choice.current == 1 and choice.switches == 1  # noticed in two steps
    checks = choice.checks
    used = run(choice, clock, {2: 0.300, 1: 0.050}, 1000)  # 30 s of it: checks at 2 threads end after one step
    assert choice.current == 1 and used.count(2) == choice.checks - checks >= 3
    run(choice, clock, {2: 0.025, 1: 0.038}, 3000)  # it ends; the next check (at most 64 s on) finds out
    assert choice.current == 2 and choice.switches == 2


def test_one_slow_step_is_not_a_busy_machine():
    clock = Clock()
    choice = ThreadChoice(2, clock=clock)
    run(choice, clock, {2: 0.025, 1: 0.038}, 100)
    checks = choice.checks
    choice.record(0.200)  # e.g. the step that grew the KV cache
    assert choice.threads == 2 and choice.checks == checks and not choice.checking


def test_noise_within_the_margin_switches_nothing():
    clock = Clock()
    choice = ThreadChoice(4, clock=clock)
    run(choice, clock, {4: 0.030, 1: 0.0285}, 1000)  # one thread 5% faster: under the 10% margin
    assert choice.current == 4 and choice.checks > 0 and choice.switches == 0


@pytest.mark.parametrize("most, switch", [(1, True), (2, False)])
def test_a_fixed_count_never_changes(most, switch):
    clock = Clock()
    choice = ThreadChoice(most, switch=switch, clock=clock)
    assert run(choice, clock, {most: 0.300, 1: 0.010}, 200) == [most] * 200 and choice.checks == 0


def served_model(dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=12, n_embd=768)).to(dtype).eval()
    pack_linears(model)
    return model


def test_a_thread_count_that_changes_the_logits_is_never_switched(monkeypatch):
    model = served_model(torch.float32)
    engine = Engine(model)
    hidden = GPT.hidden
    monkeypatch.setattr(GPT, "hidden", lambda self, idx, cache=None: hidden(self, idx, cache)
                        + 1e-3 * torch.get_num_threads())  # as if a product's order changed with the count
    assert not same_logits(engine, (2, 1))
    with Scheduler(model, max_batch=2, threads=2) as s:
        list(s.submit([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0, stop_ids=())))
        assert s._choices[0].switch is False and s.stats()["threads"] == [2]


@pytest.mark.skipif(not can_pack(torch.ones(1, dtype=torch.bfloat16)), reason="no bf16 packed linear on this CPU")
def test_bf16_tokens_are_the_same_whatever_thread_count_decodes_each_step(monkeypatch):
    """What the server relies on: its bf16 model's logits are the same bits on 1 and 2 threads (checked at start),
    so a request whose steps change count gets the tokens it gets on one count throughout."""
    model = served_model(torch.bfloat16)
    engine = Engine(model)
    assert same_logits(engine, (2, 1))
    params = [SamplingParams(max_new_tokens=24, temperature=t, seed=3, stop_ids=()) for t in (0.0, 1.0, 0.8)]
    prompts = [[5, 17, 300, 41], [9] * 7, [400, 2]]
    want = []  # on one thread
    for p, sp in zip(prompts, params):
        gen = engine.generate([p], sp)
        for _ in gen:
            pass
        want.append(gen.ids[0])
    flip = iter(range(10**6))
    monkeypatch.setattr(ThreadChoice, "threads", property(lambda self: 1 + next(flip) % 2))  # 1, 2, 1, 2, ...
    with Scheduler(model, max_batch=4, threads=2) as s:
        reqs = [s.submit(p, sp) for p, sp in zip(prompts, params)]
        assert [[ev for ev in r] and r.ids for r in reqs] == want
