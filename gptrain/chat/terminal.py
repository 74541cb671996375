"""The `chat` command: talk to a chat model in the terminal, replies streamed token by token.

Each turn renders the whole conversation in the chat format (gptrain/chat/format.py) ending with
`<|assistant|>`, and generates until `<|end|>`. When the conversation no longer fits the context window with
room for a reply, the oldest turns are dropped (the system prompt stays). `/reset` starts over, `/quit` (or
end of input) leaves, Ctrl-C cuts a reply short. Replies go to stdout, notices to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Iterator, TextIO

from gptrain.chat.format import fit_to_context, render_for_completion, stop_ids
from gptrain.errors import GptrainError
from gptrain.generate import Engine, SamplingParams

USER_PROMPT = "you> "
BOT_PROMPT = "bot> "


class ChatSession:
    """A conversation with one model: the messages so far and how to extend them by one exchange."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        tok = engine.tokenizer
        if tok is None or tok.name != "gpt2-chat":
            raise GptrainError(f"the model's vocabulary of {engine.model.config.vocab_size} tokens has no chat tokens; "
                               "fine-tune it into a chat model first: gptrain sft --model SRC --out RUN (offline, on the shipped conversations)")
        self.engine, self.params, self.tok = engine, params, tok
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = list(self.system)
        self.turn = 0  # varies the seed per reply, so a session is reproducible but replies are not all alike

    def reset(self) -> None:
        self.messages, self.turn = list(self.system), 0

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and return the reply's text as it streams; the reply (as far as it got) joins
        the history. Oldest turns are dropped first when the conversation plus room for a reply would overflow
        the window; that notice is printed here, before the caller shows the reply's prompt."""
        block = self.engine.model.config.block_size
        room = min(self.params.max_new_tokens, block // 2)
        kept = fit_to_context(self.messages + [{"role": "user", "content": text}], block - room, self.tok)
        dropped = len(self.messages) + 1 - len(kept)
        if dropped:
            print(f"(context window full: dropped the {dropped} oldest message(s))", file=sys.stderr)
        self.messages = kept
        prompt = render_for_completion(self.messages, self.tok)
        gen = self.engine.generate([prompt], self.params, seed=self.params.seed + self.turn,
                                   max_new_tokens=min(self.params.max_new_tokens, block - len(prompt)),
                                   stop_ids=tuple(stop_ids(self.tok)))
        self.turn += 1
        return self._stream(gen)

    def _stream(self, gen) -> Iterator[str]:
        try:
            for step in gen:
                if step.text[0]:
                    yield step.text[0]
        finally:  # also when cut short (Ctrl-C): keep what was said
            self.messages.append({"role": "assistant", "content": gen.texts[0]})


def run(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read user lines until /quit or end of input; answer each, streaming. At a terminal the prompt is input()'s,
    with readline's line editing and history where the platform has it."""
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # absent on Windows: input() works, without arrows or history
            import readline  # noqa: F401  (importing it is what gives input() line editing)
    while True:
        if interactive:  # an empty line is "", the end of input EOFError
            try:
                text = input(USER_PROMPT)  # readline must know the prompt to redraw the line
            except EOFError:
                stdout.write("\n")
                return
        else:
            line = stdin.readline()
            if not line:
                return
            text = line.rstrip("\n")
            stdout.write(USER_PROMPT + text + "\n")  # shown, so a transcript reads question, reply, question...
            stdout.flush()  # before any notice on stderr, which a transcript of both would otherwise misplace
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        try:
            pieces = session.reply(text)  # a dropped-turns notice comes out here, on its own line
        except GptrainError as e:  # this message cannot fit: say so, keep the conversation going
            print(f"gptrain: {e}", file=sys.stderr)
            continue
        stdout.write(BOT_PROMPT)
        shown = False  # the prompt ends with a space and a reply's first token usually starts with one: shown once
        try:
            for piece in pieces:
                piece = piece if shown else piece.lstrip()
                shown = shown or bool(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            print(" [interrupted]", file=sys.stderr)
        stdout.write("\n")
        stdout.flush()


@dataclass
class ChatConfig:
    system: str | None = field(default=None, metadata={"help": "system prompt that opens the conversation"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gptrain.config import add_dataclass_args
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="a chat model: gptrain sft run dir or checkpoint, or its exported HF directory or "
                             "llm.c .bin")
    add_dataclass_args(parser, SamplingParams, exclude=("stop", "stop_ids", "context"))
    add_dataclass_args(parser, ChatConfig)


def main(args: argparse.Namespace) -> int:
    from gptrain.config import overrides_from_args
    from gptrain.generate import resolve_device
    from gptrain.hf import load_model
    params = SamplingParams(**overrides_from_args(args, SamplingParams))
    params.validate()
    cfg = ChatConfig(**overrides_from_args(args, ChatConfig))
    model = load_model(args.model).to(resolve_device(cfg.device)).eval()
    session = ChatSession(Engine(model, compile=cfg.compile), params, cfg.system)
    block = model.config.block_size
    print(f"gptrain chat: {args.model} ({block}-token context). /reset starts over, /quit leaves.", file=sys.stderr)
    if params.max_new_tokens > block // 2:
        print(f"gptrain chat: replies are capped at what the {block}-token window leaves after the conversation "
              f"(at least {block // 2} tokens)", file=sys.stderr)
    try:
        run(session, sys.stdin, sys.stdout)
    except (EOFError, KeyboardInterrupt):
        sys.stdout.write("\n")
    return 0
