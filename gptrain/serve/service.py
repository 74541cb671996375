"""What the routes ask of the model: requests become prompt ids and `SamplingParams` within the server's limits,
and go to the continuous-batching `Scheduler`. Every refusal is an `ApiError` that the app turns into an
OpenAI-style error body; nothing here cuts a request silently."""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import replace

from gptrain.chat.format import PromptTooLong, fit_to_context, render_for_completion, stop_ids
from gptrain.errors import GptrainError
from gptrain.engine import auto_batch
from gptrain.generate import QueueFull, SamplingParams, Scheduler
from gptrain.packed_linear import pack_linears
from gptrain.serve.config import ServeConfig
from gptrain.serve.metrics import Metrics
from gptrain.serve.schemas import ChatCompletionRequest, CompletionRequest
from gptrain.tokenizer import tokenizer_for_vocab


class ApiError(Exception):
    """A refused request: HTTP status, OpenAI error body, optional headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


GREEDY_BELOW = 1e-4


def too_long(message: str, param: str) -> ApiError:
    return ApiError(400, message, param, code="context_length_exceeded")


class Service:
    """One model behind one Scheduler, with the server's limits. `start()`/`close()` run the scheduler's thread."""

    def __init__(self, model, name: str, cfg: ServeConfig | None = None):
        cfg = cfg or ServeConfig()
        self.model, self.name = model.eval(), name
        pack_linears(model)  # bf16 on CPU: weights reordered once for oneDNN (gptrain/packed_linear.py)
        if cfg.max_batch is None:
            cfg = replace(cfg, max_batch=auto_batch(model.config, next(model.parameters())))
        if cfg.compile and cfg.pools > 1:
            raise GptrainError(f"--compile runs one compiled decode step: use --pools 1, not {cfg.pools}")
        self.cfg = cfg
        param = next(model.parameters())
        self.device, self.dtype = str(param.device), str(param.dtype).removeprefix("torch.")
        try:
            self.tok = tokenizer_for_vocab(model.config.vocab_size)
        except GptrainError as e:
            raise GptrainError(f"model {name}: {e}") from None
        self.kind = "chat" if self.tok.name == "gpt2-chat" else "base"
        self.context = model.config.block_size
        self.max_tokens = min(cfg.max_tokens_limit, self.context - 1)
        self.default_max_tokens = max(1, min(cfg.default_max_tokens, self.max_tokens, self.context // 2))
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or self.context, self.context - 1)
        self.scheduler = Scheduler(self.model, self.tok, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                   compile=cfg.compile, prefill_chunk=cfg.prefill_chunk, pools=cfg.pools,
                                   threads=cfg.threads, on_step=self._on_step)
        self.metrics = Metrics(self.scheduler.stats, cfg.max_batch)
        self.accepting = False
        self.created = int(time.time())
        self._clients: dict[str, int] = {}  # client -> its requests running or queued
        self._clients_lock = threading.Lock()

    def _on_step(self, batch_size: int, seconds: float, prefill_tokens: int) -> None:
        self.metrics.on_step(batch_size, seconds, prefill_tokens)

    def start(self) -> None:
        """Start the scheduler; with --compile, compile (and warm up) the decode step first: uvicorn answers
        nothing, /health included, until this returns."""
        self.scheduler.start()
        if self.cfg.compile:
            self.scheduler.warm_up()
        self.accepting = True

    def close(self) -> None:
        self.accepting = False
        self.scheduler.close()

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "kind": self.kind, "device": self.device, "dtype": self.dtype,
                "auth": self.cfg.api_key is not None, "context_window": self.context,
                "limits": {"context_window": self.context, "max_tokens": self.max_tokens,
                           "default_max_tokens": self.default_max_tokens, "max_prompt_tokens": self.max_prompt_tokens,
                           "max_request_bytes": self.cfg.max_request_bytes, "max_batch": self.cfg.max_batch,
                           "max_queue": self.cfg.max_queue, "max_messages": self.cfg.max_messages,
                           "max_prompts_per_request": self.cfg.max_prompts_per_request,
                           "max_client_requests": self.cfg.client_limit},
                "queue": self.scheduler.stats()}

    # ------------------------------------------------------------ requests -> (prompt ids, sampling parameters)
    # These run on a worker thread (tokenizing a 1 MB request must not stop the event loop), in time linear in the
    # request's size.
    def chat_job(self, body: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        """The completion prompt for a conversation. Oldest turns are dropped (leading system messages and the last
        message kept) until the prompt leaves room for the reply; a conversation that cannot is a 400."""
        if len(body.messages) > self.cfg.max_messages:
            raise ApiError(400, f"{len(body.messages)} messages in one request; this server takes at most "
                                f"{self.cfg.max_messages} (--max-messages)", "messages", code="too_many_messages")
        if self.kind != "chat":
            raise ApiError(400, f"model {self.name} is a base model (the plain GPT-2 vocabulary, no chat format): "
                                "send text to POST /v1/completions, or fine-tune it for chat with gptrain sft",
                           "messages", code="model_not_chat")
        asked = self._check_asked(body.new_tokens, "max_tokens")
        room = asked if asked is not None else self.default_max_tokens
        conversation, most = body.conversation(), min(self.context - 1, self.max_prompt_tokens)
        try:
            messages = fit_to_context(conversation, min(self.context - room, self.max_prompt_tokens), self.tok)
        except PromptTooLong as e:
            if asked is None and e.needed <= most:  # no max_tokens: the shortest conversation, and what it leaves
                messages = fit_to_context(conversation, e.needed, self.tok)
            elif e.needed <= most:
                raise too_long(f"{e} (context window {self.context} tokens, of which max_tokens={asked} are kept "
                               f"for the reply), or ask for at most {self.context - e.needed} tokens",
                               "messages") from None
            else:
                raise too_long(f"the prompt needs {e.needed} tokens; this server takes at most {most}"
                               f"{self._which_limit()}; shorten the last message"
                               + (" or the system prompt" if conversation[0]["role"] == "system" else ""),
                               "messages") from None
        except GptrainError as e:  # a message the chat format cannot take
            raise ApiError(400, str(e), "messages") from None
        prompt = render_for_completion(messages, self.tok)
        return prompt, self._params(body, self._new_tokens(asked, len(prompt), "messages"), stop_ids(self.tok))

    def completion_jobs(self, body: CompletionRequest) -> list[tuple[list[int], SamplingParams]]:
        prompts = body.prompts()
        most = min(self.cfg.max_prompts_per_request, self.cfg.client_limit)
        if len(prompts) > most:
            raise ApiError(400, f"{len(prompts)} prompts in one request; this server takes at most {most} "
                                f"(--max-prompts-per-request {self.cfg.max_prompts_per_request}, "
                                f"--max-client-requests {self.cfg.client_limit})", "prompt", code="too_many_prompts")
        asked = self._check_asked(body.new_tokens, "max_tokens")
        jobs = []
        for p in prompts:
            ids = (self.tok.encode(p) or [self.tok.eot]) if isinstance(p, str) else list(p)
            bad = next((t for t in ids if t >= self.model.config.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the model's vocabulary of "
                                    f"{self.model.config.vocab_size}", "prompt")
            jobs.append((ids, self._params(body, self._new_tokens(asked, len(ids), "prompt"), None)))
        return jobs

    def _check_asked(self, asked: int | None, param: str) -> int | None:
        if asked is not None and asked > self.max_tokens:
            raise ApiError(400, f"max_tokens={asked} is over this server's limit of {self.max_tokens} (context window "
                                f"{self.context} tokens)", param)
        return asked

    def _which_limit(self) -> str:
        """What sets the longest prompt: --max-prompt-tokens, or the context window (less one token to answer)."""
        if self.max_prompt_tokens < self.context - 1:
            return " (--max-prompt-tokens)"
        return f" (context window {self.context} tokens)"

    def _new_tokens(self, asked: int | None, prompt_len: int, param: str) -> int:
        if prompt_len > self.max_prompt_tokens:
            raise too_long(f"the prompt has {prompt_len} tokens; this server takes at most {self.max_prompt_tokens}"
                           f"{self._which_limit()}", param)
        room = self.context - prompt_len
        n = asked if asked is not None else min(self.default_max_tokens, room)
        if n > room:
            raise too_long(f"the prompt ({prompt_len} tokens) plus max_tokens={n} exceeds the model's context window "
                           f"of {self.context} tokens; shorten the prompt or ask for at most {room} tokens", param)
        return n

    @staticmethod
    def _params(body, max_new: int, stops: list[int] | None) -> SamplingParams:
        t = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(  # a temperature this small is greedy anyway, and logits / t would overflow float32
            max_new_tokens=max_new, temperature=0.0 if t < GREEDY_BELOW else t,
            top_k=body.top_k or None, top_p=body.top_p if body.top_p is not None and body.top_p < 1 else None,
            repetition_penalty=body.repetition_penalty or 1.0, no_repeat_ngram=body.no_repeat_ngram or 0,
            seed=body.seed if body.seed is not None else secrets.randbits(62), context="error", stop=body.stops,
            stop_ids=tuple(stops) if stops is not None else None)
        try:
            params.validate()
        except GptrainError as e:
            raise ApiError(400, str(e)) from None
        return params

    # ------------------------------------------------------------ the scheduler
    def submit(self, jobs: list[tuple[list[int], SamplingParams]], client: str = "") -> list:
        """Queue every job or none, for `client` (an address, or a key's name): a client already at
        --max-client-requests, or a full queue, is a 429 with Retry-After; a stopping server a 503."""
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="unavailable",
                           headers={"Retry-After": "5"})
        limit = self.cfg.client_limit
        with self._clients_lock:
            have = self._clients.get(client, 0)
            if have + len(jobs) > limit:
                self.metrics.refused.labels("client").inc()
                retry = max(1, math.ceil(self.scheduler.service_seconds))
                raise ApiError(429, f"this client ({client}) has {have} requests running or queued and one client "
                                    f"may have at most {limit} (--max-client-requests); retry in {retry} s",
                               kind="rate_limit_error", code="client_limit", headers={"Retry-After": str(retry)})
            self._clients[client] = have + len(jobs)
        reqs = []
        try:
            for prompt, params in jobs:
                reqs.append(self.scheduler.submit(prompt, params, on_done=lambda: self._release(client)))
                self.metrics.accepted(len(prompt))
        except QueueFull as e:
            self._release(client, len(jobs) - len(reqs))
            self.cancel(reqs)
            self.metrics.refused.labels("queue").inc()
            retry = max(1, math.ceil(getattr(e, "retry_after", 1) or 1))
            raise ApiError(429, f"the server is busy: {e}; retry in {retry} s", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(retry)}) from None
        except GptrainError as e:
            self._release(client, len(jobs) - len(reqs))
            self.cancel(reqs)
            raise ApiError(400, str(e)) from None
        return reqs

    def _release(self, client: str, n: int = 1) -> None:
        """`n` of the client's requests ended (called on the scheduler's thread as each one finishes)."""
        with self._clients_lock:
            left = self._clients.get(client, 0) - n
            if left > 0:
                self._clients[client] = left
            else:
                self._clients.pop(client, None)

    def cancel(self, reqs) -> None:
        """Cancel accepted requests whose answer nobody will read (the row leaves the batch at the next step)."""
        for r in reqs:
            r.cancel()
            self.metrics.finished(r, "cancelled")
