"""The OpenAI-compatible server, tested with the official `openai` client (and raw HTTP where a client would not
misbehave enough) against uvicorn running on 127.0.0.1: a chat model (vocabulary 50261, with a key) and a base
model (50257, open), tiny and random."""

import http.client
import json
import logging
import socket
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the server tests use the openai client (pip install 'gptrain[dev]')")
pytest.importorskip("fastapi", reason="gptrain serve needs the serve extra (pip install 'gptrain[serve]')")

from conftest import ROOT  # noqa: E402
from gptrain.chat.format import render_for_completion, stop_ids  # noqa: E402
from gptrain.errors import GptrainError  # noqa: E402
from gptrain.generate import Engine  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402
from gptrain.serve.app import BackgroundServer, create_app  # noqa: E402
from gptrain.serve.config import ServeConfig  # noqa: E402
from gptrain.serve.service import Service  # noqa: E402
from gptrain.tokenizer import get_tokenizer  # noqa: E402

CHAT_TOK, BASE_TOK = get_tokenizer(chat=True), get_tokenizer()
KEY = "test-key"
HELLO = [{"role": "user", "content": "Hello there"}]
GATE = threading.Event()  # cleared: the model's first block waits (the scheduler stops between steps)
GATE.set()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


LOG = Records()


def tiny(vocab: int, block: int = 64) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32)).eval()
    model.transformer.h[0].register_forward_pre_hook(hold)
    return model


def hold(*_):
    GATE.wait(20)


@pytest.fixture(scope="module", autouse=True)
def log():
    root = logging.getLogger()
    root.addHandler(LOG)
    yield LOG
    root.removeHandler(LOG)


@pytest.fixture(scope="module")
def chat():
    svc = Service(tiny(CHAT_TOK.n_vocab), "tiny-chat", ServeConfig(
        api_key=KEY, max_tokens_limit=48, default_max_tokens=16, max_request_bytes=20_000, max_batch=4,
        max_queue=2, request_timeout=1.0))
    with BackgroundServer(create_app(svc)) as srv:
        srv.service = svc
        yield srv


@pytest.fixture(scope="module")
def base():
    svc = Service(tiny(BASE_TOK.n_vocab), "tiny-base", ServeConfig(max_batch=4, max_queue=2, max_tokens_limit=40,
                                                                      max_client_requests=16))
    with BackgroundServer(create_app(svc)) as srv:
        srv.service = svc
        yield srv


def client(srv, key=KEY, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def request(srv, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"} if data is not None else {}
    conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), payload


def alone(model, tok, prompt_ids, **params):
    """What the engine alone generates for one prompt: the reference the server's answer must equal."""
    gen = Engine(model, tok).generate([prompt_ids], **params)
    for _ in gen:
        pass
    return gen.texts[0], gen.ids[0], gen.finish_reasons[0]


def metric(srv, name: str) -> float:
    text = request(srv, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# --- the openai client ------------------------------------------------------------------------------------------

def test_chat_completion_is_the_engines_reply_with_usage(chat):
    out = client(chat).chat.completions.create(model="whatever", messages=HELLO, max_tokens=12, seed=3)
    prompt = render_for_completion(HELLO, CHAT_TOK)
    text, ids, reason = alone(chat.service.model, CHAT_TOK, prompt, max_new_tokens=12, temperature=1.0, top_k=None,
                              seed=3, stop_ids=tuple(stop_ids(CHAT_TOK)))
    assert out.object == "chat.completion" and out.model == "tiny-chat" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == text
    assert out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt), len(ids), len(prompt) + len(ids))


def test_chat_stream_with_usage_equals_the_whole_answer(chat):
    c = client(chat)
    chunks = list(c.chat.completions.create(messages=HELLO, model="m", max_tokens=20, seed=5, stream=True,
                                            stream_options={"include_usage": True}))
    whole = c.chat.completions.create(messages=HELLO, model="m", max_tokens=20, seed=5)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert sum(1 for d in deltas if d) > 1  # token by token, not one blob
    assert "".join(deltas) == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions_string_list_and_stream_on_a_base_model(base):
    c = client(base, key="unused")
    model = base.service.model
    ref = [alone(model, BASE_TOK, BASE_TOK.encode(p), max_new_tokens=9, temperature=0.0, top_k=None)
           for p in ("The quick brown fox", "Hello")]
    one = c.completions.create(model="m", prompt="The quick brown fox", max_tokens=9, temperature=0)
    assert one.object == "text_completion" and one.choices[0].text == ref[0][0]
    assert one.usage.completion_tokens == len(ref[0][1]) and one.usage.prompt_tokens == 4
    two = c.completions.create(model="m", prompt=["The quick brown fox", "Hello"], max_tokens=9, temperature=0)
    assert [ch.text for ch in sorted(two.choices, key=lambda ch: ch.index)] == [r[0] for r in ref]
    assert two.usage.completion_tokens == sum(len(r[1]) for r in ref)
    ids = c.completions.create(model="m", prompt=BASE_TOK.encode("Hello"), max_tokens=9, temperature=0)
    assert ids.choices[0].text == ref[1][0]
    events = list(c.completions.create(model="m", prompt="Hello", max_tokens=9, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == ref[1][0]
    assert events[-1].usage.completion_tokens == len(ref[1][1])
    short = c.completions.create(model="m", prompt="The quick brown fox", temperature=0,
                                 extra_body={"max_completion_tokens": 3})  # the newer name of max_tokens
    assert short.choices[0].text == alone(model, BASE_TOK, BASE_TOK.encode("The quick brown fox"), max_new_tokens=3,
                                          temperature=0.0, top_k=None)[0]


def test_stop_strings_cut_the_reply(base):
    c = client(base, key="unused")
    full = c.completions.create(model="m", prompt="Once upon a time", max_tokens=30, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(1, len(full) - 2) if full[i:i + 2].strip())
    out = c.completions.create(model="m", prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_a_tiny_top_p_is_greedy_and_harms_no_one(base):
    """top_p and temperature of 5e-324 round to 0 in float32: still greedy, not a failed step (found by the fuzz)."""
    c = client(base, key="unused")
    greedy = c.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0).choices[0].text
    assert c.completions.create(model="m", prompt="Hello", max_tokens=6, top_p=5e-324).choices[0].text == greedy
    assert c.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=5e-324).choices[0].text == greedy


def test_bad_requests_are_bad_request_errors(chat, base):
    c = client(chat)
    for kwargs, words in (
            ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
            ({"messages": HELLO, "max_tokens": 49}, "over this server's limit of 48"),
            ({"messages": HELLO, "temperature": 5}, "temperature"),
            ({"messages": HELLO, "n": 2}, "only n=1"),
            ({"messages": [{"role": "user", "content": "word " * 200}]}, "context window")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="m", **kwargs)
        assert e.value.status_code == 400 and words in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError, match="base model.*/v1/completions.*gptrain sft"):
        client(base, key="unused").chat.completions.create(model="m", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context window of 64"):
        client(base, key="unused").completions.create(model="m", prompt="word " * 60, max_tokens=30)


def test_a_chat_that_leaves_less_than_the_default_reply_gets_what_the_window_leaves(chat):
    """Without max_tokens a chat gets what the window leaves, as a text completion does; with it, a prompt that
    leaves too little says how many tokens can be asked for; one that cannot fit at all says how long it may be."""
    c, content = client(chat), "word " * 36
    needed = len(CHAT_TOK.encode(content)) + 4  # <|endoftext|>, <|user|> ... <|end|>, <|assistant|>
    assert 32 < needed < 63  # more than the window (64) less the default reply (32) leaves
    out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], temperature=0)
    assert out.usage.prompt_tokens == needed and 0 < out.usage.completion_tokens <= 64 - needed
    with pytest.raises(openai.BadRequestError, match=f"ask for at most {64 - needed} tokens") as e:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=40)
    assert e.value.code == "context_length_exceeded" and "system prompt" not in e.value.message
    with pytest.raises(openai.BadRequestError, match="this server takes at most 63 .*or the system prompt"):
        c.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "word " * 200}])


def test_missing_or_wrong_key_is_an_authentication_error(chat):
    for key, headers in (("wrong", None), (KEY, {"Authorization": openai.Omit()})):  # a wrong key, no key
        with pytest.raises(openai.AuthenticationError) as e:
            client(chat, key=key).chat.completions.create(model="m", messages=HELLO, max_tokens=2,
                                                          extra_headers=headers)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    status, headers, _ = request(chat, "POST", "/v1/chat/completions", {"messages": HELLO}, headers={"Authorization": ""})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert [m.id for m in client(chat).models.list()] == ["tiny-chat"]
    assert request(chat, "GET", "/health")[0] == 200  # /health and the page need no key


def test_full_queue_is_429_with_retry_after_then_all_complete(base):
    c = client(base, key="unused")
    streams = []
    GATE.clear()  # the scheduler stops inside its next step: nothing finishes, nothing is admitted
    try:
        for _ in range(10):
            try:
                streams.append(c.completions.create(model="m", prompt="Hello", max_tokens=8, stream=True))
            except openai.RateLimitError as e:
                full = e
                break
        else:
            pytest.fail("ten streams were accepted by a server with max_batch=4, max_queue=2")
    finally:
        GATE.set()
    assert 3 <= len(streams) <= 6 and full.status_code == 429
    assert int(full.response.headers["retry-after"]) >= 1 and "retry" in full.message
    for s in streams:  # every accepted request completes
        assert [e.choices[0].finish_reason for e in s if e.choices and e.choices[0].finish_reason] == ["length"]


def test_a_stopping_server_is_503_with_retry_after(chat):
    chat.service.accepting = False  # what the app's shutdown sets before the scheduler closes
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client(chat).chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    finally:
        chat.service.accepting = True
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"


# --- batching over HTTP -----------------------------------------------------------------------------------------

def test_concurrent_greedy_requests_equal_each_alone(base):
    prompts = ["Hello", "The quick brown fox jumps over", "1, 2, 3, 4,", "In the beginning God created the heaven"]
    lengths = [17, 5, 11, 8]
    c = client(base, key="unused")
    one = [c.completions.create(model="m", prompt=p, max_tokens=n, temperature=0).choices[0].text
           for p, n in zip(prompts, lengths)]
    batched_steps = metric(base, "gptrain_step_batch_size_count") - metric(base, 'gptrain_step_batch_size_bucket{le="1.0"}')
    results, barrier = [None] * 4, threading.Barrier(4)

    def run(i):
        barrier.wait()
        results[i] = c.completions.create(model="m", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text

    GATE.clear()  # hold the scheduler so that all four are queued together
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # generous: a busy machine must not fail it
    while base.service.scheduler.stats()["queue_depth"] + base.service.scheduler.stats()["running"] < 4 \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    GATE.set()
    for t in threads:
        t.join(30)
    assert results == one
    assert metric(base, "gptrain_step_batch_size_count") - metric(
        base, 'gptrain_step_batch_size_bucket{le="1.0"}') > batched_steps  # some steps really ran several rows


@pytest.mark.usefixtures("one_thread")  # the pools' threads set torch's thread count: restored afterwards
def test_two_pools_give_each_concurrent_request_what_it_gets_alone():
    svc = Service(tiny(BASE_TOK.n_vocab), "tiny-base", ServeConfig(max_batch=4, pools=2, max_tokens_limit=40,
                                                                      max_client_requests=16))
    with BackgroundServer(create_app(svc)) as srv:
        c = client(srv, key="unused")
        prompts = ["Hello", "The quick brown fox jumps over", "1, 2, 3, 4,", "In the beginning God created the heaven"]
        kw = [dict(max_tokens=n, temperature=t, seed=7) for n, t in ((17, 0), (5, 0.9), (11, 0), (8, 1.3))]
        one = [c.completions.create(model="m", prompt=p, **k).choices[0].text for p, k in zip(prompts, kw)]
        results, barrier = [None] * 4, threading.Barrier(4)

        def run(i):
            barrier.wait()
            results[i] = c.completions.create(model="m", prompt=prompts[i], **kw[i]).choices[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == one
        status, _, body = request(srv, "GET", "/health")
        queue = json.loads(body)["queue"]
        assert status == 200 and queue["pools"] == 2 and queue["threads"] == [1, 1]
    with pytest.raises(GptrainError, match="--compile runs one compiled decode step: use --pools 1, not 2"):
        Service(tiny(BASE_TOK.n_vocab), "tiny-base", ServeConfig(compile=True, pools=2))


# --- the other routes -------------------------------------------------------------------------------------------

def test_health_models_metrics_docs_and_page(chat):
    status, headers, body = request(chat, "GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["model"] == "tiny-chat" and health["kind"] == "chat" and health["auth"] is True
    assert health["limits"] == {"context_window": 64, "max_tokens": 48, "default_max_tokens": 16,
                                "max_prompt_tokens": 63, "max_request_bytes": 20_000, "max_batch": 4, "max_queue": 2,
                                "max_messages": 1024, "max_prompts_per_request": 16, "max_client_requests": 4}
    assert health["queue"]["free_slots"] == 4 and health["dtype"] == "float32"
    before = metric(chat, "gptrain_completion_tokens_total")
    out = client(chat).chat.completions.create(model="m", messages=HELLO, max_tokens=6, seed=1)
    text = request(chat, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})[2].decode()
    for name in ("gptrain_http_requests_total", "gptrain_prompt_tokens_total", "gptrain_queue_depth",
                 "gptrain_running_requests", "gptrain_time_to_first_token_seconds_bucket",
                 "gptrain_step_seconds_bucket", "gptrain_step_batch_size_bucket"):
        assert name in text, name
    assert metric(chat, "gptrain_completion_tokens_total") == before + out.usage.completion_tokens
    assert 'gptrain_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert request(chat, "GET", "/docs")[0] == 200
    spec = json.loads(request(chat, "GET", "/openapi.json")[2])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])
    status, headers, page = request(chat, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/health" in page


# --- transport faults (issue 15 item 4) -------------------------------------------------------------------------

def test_malformed_nested_huge_and_wrong_type_bodies_are_4xx(chat):
    path = "/v1/chat/completions"
    for raw, status, words in (
            (b'{"messages": [', 400, "not valid JSON"), (b"\xff\xfe", 400, "not valid JSON"),
            (b"[" * 100_00 + b"]" * 100_00, 400, "nested more than 64 levels"),
            (b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", 400, "nested more than 64 levels"),
            (b'{"messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
            (json.dumps({"messages": HELLO, "max_tokens": 10 ** 300}).encode(), 400, "max_tokens"),
            (json.dumps({"messages": HELLO, "temperature": 10 ** 300}).encode(), 400, "temperature"),
            (b"[1, 2]", 400, "must be a JSON object"), (b'{"messages": HELLO', 400, "not valid JSON")):
        got, _, body = request(chat, "POST", path, raw=raw)
        assert got == status and words in json.loads(body)["error"]["message"], (raw[:40], body)
    got, _, body = request(chat, "POST", path, raw=b"{}", headers={"Content-Type": "text/plain"})
    assert got == 415 and "application/json" in json.loads(body)["error"]["message"]
    assert request(chat, "GET", "/nope")[0] == 404 and request(chat, "DELETE", path)[0] == 405
    status, _, body = request(chat, "GET", "/health", headers={"Host": "evil.example:8000"})  # DNS rebinding
    assert status == 403 and "not this loopback server" in json.loads(body)["error"]["message"]


def test_oversize_body_sent_whole_gets_the_413(chat):
    import httpx
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    r = httpx.post(chat.url + "/v1/chat/completions", content=big, timeout=30,
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "over the limit of 20000 bytes" in r.json()["error"]["message"]


def raw_socket(srv):
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def read_response(s) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    return data


def test_a_body_cut_short_is_408_and_a_slow_header_is_answered(chat):
    body = json.dumps({"messages": HELLO, "max_tokens": 3}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{chat.port}\r\nContent-Type: application/json"
            f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with raw_socket(chat) as s:  # the body stops half-way: after request_timeout (1 s), a 408, then close
        s.sendall(head + body[:10])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s (10 of" in reply
    with raw_socket(chat) as s:  # headers trickle in: answered normally (not 403, not 400)
        for i in range(0, len(head), 16):
            s.sendall(head[i:i + 16])
            time.sleep(0.01)
        s.sendall(body)
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_keep_alive_serves_several_requests_on_one_connection(chat):
    conn = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=10)
    conn.request("GET", "/health")
    r1 = conn.getresponse()
    r1.read()
    sock = conn.sock
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": HELLO, "max_tokens": 2}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r2 = conn.getresponse()
    r2.read()
    assert (r1.status, r2.status, r1.version) == (200, 200, 11) and conn.sock is sock
    conn.close()


def test_a_client_that_disconnects_cancels_its_row(chat):
    cancelled = metric(chat, 'gptrain_generations_total{finish_reason="cancelled"}')
    for stream in (True, False):
        data = json.dumps({"messages": HELLO, "max_tokens": 40, "stream": stream}).encode()
        GATE.clear()
        with raw_socket(chat) as s:
            s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
            deadline = time.monotonic() + 60  # generous: a busy machine must not fail it
            while chat.service.scheduler.stats()["running"] + chat.service.scheduler.stats()["queue_depth"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        GATE.set()  # the client is gone; the row must leave the batch at the next step
        deadline = time.monotonic() + 60  # generous: a busy machine must not fail it
        while chat.service.scheduler.stats()["running"] or chat.service.scheduler.stats()["queue_depth"]:
            assert time.monotonic() < deadline, chat.service.scheduler.stats()
            time.sleep(0.01)
    assert metric(chat, 'gptrain_generations_total{finish_reason="cancelled"}') == cancelled + 2
    assert chat.service.scheduler.stats()["free_slots"] == 4


def test_fault_run_on_the_real_command(tmp_path):
    """The fault mix (benchmarks/serve_faults.py) against `gptrain serve` in its own process: no 500, the pool
    empty after, every accepted generation ended, resident memory within 20%, no traceback in its log."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_faults import SERVER_FLAGS, run
    from serve_spawn import get_json, random_model, spawned_server
    model = random_model(tmp_path / "model", block_size=64, n_layer=2, n_head=2, n_embd=32)
    with spawned_server(model, tmp_path / "serve.log", *SERVER_FLAGS, "--api-key", KEY, "--max-batch", "4", "--max-queue", "8",
                        "--max-tokens-limit", "32", "--max-request-bytes", "20000", "--request-timeout", "1",
                        "--dtype", "float32", "--max-client-requests", "12", threads=1) as srv:
        # all 8 clients share one address: a client limit of 12 (the batch and queue together) takes no request away
        res = run(srv.url, KEY, requests=80, clients=8, pid=srv.pid, log=srv.log)
        health = get_json(srv.url, "/health")
    assert res["problems"] == [], res
    assert {k for k, _ in res["counts"]} >= {"chat", "cut_stream", "long_cut_stream", "oversize", "wrong_key",
                                            "over_limit"}
    answered = sum(n for (kind, status), n in res["counts"].items()
                   if status in (200, "cut") and kind in ("chat", "completion", "stream", "cut_stream", "long_cut_stream",
                                                         "slow_header", "many_messages"))
    assert res["accepted"] == answered + 3  # every generation answered was counted once (3: the warm-up)
    assert answered > 20 and health["queue"]["running"] == 0 and health["queue"]["threads"] == [1]
    assert ("gptrain serve: model (chat model) on cpu, float32, context 64 tokens, batch 4 in 1 pool(s) of 1 "
            "thread(s)") in srv.log_text()


def test_a_forced_quit_answers_every_request_and_logs_no_traceback(tmp_path):
    """Ctrl-C twice (uvicorn's force quit) while requests run: each stream ends with the stopping server's error
    event in a complete response, a request waiting for its whole answer gets 503, and the log has no traceback."""
    import os
    import signal
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_spawn import random_model, spawned_server
    model = random_model(tmp_path / "model", block_size=256, n_layer=4, n_head=4, n_embd=128)  # 255 tokens: ~2 s
    with spawned_server(model, tmp_path / "serve.log", "--dtype", "float32", threads=1) as srv:
        port, ends, started = int(srv.url.rsplit(":", 1)[1]), [], threading.Barrier(4, timeout=60)

        def stream():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"prompt": "hi", "max_tokens": 255, "stream": True, "ignore_eos": True}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp, last = conn.getresponse(), b""
            resp.readline()
            started.wait()
            while line := resp.readline():  # http.client raises on a response cut short
                last = line.strip() or last
            ends.append(last if b'"error"' not in last else json.loads(last.removeprefix(b"data: "))["error"]["code"])

        def whole():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"prompt": "hi", "max_tokens": 255, "ignore_eos": True}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            started.wait()
            resp = conn.getresponse()
            ends.append((resp.status, json.loads(resp.read())["error"]["type"]))

        clients = [threading.Thread(target=stream) for _ in range(2)] + [threading.Thread(target=whole)]
        for t in clients:
            t.start()
        started.wait()
        os.killpg(srv.pid, signal.SIGINT)
        time.sleep(0.15)
        os.killpg(srv.pid, signal.SIGINT)
        for t in clients:
            t.join(60)
        assert sorted(ends, key=str) == [(503, "server_error"), "cancelled", "cancelled"]
        deadline = time.monotonic() + 30
        while "gptrain: interrupted" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_text()[-2000:]
            time.sleep(0.1)
    assert "Traceback" not in srv.log_text() and "Exception in ASGI" not in srv.log_text(), srv.log_text()[-3000:]


# --- the command ------------------------------------------------------------------------------------------------

def test_serve_refuses_a_network_address_without_a_key(monkeypatch, capsys, tmp_path):
    from gptrain.cli import main
    monkeypatch.delenv("GPTRAIN_API_KEY", raising=False)
    assert main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--api-key" in err and "--insecure-no-auth" in err
    from gptrain.serve.cli import add_arguments, resolve
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("GPTRAIN_API_KEY", "from-the-environment")
    assert resolve(parser.parse_args(["--model", "m", "--host", "0.0.0.0"])).api_key == "from-the-environment"
    monkeypatch.delenv("GPTRAIN_API_KEY")
    assert resolve(parser.parse_args(["--model", "m", "--host", "0.0.0.0", "--insecure-no-auth"])).api_key is None


def test_serve_without_the_extra_names_it(monkeypatch, capsys, tmp_path):
    from gptrain.cli import main
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'gptrain[serve]'" in err


def test_a_port_in_use_is_one_line(chat):
    from gptrain.serve.cli import listen
    with pytest.raises(GptrainError, match=f"cannot listen on 127.0.0.1:{chat.port}.*--port"):
        listen("127.0.0.1", chat.port)


def test_native_bf16_and_the_default_dtype(tmp_path, monkeypatch):
    from gptrain import devices
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert devices.native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not devices.native_bf16(info) and not devices.native_bf16(tmp_path / "missing")
    assert devices.onednn_lm_head(info) and devices.cpuinfo_field("vendor_id", info) == ""  # unknown: as on AMD
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n")
    assert devices.cpuinfo_field("model name", info) == "Intel(R) Xeon(R)" and not devices.onednn_lm_head(info)
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    assert devices.onednn_lm_head(info) and devices.onednn_lm_head(tmp_path / "missing")
    monkeypatch.setattr(devices, "native_bf16", lambda: False)
    assert devices.inference_dtype("cpu") == torch.float32
    assert devices.inference_dtype("cpu", "bfloat16") == torch.bfloat16
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    assert devices.inference_dtype("cpu") == torch.bfloat16 and devices.inference_dtype("cpu", "float32") == torch.float32


def test_no_traceback_or_error_in_the_log(log):  # last: covers every test above
    bad = [r for r in log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [(r.name, r.getMessage()) for r in bad]
