"""OpenAI's request and response shapes as pydantic models: the API's validation and its OpenAPI document.

Requests are validated strictly (no "5" for 5, no "yes" for true, no NaN) and unknown fields are ignored, as
OpenAI's clients send some this server has no use for (`user`, `metadata`, ...). Fields whose non-default values
this server cannot honour (n > 1, logprobs, top_logprobs, logit_bias, tools, tool_choice other than "none",
response_format other than text, audio, penalties OpenAI defines differently from `repetition_penalty`, ...) are
declared, so that a request using them gets a 400 naming the field (`param`) instead of being answered as if
they were not there. `top_k`, `repetition_penalty` and `no_repeat_ngram` are gptrain's (and vLLM's) extensions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_INT = 2 ** 63 - 1  # JSON integers beyond int64 are refused, as OpenAI does
INT64 = {"ge": -MAX_INT - 1, "le": MAX_INT}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = Field(None, description="send a last chunk with the request's token usage")


StopText = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, lt=2 ** 31)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Sampling(_Request):
    """The fields chat and text completions share; None means the default."""
    model: str | None = Field(None, description="ignored: the server has one model")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT,
                                   description="new tokens at most (default: the server's default, or what the "
                                               "context window leaves)")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="alias of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (so is anything below 1e-4); "
                                                                   "default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default 1 (off)")
    top_k: int | None = Field(None, ge=0, le=MAX_INT, description="keep the k most likely tokens; 0 = off")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100, description="1 = off")
    no_repeat_ngram: int | None = Field(None, ge=0, le=1024, description="never repeat an n-gram of this size")
    seed: int | None = Field(None, **INT64, description="same seed, same output (default: random)")
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the text ends before the first one generated")
    stream: bool | None = Field(None, description="answer with server-sent events")
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, **INT64, description="only 1 is supported")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    tools: list[Any] | None = Field(None, description="not supported: the model writes text, never tool calls")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only "none"')
    functions: list[Any] | None = Field(None, description="not supported (the old form of tools)")
    function_call: str | dict[str, Any] | None = Field(None, description='only "none"')
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}: no JSON mode')
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, n):
        if n not in (None, 1):
            raise ValueError(f"n={n}: only n=1 is supported")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        if value not in (None, 0):
            raise ValueError(f"{info.field_name} is not supported; use repetition_penalty (1 = off) or "
                             "no_repeat_ngram")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        return refuse_unless(not value, "logit_bias is not supported", value)

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value, info):
        return refuse_unless(not value, f"{info.field_name} is not supported: this model answers in text and never "
                                        "calls tools", value)

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value, info):
        return refuse_unless(value in (None, "none"), f'{info.field_name}: only "none" is supported (no tool calling)', value)

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        return refuse_unless(value is None or value.get("type") == "text", 'only {"type": "text"} is supported (no JSON mode or '
                                                           "schema)", value)

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def refuse_unless(ok: bool, message: str, value):
    """`value`, or a ValueError that the app turns into a 400 naming the field it was raised for."""
    if not ok:
        raise ValueError(message)
    return value


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is read as system")
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = Field(None, description="not supported")
    top_logprobs: int | None = Field(None, description="not supported")
    modalities: list[str] | None = Field(None, description='only ["text"]')
    audio: dict[str, Any] | None = Field(None, description="not supported")
    prediction: dict[str, Any] | None = Field(None, description="not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported")

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value, info):
        return refuse_unless(not value, f"{info.field_name} is not supported", value)

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value):
        return refuse_unless(value in (None, ["text"]), 'only ["text"] is supported', value)

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, value, info):
        return refuse_unless(value is None, f"{info.field_name} is not supported", value)

    def conversation(self) -> list[dict]:
        """The messages as the chat format's plain dicts."""
        return [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(
        min_length=1)] = Field(description="text, texts (one choice each), token ids, or lists of token ids")
    echo: bool | None = Field(None, description="not supported")
    logprobs: int | None = Field(None, ge=0, le=5, description="not supported")
    best_of: int | None = Field(None, **INT64, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported")

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _no_extras(cls, value, info):
        return refuse_unless(not value, f"{info.field_name} is not supported", value)

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value):
        return refuse_unless(value in (None, 1), f"best_of={value}: only 1 is supported", value)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if isinstance(p[0], int) else list(p)


# --- responses ------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`data: {chunk}`, the stream ends `data: [DONE]`)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion; streamed, each event is one of these with new text and no usage (but the last, with
    stream_options.include_usage, which has no choices and the usage)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptrain"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Limits(BaseModel):
    context_window: int
    max_tokens: int = Field(description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(description="max_tokens when a request gives none (less if the prompt leaves "
                                                "less room)")
    max_prompt_tokens: int
    max_request_bytes: int
    max_batch: int
    max_queue: int
    max_messages: int = Field(description="messages in one chat request at most")
    max_prompts_per_request: int = Field(description="prompts in one completions request at most")
    max_client_requests: int = Field(description="requests one client may have running or queued")


class QueueStats(BaseModel):
    queue_depth: int
    running: int
    max_batch: int
    max_queue: int
    free_slots: int
    steps: int
    pools: int
    threads: list[int]  # each pool's torch threads now (one while another process competes for the cores)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    kind: Literal["chat", "base"] = Field(description="chat models answer /v1/chat/completions; any model "
                                                      "answers /v1/completions")
    device: str
    dtype: str
    auth: bool = Field(description="whether /v1 routes need 'Authorization: Bearer KEY'")
    context_window: int
    limits: Limits
    queue: QueueStats


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
