import argparse
import builtins
import io
import os
import subprocess
import sys

import pytest
import torch

from gptrain.chat.format import render_for_completion
from gptrain.chat.terminal import BOT_PROMPT, USER_PROMPT, ChatSession, run
from gptrain.errors import GptrainError
from gptrain.generate import Engine, SamplingParams
from gptrain.model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chat_model(block_size=64, vocab_size=50261):
    """A random tiny model with the chat vocabulary (weights scaled so greedy replies vary)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def session(model=None, system=None, **kw):
    return ChatSession(Engine(model or chat_model()), SamplingParams(**{"temperature": 0, "max_new_tokens": 8, **kw}),
                       system)


def test_chat_command_turns_reset_and_quit(tmp_path):
    chat_model().save_pretrained(tmp_path / "m")
    lines = "hello there\nhow are you?\n/reset\nhello there\n/quit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "gptrain", "chat", "--model", str(tmp_path / "m"), "--temperature",
                           "0", "--max-new-tokens", "8", "--system", "Be brief."], input=lines, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    turns = proc.stdout.split(USER_PROMPT)
    # one prompt per line read up to /quit, each piped line echoed: 2 replies, /reset (no reply), 1 reply, /quit
    assert turns[0] == "" and len(turns) == 6 and turns[3] == "/reset\n" and turns[5] == "/quit\n"
    asked = [t.partition("\n")[0] for t in (turns[1], turns[2], turns[4])]
    assert asked == ["hello there", "how are you?", "hello there"]
    answers = [t.partition("\n")[2] for t in (turns[1], turns[2], turns[4])]
    assert all(t.startswith(BOT_PROMPT) for t in answers)
    replies = [t[len(BOT_PROMPT):].rstrip("\n") for t in answers]
    assert all(replies)
    assert replies[2] == replies[0]  # after /reset the same question gets the same (greedy) answer
    assert replies[1] != replies[0]
    assert "(conversation reset)" in proc.stderr and "/reset starts over" in proc.stderr


def test_chat_on_its_defaults_with_a_small_window(tmp_path, monkeypatch, capsys):
    """The default 128 new tokens on a small window: replies fit what the window leaves, with a note."""
    from gptrain.chat.terminal import ChatConfig, main
    from gptrain.generate import SamplingParams
    monkeypatch.setattr("gptrain.hf.load_model", lambda src: chat_model())  # a 64-token window, not saved
    monkeypatch.setattr(sys, "stdin", io.StringIO("In the beginning\nand then?\n/quit\n"))
    args = argparse.Namespace(model="m", **{k: v for k, v in vars(ChatConfig()).items() if v is not None})
    assert SamplingParams().max_new_tokens == 128 and main(args) == 0
    out, err = capsys.readouterr()
    answers = [t.partition("\n")[2] for t in out.split(USER_PROMPT)]
    replies = [t[len(BOT_PROMPT):].strip() for t in answers if t.startswith(BOT_PROMPT)]
    assert len(replies) == 2 and all(replies)
    assert "replies are capped at what the 64-token window leaves after the conversation (at least 32" in err
    assert "error" not in err


def test_history_and_reset_in_process():
    s = session(system="Be brief.")
    out = io.StringIO()
    run(s, io.StringIO("hi\nwhat now?\n"), out)
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert out.getvalue().count(BOT_PROMPT) == 2
    s.reset()
    assert s.messages == [{"role": "system", "content": "Be brief."}]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def typing(monkeypatch, out: io.StringIO, lines: list[str]) -> None:
    """input() as at a terminal: shows its prompt, returns the typed lines, then the end of input."""
    typed = iter(lines)

    def fake_input(prompt=""):
        out.write(prompt)
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)


def test_a_reply_starts_one_space_after_its_prompt():
    """A reply's first token usually starts with a space (GPT-2's tokens do); after `bot> ` it is not shown twice."""
    class Spaced:
        def reply(self, text):
            return iter([" ", " Hi", " there", "."])
    out = io.StringIO()
    run(Spaced(), io.StringIO("hello\nagain\n"), out)
    assert out.getvalue() == f"{USER_PROMPT}hello\n{BOT_PROMPT}Hi there.\n{USER_PROMPT}again\n{BOT_PROMPT}Hi there.\n"


def test_on_a_terminal_an_empty_line_is_skipped_and_the_end_of_input_ends(monkeypatch):
    s, out = session(), io.StringIO()
    typing(monkeypatch, out, ["hi", "", "what now?"])
    run(s, Terminal(), out)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]  # "" did not end it
    assert out.getvalue().count(USER_PROMPT) == 4 and out.getvalue().endswith(USER_PROMPT + "\n")


def test_line_editing_is_loaded_only_at_a_terminal(monkeypatch):
    """readline (arrow keys, history) is imported for a terminal, not for piped input, and its absence (Windows)
    leaves chat working."""
    imported, real_import = [], builtins.__import__

    def recording_import(name, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", recording_import)
    run(session(), io.StringIO("hi\n/quit\n"), io.StringIO())
    assert "readline" not in imported
    out = io.StringIO()
    typing(monkeypatch, out, ["hi"])
    run(session(), Terminal(), out)
    assert "readline" in imported
    monkeypatch.setitem(sys.modules, "readline", None)  # import readline raises ImportError, as on Windows
    typing(monkeypatch, out := io.StringIO(), ["hi"])
    run(session(), Terminal(), out)
    assert out.getvalue().count(BOT_PROMPT) == 1


def test_oldest_turns_are_dropped_when_the_window_is_full(capsys):
    s = session(system="Be brief.")
    for i in range(6):
        "".join(s.reply(f"message number {i} is here"))
        prompt = render_for_completion(s.messages[:-1], s.tok)
        assert len(prompt) + 8 <= 64  # the prompt always left room for the reply
    assert s.messages[0]["role"] == "system"
    assert s.messages[1] != {"role": "user", "content": "message number 0 is here"}
    assert s.messages[-2] == {"role": "user", "content": "message number 5 is here"}
    assert "dropped the" in capsys.readouterr().err


def test_dropped_turns_notice_is_a_line_of_its_own_before_the_reply(monkeypatch):
    """In a transcript of stdout and stderr together (a terminal), the notice never lands inside `bot> ...`."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    run(session(), io.StringIO("".join(f"message number {i} is here\n" for i in range(6))), screen)
    lines = screen.getvalue().splitlines()
    notices = [i for i, line in enumerate(lines) if "context window full" in line]
    assert notices and all(lines[i].startswith("(context window full: dropped the") for i in notices)
    assert all(lines[i + 1].startswith(BOT_PROMPT) and lines[i - 1].startswith(USER_PROMPT) for i in notices)


def test_message_too_long_for_the_window_is_refused_not_fatal(capsys):
    s = session()
    out = io.StringIO()
    run(s, io.StringIO("word " * 100 + "\nshort\n"), out)
    assert "only 56 fit in the context window" in capsys.readouterr().err
    assert out.getvalue().count(BOT_PROMPT) == 1  # no empty reply line for the refused message
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["short"]


def test_reply_stops_at_end_token():
    model = chat_model()
    with torch.no_grad():  # every hidden state becomes <|end|>'s embedding: <|end|> is the greedy choice
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[50260])
    s = session(model)
    gens = []
    generate = s.engine.generate
    s.engine.generate = lambda *a, **k: gens.append(generate(*a, **k)) or gens[-1]
    assert "".join(s.reply("hi")) == ""
    assert gens[0].finish_reasons == ["stop"] and gens[0].new_tokens == 1
    assert gens[0].prompts[0][-1] == 50259  # the prompt ends with <|assistant|>
    assert s.messages[-1] == {"role": "assistant", "content": ""}


def test_plain_gpt2_vocabulary_is_refused():
    with pytest.raises(GptrainError, match="no chat tokens; fine-tune it"):
        session(chat_model(vocab_size=50257))

