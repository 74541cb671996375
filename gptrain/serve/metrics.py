"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own so that several servers in one process
(tests, notebooks) do not share counters. Queue depth, running batch and free slots are read from
`Scheduler.stats()` at scrape time; step time and batch size come from the scheduler's `on_step` callback, on its
thread (prometheus_client is thread-safe)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROUTES = ("/", "/health", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/chat/completions",
          "/v1/completions")


class Metrics:
    def __init__(self, stats, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptrain_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gptrain_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("gptrain_completion_tokens", "tokens generated", registry=r)
        self.generations = Counter("gptrain_generations", "generations ended, by finish reason (cancelled: the "
                                   "client went away or the server stopped)", ["finish_reason"], registry=r)
        self.submitted = Counter("gptrain_generations_submitted", "generations accepted by the scheduler",
                                 registry=r)
        self.ttft = Histogram("gptrain_time_to_first_token_seconds", "from acceptance to the first new token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gptrain_generation_seconds", "from acceptance to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("gptrain_step_seconds", "one scheduler step (prefill chunk and/or batched decode)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.step_batch = Histogram("gptrain_step_batch_size", "rows in the batch at each step",
                                    buckets=sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch}), registry=r)
        self.prefill_tokens = Counter("gptrain_prefill_tokens", "prompt tokens prefilled", registry=r)
        self.closed = Counter("gptrain_connections_closed", "connections closed by the server's timeouts, by reason "
                              "(idle: no request within --keep-alive-timeout; header_timeout: headers not complete "
                              "within --header-timeout; a body too slow is a 408 in gptrain_http_requests)",
                              ["reason"], registry=r)
        self.refused = Counter("gptrain_requests_refused", "requests refused (429) by the limit they hit: queue "
                               "(--max-queue) or client (--max-client-requests)", ["limit"], registry=r)
        for name, key, doc in (("gptrain_queue_depth", "queue_depth", "requests waiting for a slot"),
                               ("gptrain_running_requests", "running", "rows in the running batch"),
                               ("gptrain_free_slots", "free_slots", "free rows in the batch"),
                               ("gptrain_max_batch", "max_batch", "rows the batch holds at most")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: stats()[key])

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int) -> None:
        self.step.observe(seconds)
        self.step_batch.observe(batch_size)
        if prefill_tokens:
            self.prefill_tokens.inc(prefill_tokens)

    def accepted(self, prompt_tokens: int) -> None:
        self.submitted.inc()
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, req, reason: str) -> None:
        """One generation ended (`reason` is its finish reason, or 'cancelled' when its client is gone)."""
        self.generations.labels(reason).inc()
        self.completion_tokens.inc(req.completion_tokens)
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.submitted_at)
            self.latency.observe((req.finished_at or req.first_token_at) - req.submitted_at)

    def connection_closed(self, reason: str) -> None:
        self.closed.labels(reason).inc()

    def answered(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
