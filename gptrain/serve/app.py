"""The FastAPI app: OpenAI's routes over a `Service`, streaming as server-sent events, every error as an
OpenAI-style body, and `BackgroundServer` to run it under uvicorn inside this process.

Routes: `GET /` (the chat page, gptrain/chat/ui/index.html), `/health` (model, limits, queue), `/metrics`
(Prometheus text), `/docs` and `/openapi.json`; under `/v1` (which need `Authorization: Bearer KEY` when the
server has a key): `GET /models`, `POST /chat/completions` (chat models), `POST /completions` (any model).

A client that goes away cancels its generation: a task watches the connection's ASGI `receive` for
`http.disconnect` during both streamed and whole answers, and cancels the request's row, which leaves the batch
at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptrain import __version__
from gptrain.serve.config import LOOPBACK
from gptrain.serve.connections import timed_protocol
from gptrain.serve.guard import BodyGuard, CountRequests, ForcedQuit, HostCheck
from gptrain.serve.metrics import CONTENT_TYPE_LATEST
from gptrain.serve.schemas import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    Completion, CompletionChoice, CompletionRequest, Delta, ErrorResponse, Health, ModelCard, ModelList, Usage)
from gptrain.serve.service import ApiError, Service

ERRORS = {code: {"model": ErrorResponse, "description": what} for code, what in (
    (400, "invalid request (OpenAI-style error body)"), (401, "missing or wrong API key"),
    (403, "Host is not this loopback server"), (408, "request body not received in time"),
    (413, "request body too large"), (415, "body is not application/json"),
    (429, "queue full, or this client at --max-client-requests: retry after Retry-After seconds"),
    (503, "server shutting down"))}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {  # one event (OpenAPI < 3.2: schema = each event)
    "data": {"type": "string", "description": "a chunk as JSON (an error object if the generation failed), or "
                                              "[DONE] last"},
    "event": {"type": "string"}}}
SSE = {"content": {"text/event-stream": {"schema": SSE_EVENT}},
       "description": "JSON when stream is false; server-sent events (data: {chunk} ... data: [DONE]) when true"}


def _field_path(loc) -> str:
    """'messages[0].role' from pydantic's loc, leaving out 'body' and union-member tags such as 'list[str]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and "[" not in part and "-" not in part and part not in ("str", "int", "float", "bool"):
            out += ("." if out else "") + part
    return out


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0]
    path = _field_path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if path and sum(1 for e in errors if _field_path(e["loc"]).split("[")[0].split(".")[0] == path) > 1:
        msg = "not one of the accepted forms (" + "; ".join(
            e["msg"] for e in errors[:4] if _field_path(e["loc"]) == path) + ")"
    if first["type"] == "missing":
        msg = "is required"
    if first["type"] in ("model_attributes_type", "dict_type") and not path:
        return ApiError(400, "the request body must be a JSON object")
    shown = json.dumps(first.get("input"), default=repr)  # as the client sent it: JSON, not Python
    got = f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})" if first["type"] not in ("missing",) and path \
        else ""
    top = path.split("[")[0].split(".")[0] or None
    named = path and not msg.startswith(path.split("[")[0])  # "tools is not supported" names its field already
    return ApiError(400, f"{path}: {msg}{got}" if named else f"{msg}{got}" if path else msg, top)


class EventStream(Response):
    """Server-sent events from an async iterator of bytes; its requests are cancelled when the client goes away."""

    def __init__(self, chunks, reqs: list):
        self.status_code, self.background, self.chunks, self.reqs = 200, None, chunks, reqs
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send):
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.reqs))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the connection broke under a server that reports it on send: the generator's finally cancels
        finally:
            watcher.cancel()
            await self.chunks.aclose()


async def _cancel_on_disconnect(receive, reqs) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    for r in reqs:
        r.cancel()


async def _events(service: Service, reqs: list):
    """(choice index, Event) from all requests as they come; each request's end is recorded in the metrics, and
    those left unfinished when the consumer stops (client gone) are cancelled."""
    done = set()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, r):
        async for ev in r.events():
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        while len(done) < len(reqs):
            i, ev = await queue.get()
            if ev.finish_reason is not None:
                done.add(i)
                service.metrics.finished(reqs[i], ev.finish_reason)
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        service.cancel([r for i, r in enumerate(reqs) if i not in done])


def _sse(obj) -> bytes:
    return b"data: " + obj.model_dump_json(exclude_none=True).encode() + b"\n\n"


def _cancelled(reqs) -> ApiError:
    """Why the scheduler cancelled a request whose client is still there: a failed step (a bug: 500) or shutdown."""
    error = next((r.error for r in reqs if getattr(r, "error", None)), None)
    if error:
        return ApiError(500, f"the generation failed: {error}", kind="server_error", code="generation_failed")
    return ApiError(503, "the generation was cancelled: the server is stopping", kind="server_error",
                    code="cancelled", headers={"Retry-After": "5"})


def _stopped(reqs) -> bytes:
    return b"data: " + json.dumps(_cancelled(reqs).body()).encode() + b"\n\n"


def _usage(reqs) -> Usage:
    p, c = sum(r.prompt_tokens for r in reqs), sum(r.completion_tokens for r in reqs)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _head(prefix: str, service: Service) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": service.name}


CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, sent to nobody


async def _collect(service: Service, reqs: list, receive) -> list[tuple[str, str]] | None:
    """(text, finish_reason) per request, awaited whole; a client that goes away cancels them (None)."""
    texts, reasons = [[] for _ in reqs], [None] * len(reqs)
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, reqs))
    try:
        async with contextlib.aclosing(_events(service, reqs)) as events:
            async for i, ev in events:
                texts[i].append(ev.text)
                reasons[i] = ev.finish_reason
    finally:
        gone = watcher.done()  # it saw the client disconnect
        watcher.cancel()
    if gone:
        return None
    if "cancelled" in reasons:
        raise _cancelled(reqs)
    return [("".join(t), r) for t, r in zip(texts, reasons)]


def create_app(service: Service) -> FastAPI:
    cfg = service.cfg

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        except asyncio.CancelledError:  # a forced quit cancels the lifespan too: stop without a traceback
            pass
        finally:
            service.close()

    app = FastAPI(title="gptrain", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="An OpenAI-compatible API for a gptrain model: chat and text completions, "
                              "batched continuously.")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, kind = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, kind = f"method {request.method} is not allowed on {request.url.path}", "invalid_request_error"
        else:
            message, kind = str(exc.detail), "invalid_request_error"
        return await api_error(request, ApiError(exc.status_code, message, kind=kind, headers=exc.headers))

    deps = []
    keys = [k.encode() for k in cfg.keys]
    if keys:
        bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

        async def check_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
            if creds is None:
                raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY' (the server's --api-key)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            given = creds.credentials.encode()
            match = [secrets.compare_digest(given, k) for k in keys]  # every key compared: no timing hint
            if not any(match):
                raise ApiError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            request.state.key = match.index(True)
        deps.append(Depends(check_key))
    v1 = APIRouter(prefix="/v1", dependencies=deps, responses=ERRORS)

    def client_of(request: Request) -> str:
        """Who --max-client-requests counts: the key, when the server has several, else the peer's address."""
        if len(keys) > 1:
            return f"key {request.state.key + 1} of {len(keys)}"
        return request.client.host if request.client else "unknown"

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((resources.files("gptrain.chat") / "ui" / "index.html").read_bytes())

    @app.get("/health", response_model=Health, responses={403: ERRORS[403]})
    async def health():
        return service.health()

    @app.get("/metrics", response_class=Response, dependencies=[] if cfg.metrics_public else deps,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                        401: ERRORS[401]})
    async def metrics():
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=service.name, created=service.created, max_model_len=service.context)])

    @v1.post("/chat/completions", response_model=ChatCompletion, responses={200: SSE})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        reqs = service.submit([await run_in_threadpool(service.chat_job, body)], client_of(request))
        head = _head("chatcmpl", service)
        if body.stream:
            return EventStream(_chat_stream(service, reqs, head, body.include_usage), reqs)
        out = await _collect(service, reqs, request.receive)
        if out is None:
            return Response(status_code=CLIENT_GONE)
        [(text, reason)] = out
        return ChatCompletion(**head, usage=_usage(reqs), choices=[
            ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=reason)])

    @v1.post("/completions", response_model=Completion, responses={200: SSE})
    async def completions(body: CompletionRequest, request: Request):
        reqs = service.submit(await run_in_threadpool(service.completion_jobs, body), client_of(request))
        head = _head("cmpl", service)
        if body.stream:
            return EventStream(_completion_stream(service, reqs, head, body.include_usage), reqs)
        out = await _collect(service, reqs, request.receive)
        if out is None:
            return Response(status_code=CLIENT_GONE)
        return Completion(**head, usage=_usage(reqs), choices=[
            CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason) in enumerate(out)])

    app.include_router(v1)
    # outermost last: a forced quit's answers, then count every answer, then the Host check, then the body checks,
    # then FastAPI
    app.add_middleware(BodyGuard, max_bytes=cfg.max_request_bytes, timeout=cfg.request_timeout)
    if cfg.host in LOOPBACK:
        app.add_middleware(HostCheck, names=LOOPBACK)
    app.add_middleware(CountRequests, metrics=service.metrics)
    app.add_middleware(ForcedQuit, stopping=_cancelled([]).body())
    return app


async def _chat_stream(service, reqs, head, include_usage):
    def chunk(delta: Delta, finish=None):
        return _sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]))

    yield chunk(Delta(role="assistant", content=""))
    async with contextlib.aclosing(_events(service, reqs)) as events:
        async for _, ev in events:
            if ev.text:
                yield chunk(Delta(content=ev.text))
            if ev.finish_reason == "cancelled":
                yield _stopped(reqs)
                return
            if ev.finish_reason:
                yield chunk(Delta(), ev.finish_reason)
    if include_usage:
        yield _sse(ChatCompletionChunk(**head, choices=[], usage=_usage(reqs)))
    yield b"data: [DONE]\n\n"


async def _completion_stream(service, reqs, head, include_usage):
    async with contextlib.aclosing(_events(service, reqs)) as events:
        async for i, ev in events:
            if ev.finish_reason == "cancelled":
                yield _stopped(reqs)
                return
            if ev.text or ev.finish_reason:
                yield _sse(Completion(**head, choices=[CompletionChoice(index=i, text=ev.text,
                                                                        finish_reason=ev.finish_reason)]))
    if include_usage:
        yield _sse(Completion(**head, choices=[], usage=_usage(reqs)))
    yield b"data: [DONE]\n\n"


def uvicorn_config(app, **options):
    """uvicorn's Config for `app` with the server's connection timeouts (gptrain/serve/connections.py)."""
    import uvicorn
    cfg = app.state.service.cfg
    return uvicorn.Config(app, lifespan="on", http=timed_protocol(app.state.service.metrics, cfg.header_timeout),
                          timeout_keep_alive=cfg.keep_alive_timeout, **options)


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread of this process, on `port` (0: a free one); `.url` once started.
    For tests and notebooks; `gptrain serve` runs uvicorn in the foreground."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options):
        import uvicorn
        options = {"log_config": None, "log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 3,
                   **uvicorn_options}  # log_config None: this process's logging is left as it is
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port, **options))
        self.host, self.thread = host, threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
