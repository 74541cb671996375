"""`gptrain serve`: a web chat page and an OpenAI-compatible chat API for a chat model, on loopback by default.

Endpoints: `GET /` (the single-page UI in gptrain/chat/ui/), `GET /health`, `GET /v1/models`, and
`POST /v1/chat/completions` (OpenAI's request and response shapes; `"stream": true` answers with server-sent
events `data: {chunk}` ending in `data: [DONE]`). Extra request fields OpenAI clients send are ignored; `top_k`
and `seed` are honoured.

The standard library's ThreadingHTTPServer is enough here: one model answers one request at a time. Requests
are queued on a lock around the model (at most `--max-queue` waiting; more get 503), so two streams never
interleave, and a client that disconnects frees the model at once. Every bad request gets a 4xx with an
OpenAI-style JSON error (`{"error": {"message", "type", "param"}}`): malformed JSON, unknown roles, a body over
`--max-request-bytes`, `max_tokens` over `--max-tokens-limit`, a last message that cannot fit the context window.
POSTs must be `Content-Type: application/json`, which browsers cannot send cross-origin without a CORS preflight
(never granted here), and on loopback a Host header naming another machine (DNS rebinding) gets 403, so other
web pages cannot drive a local server.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

from gptrain.chat.format import fit_to_context, render_for_completion, stop_ids, validate_messages
from gptrain.config import add_dataclass_args, overrides_from_args
from gptrain.errors import GptrainError
from gptrain.generate import Engine
from gptrain.tokenizer import tokenizer_for_vocab

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default; 0.0.0.0 exposes "
                                                             "the server to the network)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, mps or auto",
                                                  "choices": ("auto", "cpu", "cuda", "mps")})
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted"})
    max_tokens_limit: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none"})
    max_queue: int = field(default=8, metadata={"help": "requests that may wait for the model; more get 503"})


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Request:
    """A validated chat-completion request."""
    messages: list[dict]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return int(value) if integer else float(value)


def parse_request(body: dict, limits: ServeConfig) -> Request:
    """Check an OpenAI chat-completion request body; ApiError(400) names the field and the allowed values."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if "messages" not in body:
        raise ApiError(400, "missing 'messages': a list of {'role', 'content'} objects", "messages")
    try:
        messages = validate_messages(body["messages"], "messages")
    except GptrainError as e:
        raise ApiError(400, str(e), "messages") from None
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {json.dumps(stream)}", "stream")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options = body.get("stream_options") or {}
    return Request(
        messages=messages,
        max_tokens=_number(body, key, limits.default_max_tokens, 1, limits.max_tokens_limit, integer=True),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        top_k=_number(body, "top_k", 0, 0, 1 << 31, integer=True),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        stream=stream, include_usage=bool(isinstance(options, dict) and options.get("include_usage")), stop=stop)


class ChatService:
    """The model behind a lock, the request limits, and generation as a stream of text deltas."""

    def __init__(self, model, name: str, limits: ServeConfig | None = None):
        self.model = model.eval()
        self.name = name
        self.limits = limits or ServeConfig()
        self.context = model.config.block_size
        try:
            self.tok = tokenizer_for_vocab(model.config.vocab_size)
        except GptrainError as e:
            raise GptrainError(f"model {name}: {e}") from None
        if self.tok.name != "gpt2-chat":
            raise GptrainError(f"model {name} has the plain GPT-2 vocabulary ({model.config.vocab_size} tokens) and "
                               "knows no chat format; fine-tune it first: gptrain sft --model SRC --data ... --out RUN")
        self.engine = Engine(self.model, self.tok)
        self.lock = threading.Lock()  # the engine runs one generation at a time
        self.waiting = 0
        self._count = threading.Lock()

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "context_window": self.context,
                "busy": self.lock.locked(), "queued": self.waiting}

    def prompt(self, req: Request) -> list[int]:
        """The completion prompt, oldest turns dropped so that it plus some room for the reply fits the context."""
        room = min(req.max_tokens, self.context // 2)
        try:
            messages = fit_to_context(req.messages, self.context - room, self.tok)
        except GptrainError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        return render_for_completion(messages, self.tok)

    def generate(self, req: Request, prompt: list[int]):
        """Yields (text delta, finish_reason or None, completion tokens so far); the model is held from the first
        yield to the last, so concurrent requests queue here."""
        with self._count:
            if self.waiting >= self.limits.max_queue:
                raise ApiError(503, f"{self.waiting} requests are already waiting for the model; retry later",
                               kind="server_busy")
            self.waiting += 1
        try:
            self.lock.acquire()
        finally:
            with self._count:
                self.waiting -= 1
        try:
            yield from self._generate_locked(req, prompt)
        finally:
            self.lock.release()

    def _generate_locked(self, req: Request, prompt: list[int]):
        gen = self.engine.generate(
            [prompt], max_new_tokens=min(req.max_tokens, self.context - len(prompt)), temperature=req.temperature,
            top_k=req.top_k or None, top_p=req.top_p if req.top_p < 1 else None,
            seed=req.seed if req.seed is not None else secrets.randbits(62), stop=tuple(req.stop),
            stop_ids=tuple(stop_ids(self.tok)))
        for step in gen:
            yield step.text[0], gen.finish_reasons[0], len(gen.ids[0])


class Handler(BaseHTTPRequestHandler):
    service: ChatService  # set on the per-server subclass made in make_server
    server_version = "gptrain"
    timeout = 30  # seconds a client may take to send its request

    # ------------------------------------------------------------ plumbing
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._send_json(e.status, e.body())

    def _foreign_host(self) -> bool:
        """On loopback, a Host header naming another machine means a DNS-rebinding page is calling: refuse it."""
        if not getattr(self.server, "loopback", False):
            return False
        host = self.headers.get("Host", "")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name in LOOPBACK:
            return False
        self._error(ApiError(403, f"Host {host!r} is not this loopback server; use http://127.0.0.1:PORT/",
                             kind="forbidden"))
        return True

    # ------------------------------------------------------------ routes
    def do_GET(self):
        if self._foreign_host():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = (resources.files("gptrain.chat") / "ui" / "index.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif path == "/health":
            self._send_json(200, self.service.health())
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.service.name, "object": "model",
                                                               "owned_by": "gptrain"}]})
        else:
            self._error(ApiError(404, f"no such endpoint: GET {path}", kind="not_found"))

    def do_POST(self):
        if self._foreign_host():
            return
        if self.path.split("?", 1)[0] != "/v1/chat/completions":
            return self._error(ApiError(404, f"no such endpoint: POST {self.path}", kind="not_found"))
        gen = None
        try:
            req = parse_request(self._read_json(), self.service.limits)
            prompt = self.service.prompt(req)
            gen = self.service.generate(req, prompt)
            first = next(gen)  # waits for the model; a full queue raises ApiError(503) before any byte is sent
            if req.stream:
                return self._stream(req, prompt, first, gen)
            parts = []
            for delta, finish, n in itertools.chain([first], gen):
                parts.append(delta)
            self._send_json(200, {**self._head("chat.completion"), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": finish}],
                "usage": _usage(len(prompt), n)})
        except ApiError as e:
            self._error(e)
        except GptrainError as e:
            self._error(ApiError(400, str(e)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as e:  # a bug, not bad input: say so in JSON rather than dropping the connection
            self.log_error("internal error: %r", e)
            self._error(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))
        finally:
            if gen is not None:
                gen.close()  # frees the model at once if the request ended early

    def do_PUT(self):
        self._error(ApiError(405, f"method PUT is not allowed on {self.path}"))

    do_DELETE = do_PATCH = do_PUT

    def _read_json(self):
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "send the request body as JSON with Content-Type: application/json")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > self.service.limits.max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes is over the limit of "
                                f"{self.service.limits.max_request_bytes} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _head(self, obj: str) -> dict:
        if not hasattr(self, "_id"):
            self._id, self._created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        return {"id": self._id, "object": obj, "created": self._created, "model": self.service.name}

    def _stream(self, req: Request, prompt: list[int], first, gen) -> None:
        def chunk(delta: dict, finish=None) -> bytes:
            body = {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(chunk({"role": "assistant", "content": ""}))
            for delta, finish, n in itertools.chain([first], gen):
                if delta:
                    self.wfile.write(chunk({"content": delta}))
                    self.wfile.flush()
                if finish:
                    self.wfile.write(chunk({}, finish))
            if req.include_usage:
                usage = {**self._head("chat.completion.chunk"), "choices": [], "usage": _usage(len(prompt), n)}
                self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: do_POST closes the generation, which frees the model


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.loopback = host in LOOPBACK
    return server


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="chat model: a gptrain SFT run or checkpoint, or a HF directory with the chat vocabulary")
    parser.add_argument("--name", default=None, help="model name reported by the API (default: SRC's last component)")
    add_dataclass_args(parser, ServeConfig)


def main(args) -> int:
    from gptrain.hf import load_model
    from gptrain.train.distributed import choose_device
    cfg = ServeConfig(**overrides_from_args(args, ServeConfig))
    device = choose_device(cfg.device)
    model = load_model(args.model, device=device)
    service = ChatService(model, args.name or Path(args.model).name or args.model, cfg)
    try:
        server = make_server(service, cfg.host, cfg.port)
    except OSError as e:
        raise GptrainError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pick another --port") from None
    host, port = server.server_address[:2]
    if cfg.host not in LOOPBACK:
        print(f"warning: listening on {host}, reachable from other machines; the API has no authentication")
    print(f"gptrain serve: {service.name} on {device}, context {service.context} tokens\n"
          f"  chat UI:  http://{host}:{port}/\n  API:      POST http://{host}:{port}/v1/chat/completions\n"
          "Ctrl-C stops the server.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
