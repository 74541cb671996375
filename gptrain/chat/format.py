"""The chat format: conversations as token ids, with a loss mask that is 1 exactly where the assistant speaks.

A conversation `[{"role": "system"|"user"|"assistant", "content": str}, ...]` is rendered as

    <|endoftext|> <|system|>content<|end|> <|user|>content<|end|> <|assistant|>content<|end|> ...

(no spaces between the pieces). `<|endoftext|>` opens it because GPT-2 saw that token at every document start;
the role tokens and `<|end|>` are the chat tokens of `gptrain.tokenizer` (ids 50257..50260, in GPT-2's padded
embedding rows). Content is always encoded as ordinary text, so a user who types "<|end|>" gets the characters,
never the token. The loss mask marks the assistant's content tokens and its closing `<|end|>` (so the model
learns to stop); the role tokens are given to the model, never learned from. Generation appends `<|assistant|>`
to the prompt and stops at `<|end|>` (or `<|endoftext|>`).
"""

from __future__ import annotations

from gptrain.errors import GptrainError
from gptrain.tokenizer import Tokenizer, get_tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
# The same format as a Hugging Face chat template (written into exported tokenizer_config.json), so that
# transformers' apply_chat_template, vLLM and TGI render conversations as gptrain does. One difference: those
# tokenizers read a special-token string typed inside a message as the token itself.
HF_CHAT_TEMPLATE = ("{{ '<|endoftext|>' }}{% for m in messages %}"
                    "{{ '<|' + ('system' if m['role'] == 'developer' else m['role']) + '|>' + m['content'] + '<|end|>' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _chat_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    tok = tokenizer or get_tokenizer(chat=True)
    if END not in tok.special_tokens:
        raise GptrainError(f"tokenizer {tok.name!r} has no chat tokens; use gptrain.tokenizer.get_tokenizer(chat=True)")
    return tok


def role_id(role: str, tokenizer: Tokenizer | None = None) -> int:
    return _chat_tokenizer(tokenizer).token_id(f"<|{role}|>")


def end_id(tokenizer: Tokenizer | None = None) -> int:
    return _chat_tokenizer(tokenizer).token_id(END)


def stop_ids(tokenizer: Tokenizer | None = None) -> list[int]:
    """Token ids that end an assistant reply during generation."""
    tok = _chat_tokenizer(tokenizer)
    return [tok.token_id(END), tok.eot]


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    # OpenAI's list-of-parts form: [{"type": "text", "text": "..."}]; only text parts make sense here.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise GptrainError(f"{where}: content must be a string (or a list of {{'type': 'text', 'text': ...}} parts), "
                       f"got {type(content).__name__}")


def validate_messages(messages, where: str = "conversation") -> list[dict]:
    """Check a conversation's structure and return it as plain [{"role", "content"}] dicts (extra keys dropped)."""
    if not isinstance(messages, list) or not messages:
        raise GptrainError(f"{where}: expected a non-empty list of messages "
                           f"[{{'role': 'user', 'content': '...'}}, ...], got {type(messages).__name__}"
                           f"{' (empty)' if isinstance(messages, list) else ''}")
    out = []
    for i, m in enumerate(messages):
        here = f"{where}, message {i}"
        if not isinstance(m, dict):
            raise GptrainError(f"{here}: expected an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise GptrainError(f"{here}: missing {'role' if 'role' not in m else 'content'!r}; "
                               "each message needs 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise GptrainError(f"{here}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        out.append({"role": role, "content": _content_text(m["content"], here)})
    return out


def render_conversation(messages, tokenizer: Tokenizer | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (1 on assistant content tokens and their <|end|>)."""
    tok = _chat_tokenizer(tokenizer)
    end = tok.token_id(END)
    ids, mask = [tok.eot], [0]
    for m in validate_messages(messages):
        content = tok.encode(m["content"])
        learn = int(m["role"] == "assistant")
        ids += [role_id(m["role"], tok), *content, end]
        mask += [0] + [learn] * (len(content) + 1)
    return ids, mask


def render_for_completion(messages, tokenizer: Tokenizer | None = None) -> list[int]:
    """Prompt ids for the model's next reply: the conversation followed by <|assistant|>."""
    tok = _chat_tokenizer(tokenizer)
    ids, _ = render_conversation(messages, tok)
    return ids + [role_id("assistant", tok)]


class PromptTooLong(GptrainError):
    """Even the leading system messages and the last message need more than the tokens allowed: `needed` tokens."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def fit_to_context(messages, max_tokens: int, tokenizer: Tokenizer | None = None) -> list[dict]:
    """Drop the oldest turns (keeping leading system messages and the last message) until the completion
    prompt has at most max_tokens tokens; PromptTooLong when even that minimum does not fit.

    Linear in the conversation's size: each message is encoded once and the prompt's length is the sum of its
    messages' (content + role token + <|end|>), plus <|endoftext|> and <|assistant|>."""
    tok = _chat_tokenizer(tokenizer)
    msgs = validate_messages(messages)
    n_sys = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    sizes = [len(tok.encode(m["content"])) + 2 for m in msgs]
    n = 2 + sum(sizes)
    first = n_sys  # the oldest turn kept
    while n > max_tokens and first < len(msgs) - 1:
        n -= sizes[first]
        first += 1
    if n > max_tokens:
        raise PromptTooLong(f"the prompt needs {n} tokens but only {max_tokens} fit in the context window; "
                            "shorten the last message" + (" or the system prompt" if n_sys else ""), n)
    return msgs[:n_sys] + msgs[first:]


def parse_conversation(ids, tokenizer: Tokenizer | None = None) -> list[dict]:
    """The inverse of render_conversation / render_for_completion, for display. A final message without
    <|end|> (a reply still being generated) is returned as far as it goes."""
    tok = _chat_tokenizer(tokenizer)
    end = tok.token_id(END)
    roles = {role_id(r, tok): r for r in ROLES}
    ids = [int(i) for i in ids]
    if ids and ids[0] == tok.eot:
        ids = ids[1:]
    messages, i = [], 0
    while i < len(ids):
        if ids[i] not in roles:
            raise GptrainError(f"token {i} (id {ids[i]}) should start a message with a role token "
                               f"({', '.join(f'<|{r}|>' for r in ROLES)}); these ids are not in the chat format")
        j = i + 1
        while j < len(ids) and ids[j] != end:
            j += 1
        messages.append({"role": roles[ids[i]], "content": tok.decode(ids[i + 1:j])})
        i = j + 1
    return messages


def decode_reply(ids, tokenizer: Tokenizer | None = None) -> str:
    """Text of generated reply ids: everything before the first stop token, special tokens never shown."""
    tok = _chat_tokenizer(tokenizer)
    stops = set(stop_ids(tok))
    out = []
    for i in ids:
        if int(i) in stops:
            break
        if int(i) < tok.eot:  # a stray chat token inside a reply is not text
            out.append(int(i))
    return tok.decode(out)
