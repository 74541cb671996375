"""The OpenAI-compatible API, tested with a real HTTP client against a running server on 127.0.0.1."""

import http.client
import json
import threading
import time

import pytest
import torch

from gptrain.chat.format import render_for_completion, stop_ids
from gptrain.chat.server import ChatService, ServeConfig, make_server
from gptrain.errors import GptrainError
from gptrain.generate import complete
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer

TOK = get_tokenizer(chat=True)
HELLO = [{"role": "user", "content": "Hello there"}]


def chat_model(block_size=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def server():
    service = ChatService(chat_model(), "tiny-chat", ServeConfig(max_request_bytes=20_000, max_tokens_limit=100,
                                                                 default_max_tokens=16, max_queue=1))
    srv = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), payload


def post(srv, body, **kw):
    status, ctype, payload = request(srv, "POST", "/v1/chat/completions", body, **kw)
    return status, json.loads(payload)


def stream(srv, body):
    """(events as parsed JSON, raw lines) of a streamed completion, read as they arrive."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events, lines = [], []
    while True:
        line = resp.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(b"data: "):
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    conn.close()
    return events, lines


def solo_reply(model, messages, max_tokens, seed):
    """What the engine alone generates for this request: the reference a served reply must equal."""
    ids = complete(model, [render_for_completion(messages, TOK)], max_new_tokens=max_tokens, temperature=1.0,
                   seed=seed, stop_ids=stop_ids(TOK))[0]
    return TOK.decode(ids)


def test_health_models_and_page(server):
    status, ctype, body = request(server, "GET", "/health")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"status": "ok", "model": "tiny-chat", "context_window": 64, "busy": False, "queued": 0}
    status, _, body = request(server, "GET", "/v1/models")
    assert json.loads(body)["data"][0]["id"] == "tiny-chat"
    status, ctype, body = request(server, "GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"/v1/chat/completions" in body


def test_non_streaming_completion_is_the_engines_reply(server):
    model = server.RequestHandlerClass.service.model
    status, out = post(server, {"model": "x", "messages": HELLO, "max_tokens": 12, "seed": 3, "top_p": 1})
    assert status == 200
    assert out["object"] == "chat.completion" and out["model"] == "tiny-chat" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == solo_reply(model, HELLO, 12, seed=3)
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(render_for_completion(HELLO, TOK))
    assert 1 <= usage["completion_tokens"] <= 12 and usage["total_tokens"] == sum(
        usage[k] for k in ("prompt_tokens", "completion_tokens"))
    # greedy is deterministic without a seed
    a = post(server, {"messages": HELLO, "temperature": 0, "max_tokens": 8})[1]["choices"][0]["message"]["content"]
    b = post(server, {"messages": HELLO, "temperature": 0, "max_tokens": 8})[1]["choices"][0]["message"]["content"]
    assert a == b


def test_streaming_sends_deltas_then_done(server):
    body = {"messages": HELLO, "max_tokens": 20, "seed": 5, "stream_options": {"include_usage": True}}
    events, lines = stream(server, body)
    assert events[-1] == "[DONE]" and all(line.endswith(b"\n") for line in lines)
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for d in deltas if d) > 1  # token by token, not one blob
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1]["usage"]["completion_tokens"] <= 20
    status, out = post(server, {"messages": HELLO, "max_tokens": 20, "seed": 5})
    assert "".join(deltas) == out["choices"][0]["message"]["content"]


def test_stop_strings_cut_the_reply(server):
    model = server.RequestHandlerClass.service.model
    full = solo_reply(model, HELLO, 30, seed=11)
    stop = next((full[i:i + 2] for i in range(1, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]), None)
    if stop is None:
        pytest.skip("the random model produced no usable stop string")
    out = post(server, {"messages": HELLO, "max_tokens": 30, "seed": 11, "stop": stop})[1]
    assert out["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_two_concurrent_streams_are_never_interleaved(server):
    model = server.RequestHandlerClass.service.model
    convs = [HELLO, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]
    results = [None, None]

    def run(i):
        events, _ = stream(server, {"messages": convs[i], "max_tokens": 24, "seed": 100 + i})
        results[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [solo_reply(model, convs[i], 24, seed=100 + i) for i in range(2)]


def test_requests_queue_on_the_model_and_overflow_gets_503(server):
    service = server.RequestHandlerClass.service
    service.lock.acquire()  # the model is busy
    try:
        done = {}
        waiter = threading.Thread(target=lambda: done.update(r=post(server, {"messages": HELLO, "max_tokens": 4})))
        waiter.start()
        for _ in range(200):
            if json.loads(request(server, "GET", "/health")[2])["queued"] == 1:
                break
            time.sleep(0.01)
        health = json.loads(request(server, "GET", "/health")[2])
        assert health["busy"] and health["queued"] == 1
        status, out = post(server, {"messages": HELLO, "max_tokens": 4})  # max_queue=1: no room
        assert status == 503 and "already waiting" in out["error"]["message"]
        assert not done
    finally:
        service.lock.release()
    waiter.join(30)
    assert done["r"][0] == 200


def test_context_window_drops_oldest_turns(server):
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"question number {i} about things"},
                  {"role": "assistant", "content": f"answer number {i}"}]
    status, out = post(server, {"messages": [{"role": "system", "content": "sys"}] + turns + HELLO, "max_tokens": 8})
    assert status == 200 and out["usage"]["prompt_tokens"] <= 64 - 8


@pytest.mark.parametrize("body, status, words", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": "hello"}, 400, "non-empty list"),
    ({"messages": [{"role": "user"}]}, 400, "missing 'content'"),
    ({"prompt": "hi"}, 400, "missing 'messages'"),
    ([1, 2], 400, "JSON object"),
    ({"messages": HELLO, "max_tokens": 101}, 400, "'max_tokens' must be between 1 and 100"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "'max_tokens' must be between"),
    ({"messages": HELLO, "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
    ({"messages": HELLO, "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": HELLO, "temperature": 5}, 400, "'temperature' must be between"),
    ({"messages": HELLO, "top_p": 0}, 400, "'top_p' must be between"),
    ({"messages": HELLO, "n": 2}, 400, "only n=1"),
    ({"messages": HELLO, "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "context window"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, words):
    got, out = post(server, body)
    assert got == status and words in out["error"]["message"], out
    assert out["error"]["type"] in ("invalid_request_error", "context_length_exceeded")


def test_malformed_oversize_and_wrong_type_bodies(server):
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=b"\xff\xfe not utf-8")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}).encode()
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=big)
    assert status == 413 and "over the limit of 20000 bytes" in json.loads(body)["error"]["message"]
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(body)["error"]["message"]
    status, _, body = request(server, "POST", "/v1/completions", body={"prompt": "x"})
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]["message"]
    status, _, body = request(server, "GET", "/nope")
    assert status == 404
    status, _, body = request(server, "DELETE", "/v1/chat/completions")
    assert status == 405
    status, _, body = request(server, "GET", "/health", headers={"Host": "evil.example:8000"})  # DNS rebinding
    assert status == 403 and "not this loopback server" in json.loads(body)["error"]["message"]
    # the server is still healthy after all that
    assert request(server, "GET", "/health")[0] == 200


def test_plain_gpt2_model_is_refused():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(GptrainError, match="gptrain sft"):
        ChatService(model, "plain")
