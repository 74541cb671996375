"""The server's options (flags of `gptrain serve`), importable without the `serve` extra."""

from __future__ import annotations

from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ServeConfig:
    host: str = _f("127.0.0.1", "address to bind (loopback by default; another address needs --api-key)")
    port: int = _f(8000, "TCP port (0: any free port)", ge=0, le=65535)
    device: str = _f("auto", "cpu, cuda, mps or auto", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = _f("auto", "weights and compute dtype; auto = bfloat16 on CUDA and on CPUs with native bf16, "
                    "else float32", choices=("auto", "float32", "bfloat16"))
    compile: bool = _f(False, "torch.compile the batched decode step (on CUDA also a CUDA graph), compiled and "
                              "warmed up before /health answers")
    max_batch: int | None = _f(None, "requests decoded together in the running batch (none: as many as a quarter "
                                     "of the memory available holds in KV cache, at most 32)", ge=1)
    threads: int | None = _f(None, "torch threads that decode, split among the pools (none: one per core, as torch "
                                   "counts them; each pool gets at least one); on CPU a pool decodes on one while "
                                   "that is faster (a busy process beside the server); the rest of the server runs "
                                   "torch on one thread",
                             ge=1)
    pools: int = _f(1, "split the batch into this many pools, each decoded by a thread of its own with an equal "
                       "share of --threads (at least one each); on 2 cores one pool is faster (benchmarks/RESULTS.md)",
                    ge=1)
    max_queue: int = _f(64, "requests that may wait for a slot in the batch; more get 429 with Retry-After", ge=0)
    prefill_chunk: int = _f(256, "prompt tokens prefilled per step, so a long prompt does not stall the others",
                            ge=1)
    max_request_bytes: int = _f(1_000_000, "largest request body accepted (413 above)", ge=1)
    max_prompt_tokens: int | None = _f(None, "longest prompt accepted, in tokens (none: the context window)", ge=1)
    max_tokens_limit: int = _f(1024, "largest max_tokens a request may ask for (capped by the context window)", ge=1)
    default_max_tokens: int = _f(256, "max_tokens when a request gives none (at most half the context window)",
                                 ge=1)
    max_messages: int = _f(1024, "messages in one chat request at most (400 above)", ge=1)
    max_prompts_per_request: int = _f(16, "prompts in one /v1/completions request at most (400 above)", ge=1)
    max_client_requests: int | None = _f(None, "requests one client (its API key when the server has several, "
                                               "else its address) may have running or queued; more get 429 "
                                               "(none: max_batch)", ge=1)
    request_timeout: float = _f(30.0, "seconds a client may take to send its request body (408 after)", gt=0)
    header_timeout: float = _f(10.0, "seconds a client may take to send a request's headers, from their first "
                                     "byte (the connection is closed after)", gt=0)
    keep_alive_timeout: float = _f(5.0, "seconds a connection may stay open with no request (new or kept alive) "
                                        "before it is closed", gt=0)
    api_key: str | None = _f(None, "require 'Authorization: Bearer KEY' on every /v1 route and /metrics; several "
                                   "keys separated by commas, one per client (default: $GPTRAIN_API_KEY; none: no "
                                   "key; beyond loopback each key has at least 16 characters)")
    metrics_public: bool = _f(False, "serve /metrics without the key")
    insecure_no_auth: bool = _f(False, "allow a non-loopback --host without --api-key")
    access_log: bool = _f(True, "log one line per request")

    @property
    def keys(self) -> list[str]:
        """The API keys (none: the API is open)."""
        return [k.strip() for k in self.api_key.split(",") if k.strip()] if self.api_key else []

    @property
    def client_limit(self) -> int:
        return self.max_client_requests or self.max_batch
