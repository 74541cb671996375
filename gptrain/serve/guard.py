"""Plain ASGI middleware in front of the app, for what must hold before any route or pydantic sees a request.

- `ForcedQuit` (outermost): a forced quit (a second Ctrl-C) cancels the requests still running; each gets the
  stopping server's answer (503, or in a started stream its error event) instead of a 500 and a traceback.
- `CountRequests`: every answer, whoever produced it, is counted in /metrics by route and status.
- `HostCheck`: on a loopback server, a Host header naming another machine means a DNS-rebinding web page is
  calling: 403. A client that sends no Host (HTTP/1.0 tools) is not a browser and passes.
- `BodyGuard`: a POST body must be `application/json` (browsers cannot send that cross-origin without a CORS
  preflight, never granted here, so other web pages cannot drive the API), is read in full before anything is
  answered (so a client that sends a 2 MB body sees the 413, not a broken pipe), within `timeout` seconds (a body
  cut short gets 408, not "invalid JSON"), and must parse as JSON nested at most `MAX_DEPTH` deep; the app then
  reads the same bytes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

MAX_DEPTH = 64  # OpenAI requests nest 5 deep; deeper JSON is refused before anything recurses over it
BODY_METHODS = ("POST", "PUT", "PATCH")


def header(scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def send_error(send, status: int, message: str, kind: str = "invalid_request_error",
                     headers: dict | None = None, close: bool = False) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class ForcedQuit:
    def __init__(self, app, stopping: dict):
        self.app, self.stopping = app, stopping  # the stopping server's OpenAI error body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = None  # the response's content type, once it has started

        async def watching_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = dict(message.get("headers", ())).get(b"content-type", b"")
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the connection may be gone already
                if started is None:
                    error = self.stopping["error"]
                    await send_error(send, 503, error["message"], error["type"], {"Retry-After": "5"}, close=True)
                else:
                    event = b"data: " + json.dumps(self.stopping).encode() + b"\n\n"
                    await send({"type": "http.response.body", "more_body": False,
                                "body": event if started.startswith(b"text/event-stream") else b""})


class CountRequests:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.answered(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class HostCheck:
    def __init__(self, app, names: tuple[str, ...]):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = header(scope, b"host")
            if host is not None:
                name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
                if name not in self.names:
                    await drain(receive)
                    return await send_error(send, 403, f"Host {host!r} is not this loopback server; use "
                                                       "http://127.0.0.1:PORT/", "forbidden")
        await self.app(scope, receive, send)


async def drain(receive, timeout: float = 5.0) -> None:
    """Read what is left of a request body (and forget it), so that an answer sent now reaches a client that is
    still sending: closing on unread data makes the kernel reset the connection."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            msg = await receive_by(receive, deadline)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                return
    except asyncio.TimeoutError:
        return


async def receive_by(receive, deadline: float):
    """The next ASGI message, or asyncio.TimeoutError once the loop's clock passes `deadline`."""
    return await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))


def too_deep(obj) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((v, depth + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


class BodyGuard:
    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        body, size, too_big = bytearray(), 0, declared is not None and declared > self.max_bytes
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            while True:
                msg = await receive_by(receive, deadline)
                if msg["type"] == "http.disconnect":
                    return  # the client went away before sending its request: nobody to answer
                chunk = msg.get("body", b"")
                size += len(chunk)
                too_big = too_big or size > self.max_bytes
                if not too_big:
                    body += chunk
                if not msg.get("more_body"):
                    break
        except asyncio.TimeoutError:
            got = f"{size} of {declared} bytes" if declared is not None else f"{size} bytes"
            return await send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s "
                                               f"({got} received)", close=True)
        if too_big:
            return await send_error(send, 413, f"request body of {size} bytes is over the limit of "
                                               f"{self.max_bytes} bytes")
        ctype = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return await send_error(send, 415, "send the request body as JSON with Content-Type: application/json")
        try:
            parsed = json.loads(body)
        except RecursionError:
            return await send_error(send, 400, f"the request body is nested more than {MAX_DEPTH} levels deep")
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers of over 4300 digits
            return await send_error(send, 400, f"the request body is not valid JSON: {e}")
        if too_deep(parsed):
            return await send_error(send, 400, f"the request body is nested more than {MAX_DEPTH} levels deep")

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)
