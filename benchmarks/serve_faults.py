"""A bounded fault run against a gptrain server on loopback: many clients at once mixing normal requests with
streams cut off mid-way (some after a prompt near the context window), malformed and deeply nested JSON, huge
integers, oversize bodies (sent whole), bodies cut short, slow headers, wrong keys, wrong content types, over-limit
max_tokens, connections that send nothing or headers a byte at a time (closed by the server's timeouts),
4,000-message chats, 72-prompt completions and fields the server cannot honour (tools, response_format, ...).

Checked afterwards: every answer has the status its kind must get (never a 500), the server still answers, every
generation it accepted ended (completed or cancelled: `/metrics`), the batch's slots are all free again
(`/health`, from Scheduler.stats()), resident memory is within 20% of what it was after a warm-up, and (when this
script started the server) its log holds no traceback.

    python benchmarks/serve_faults.py                      # starts gptrain serve on a small random chat model
    python benchmarks/serve_faults.py http://127.0.0.1:8000 --api-key KEY --pid PID   # a running server
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_spawn import get_json, random_model, rss_bytes, spawned_server  # noqa: E402

# kind -> statuses it may get ("cut": the client closed the connection itself; 429: the queue was full)
EXPECTED = {
    "chat": {200, 429}, "completion": {200, 429}, "stream": {200, 429}, "cut_stream": {"cut", 429},
    "long_cut_stream": {"cut", 429},
    "malformed": {400}, "nested": {400}, "huge_int": {400}, "oversize": {413}, "truncated": {408},
    "abandoned_body": {"cut"}, "slow_header": {200, 429}, "wrong_key": {401}, "no_key": {401},
    "wrong_type": {415}, "over_limit": {400}, "bad_field": {400}, "idle": {"closed"}, "trickle_header": {"closed"},
    "many_messages": {200, 400, 429}, "many_prompts": {400}, "refused_field": {400},
}
WEIGHTS = {"chat": 6, "completion": 5, "stream": 5, "cut_stream": 4, "long_cut_stream": 2, "malformed": 2, "nested": 1,
           "huge_int": 1, "oversize": 2, "truncated": 1, "abandoned_body": 1, "slow_header": 1, "wrong_key": 2, "no_key": 1,
           "wrong_type": 1, "over_limit": 2, "bad_field": 1, "idle": 1, "trickle_header": 1, "many_messages": 1,
           "many_prompts": 1, "refused_field": 1}
# short connection timeouts, so that the idle and trickling connections end within the run
SERVER_FLAGS = ("--header-timeout", "1", "--keep-alive-timeout", "1")
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time, in a land far away,", "1, 2, 3,", "Dear Sir,"]


class Client:
    """One connection's worth of raw HTTP/1.1, so that bodies can be cut, headers slowed, streams abandoned."""

    def __init__(self, url: str, key: str | None, limits: dict):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.key, self.limits = host, int(port), key, limits

    def _headers(self, body: bytes, key: str | None, ctype: str = "application/json") -> dict:
        h = {"Content-Type": ctype, "Content-Length": str(len(body))}
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def post(self, path: str, body: bytes, key: str | None = "", ctype: str = "application/json"):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", path, body=body, headers=self._headers(body, self.key if key == "" else key, ctype))
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, data
        finally:
            conn.close()

    def raw(self, head: bytes, body: bytes, *, slow: bool = False, close_after: int | None = None,
            read: bool = True):
        """Send a request by hand; `close_after` bytes of the body then close (cut short) or, with read, wait."""
        s = socket.create_connection((self.host, self.port), timeout=60)
        try:
            if slow:
                for i in range(0, len(head), max(1, len(head) // 4)):
                    s.sendall(head[i:i + max(1, len(head) // 4)])
                    time.sleep(0.05)
            else:
                s.sendall(head)
            s.sendall(body if close_after is None else body[:close_after])
            if not read:
                return "cut"
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return "closed"
                data += chunk
            return int(data.split(b" ", 2)[1])
        finally:
            s.close()

    def head(self, path: str, body: bytes, declared: int | None = None) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                 f"Content-Length: {len(body) if declared is None else declared}"]
        if self.key:
            lines.append(f"Authorization: Bearer {self.key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def stream(self, body: dict, cut_after: int | None):
        """A streamed completion read to [DONE], or closed after `cut_after` events."""
        data = json.dumps({**body, "stream": True}).encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", body=data, headers=self._headers(data, self.key))
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                return resp.status
            events = 0
            while True:
                line = resp.readline()
                if not line:
                    return "ended without [DONE]"
                if line.startswith(b"data: "):
                    if line.strip() == b"data: [DONE]":
                        return 200
                    events += 1
                    if cut_after is not None and events >= cut_after:
                        conn.sock.close()  # the client goes away mid-stream
                        return "cut"
        finally:
            conn.close()

    def one(self, kind: str, rng: random.Random):
        lim = self.limits
        n = rng.randint(1, min(8, lim["max_tokens"]))
        completion = {"prompt": rng.choice(PROMPTS), "max_tokens": n, "temperature": 1.0, "seed": rng.randrange(99)}
        if kind == "chat":
            body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": n}
            return self.post("/v1/chat/completions", json.dumps(body).encode())[0]
        if kind == "completion":
            return self.post("/v1/completions", json.dumps(completion).encode())[0]
        if kind == "stream":
            return self.stream({**completion, "max_tokens": min(lim["max_tokens"], 24)}, None)
        if kind == "cut_stream":
            return self.stream({**completion, "max_tokens": min(lim["max_tokens"], 24)}, rng.randint(1, 3))
        if kind == "long_cut_stream":  # a prompt near the context window (the cache grows for it), then a hang-up
            new = min(lim["max_tokens"], 24)
            long = "x" + " x" * (min(lim["max_prompt_tokens"], lim["context_window"] - new) - 2)
            return self.stream({**completion, "prompt": long, "max_tokens": new}, rng.randint(1, 3))
        if kind == "malformed":
            return self.post("/v1/completions", rng.choice([b'{"prompt": "x",', b"{'prompt': 1}", b"\xff\xfe",
                                                            b"", b"nul"]))[0]
        if kind == "nested":
            depth = rng.choice([100, 5000, lim["max_request_bytes"] // 2 - 20])  # the last one just fits the limit
            return self.post("/v1/completions", b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")[0]
        if kind == "huge_int":
            return self.post("/v1/completions", rng.choice([
                b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
                b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
                b'{"prompt": "x", "seed": 1' + b"0" * 30 + b"}"]))[0]
        if kind == "oversize":
            body = json.dumps({"prompt": "x" * (lim["max_request_bytes"] + rng.randint(1, 100_000))}).encode()
            return self.post("/v1/completions", body)[0]
        if kind == "truncated":  # Content-Length promises more than arrives: 408 after the server's timeout
            body = json.dumps(completion).encode()
            return self.raw(self.head("/v1/completions", body, declared=len(body) + 50), body)
        if kind == "abandoned_body":  # half a body, then the client hangs up
            body = json.dumps(completion).encode()
            return self.raw(self.head("/v1/completions", body), body, close_after=len(body) // 2, read=False)
        if kind == "slow_header":
            body = json.dumps(completion).encode()
            return self.raw(self.head("/v1/completions", body), body, slow=True)
        if kind == "wrong_key":
            return self.post("/v1/completions", json.dumps(completion).encode(), key="not-the-key")[0]
        if kind == "no_key":
            return self.post("/v1/completions", json.dumps(completion).encode(), key=None)[0]
        if kind == "wrong_type":
            return self.post("/v1/completions", json.dumps(completion).encode(), ctype="text/plain")[0]
        if kind == "over_limit":
            return self.post("/v1/completions", json.dumps({**completion, "max_tokens": lim["max_tokens"] + 1}).encode())[0]
        if kind == "idle":  # connects and sends nothing: closed after --keep-alive-timeout
            with socket.create_connection((self.host, self.port), timeout=60) as s:
                return "closed" if s.recv(1024) == b"" else "answered"
        if kind == "trickle_header":  # headers a byte at a time: closed after --header-timeout
            head = self.head("/v1/completions", json.dumps(completion).encode()) + b"X-Pad: " + b"x" * 400
            with socket.create_connection((self.host, self.port), timeout=60) as s:
                try:
                    for i in range(len(head)):
                        s.sendall(head[i:i + 1])
                        time.sleep(0.25)
                except OSError:
                    return "closed"
                return "sent whole"
        if kind == "many_messages":  # 4,000 empty messages (116 KB; fewer under a smaller --max-request-bytes):
            count = min(4000, lim["max_request_bytes"] // 40)  # refused by --max-messages, or answered
            body = {"messages": [{"role": "user", "content": ""}] * count, "max_tokens": n}
            return self.post("/v1/chat/completions", json.dumps(body).encode())[0]
        if kind == "many_prompts":  # 72 prompts in 50 bytes
            return self.post("/v1/completions", json.dumps({**completion, "prompt": ["x"] * 72}).encode())[0]
        if kind == "refused_field":
            bad = rng.choice([{"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "auto"},
                              {"response_format": {"type": "json_object"}}, {"top_logprobs": 3},
                              {"logit_bias": {"1": 5}}])
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, **bad}
            return self.post("/v1/chat/completions", json.dumps(body).encode())[0]
        if kind == "bad_field":
            bad = rng.choice([{"temperature": "hot"}, {"top_p": 0}, {"stream": "yes"}, {"n": 3}, {"prompt": 5},
                              {"stop": ["a"] * 5}, {"max_tokens": -1}])
            return self.post("/v1/completions", json.dumps({**completion, **bad}).encode())[0]
        raise ValueError(kind)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def run(url: str, key: str | None, *, requests: int = 300, clients: int = 16, seed: int = 0,
        pid: int | None = None, log=None, wait_idle: float = 30.0) -> dict:
    """Run the mix; returns counts per (kind, status), the problems found (empty: passed) and the figures."""
    health = get_json(url, "/health")
    limits = health["limits"]
    rng = random.Random(seed)
    kinds = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=requests)
    if key is None:
        kinds = [k for k in kinds if k not in ("wrong_key", "no_key")]
    warm = Client(url, key, limits)
    for k in ("chat" if health["kind"] == "chat" else "completion", "completion", "stream"):
        warm.one(k, rng)
    rss_before = rss_bytes(pid) if pid else None
    counts, problems, lock = collections.Counter(), [], threading.Lock()
    todo = list(enumerate(kinds))

    def worker(w: int):
        c, r = Client(url, key, limits), random.Random(seed * 1000 + w)
        while True:
            with lock:
                if not todo:
                    return
                i, kind = todo.pop()
            if kind == "chat" and health["kind"] != "chat":
                kind = "completion"
            try:
                status = c.one(kind, r)
            except OSError as e:  # a server that drops a connection it should have answered
                status = f"{type(e).__name__}"
            with lock:
                counts[(kind, status)] += 1
                if status not in EXPECTED[kind]:
                    problems.append(f"request {i} ({kind}): got {status}, expected one of {sorted(map(str, EXPECTED[kind]))}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0

    stats = get_json(url, "/health")["queue"]  # the server is up; wait for cancelled rows to leave the batch
    deadline = time.monotonic() + wait_idle
    while (stats["running"] or stats["queue_depth"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = get_json(url, "/health")["queue"]
    if stats["running"] or stats["queue_depth"] or stats["free_slots"] != stats["max_batch"]:
        problems.append(f"the batch is not empty after the run: {stats}")
    m = Client(url, key, limits)
    conn = http.client.HTTPConnection(m.host, m.port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    text = conn.getresponse().read().decode()
    conn.close()
    submitted, ended = metric(text, "gptrain_generations_submitted_total"), metric(text, "gptrain_generations_total")
    if submitted != ended:
        problems.append(f"{submitted:.0f} generations accepted but {ended:.0f} ended (completed or cancelled)")
    if 'status="500"' in text:
        problems.append("/metrics counts a 500")
    rss_after = rss_bytes(pid) if pid else None
    if pid and rss_after > 1.2 * rss_before:
        problems.append(f"resident memory grew from {rss_before / 2**20:.0f} MB to {rss_after / 2**20:.0f} MB")
    if log is not None:
        text = Path(log).read_text(errors="replace")
        for bad in ("Traceback", "Exception in ASGI", "Task exception"):
            if bad in text:
                problems.append(f"the server's log has {bad!r}")
    return {"requests": len(kinds), "clients": clients, "seconds": seconds, "counts": counts, "problems": problems,
            "accepted": submitted, "ended": ended, "stats": stats, "rss_before": rss_before, "rss_after": rss_after}


def report(res: dict) -> str:
    rows = collections.defaultdict(collections.Counter)
    for (kind, status), n in res["counts"].items():
        rows[kind][str(status)] += n
    lines = [f"{res['requests']} requests from {res['clients']} clients in {res['seconds']:.1f} s; "
             f"{res['accepted']:.0f} generations accepted, {res['ended']:.0f} ended; batch after: {res['stats']}"]
    if res["rss_before"]:
        lines.append(f"resident memory {res['rss_before'] / 2**20:.0f} MB after warm-up, "
                     f"{res['rss_after'] / 2**20:.0f} MB after the run "
                     f"({100 * (res['rss_after'] / res['rss_before'] - 1):+.1f}%)")
    lines += ["", "| kind | requests | statuses |", "|---|---|---|"]
    for kind in sorted(rows):
        lines.append(f"| {kind} | {sum(rows[kind].values())} | "
                     + ", ".join(f"{s}: {n}" for s, n in sorted(rows[kind].items())) + " |")
    lines.append("")
    lines.append("PASS: no 500, every status as expected" if not res["problems"] else
                 "FAIL:\n  " + "\n  ".join(res["problems"]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("url", nargs="?", help="a running server (default: start gptrain serve on a random model)")
    ap.add_argument("--api-key", default=None,
                    help="the running server's key (without one the key faults are left out)")
    ap.add_argument("--pid", type=int, default=None, help="the running server's pid, for resident memory")
    ap.add_argument("--requests", type=int, default=300, help="requests in the mix")
    ap.add_argument("--clients", type=int, default=16, help="clients sending them at once")
    ap.add_argument("--seed", type=int, default=0, help="draws the mix and each client's choices")
    ap.add_argument("--serve-flags", default="", help="more flags for the server this script starts (e.g. '--pools 2')")
    args = ap.parse_args()
    if args.url:
        res = run(args.url, args.api_key, requests=args.requests, clients=args.clients, seed=args.seed, pid=args.pid)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = random_model(Path(tmp) / "model", block_size=256, n_layer=4, n_head=4, n_embd=128)
            key = "fault-run-key"
            with spawned_server(model, Path(tmp) / "serve.log", *SERVER_FLAGS, "--api-key", key, "--max-batch", "8",
                                "--max-queue", "6", "--max-tokens-limit", "64", "--max-request-bytes", "200000",
                                "--request-timeout", "2", "--dtype", "float32",
                                "--max-client-requests", "64", *args.serve_flags.split()) as srv:  # all clients here share one address
                res = run(srv.url, key, requests=args.requests, clients=args.clients, seed=args.seed, pid=srv.pid,
                          log=srv.log)
    print(report(res))
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
