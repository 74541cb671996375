"""gptrain's offline tokenizer against tiktoken's own `gpt2` encoding, built independently from the original
GPT-2 files (vocab.bpe + encoder.json) in ../shared/data."""

import gzip
import hashlib
import types
from functools import lru_cache

import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public

import gptrain.tokenizer as tokenizer_mod
from gptrain.errors import GptrainError
from gptrain.tokenizer import CHAT_TOKENS, GPT2_RANKS_SHA256, get_tokenizer, gpt2_ranks, tokenizer_for_vocab

TEXTS = [
    "Hello, world! It's a test: don't, won't, I'll, we've, they're, she'd, I'm.",
    "Ünïcödé: naïve café, Straße, ÆØÅ, Ελληνικά, русский текст, עברית, العربية, हिन्दी, 中文字符, 日本語のテキスト, 한국어",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 and a lone surrogate-free 🫠",
    "Whitespace runs:" + " " * 300 + "x\t\t\t\ty\n\n\n\n\n" + " \n " * 40 + "\r\n\r\n" + "\u00a0\u2003 end   ",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nif __name__ == '__main__':\n\tprint(f(42))\n",
    "Numbers 1234567890 3.14159 -0.5e-10 0x1F 1,000,000 and mixed a1b2c3",
    "Document one.<|endoftext|>Document two. <|endoftext|>",
    "<|endoftext|><|user|> special-looking strings <|end|>",
    "",
    "   leading and trailing   ",
    "Combining: e\u0301 a\u0308 n\u0303; zero-width\u200bjoiner; control \x00\x01\x7f bytes",
]


@lru_cache(maxsize=1)
def _reference(data_dir: str) -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding spec (its regex, its special tokens) with the ranks read from the original
    GPT-2 files on disk instead of the web."""
    real = openai_public.data_gym_to_mergeable_bpe_ranks

    def from_disk(vocab_bpe_file, encoder_json_file, vocab_bpe_hash=None, encoder_json_hash=None):
        # vocab.bpe is byte-identical to OpenAI's (its hash is checked); encoder.json differs only in formatting.
        return real(f"{data_dir}/gpt2/vocab.bpe", f"{data_dir}/gpt2/encoder.json", vocab_bpe_hash=vocab_bpe_hash)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, cache nothing
        mp.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", from_disk)
        return tiktoken.Encoding(**openai_public.gpt2())


@pytest.fixture
def reference(shared_data):
    return _reference(str(shared_data))


def test_ranks_are_the_original_gpt2_vocabulary(reference):
    assert gpt2_ranks() == reference._mergeable_ranks
    tok = get_tokenizer()
    assert (tok.n_vocab, tok.eot, tok.name, tok.sha256) == (50257, 50256, "gpt2", GPT2_RANKS_SHA256)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken_gpt2(reference, text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tok.encode(text, allow_special=True) == reference.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


def test_endoftext_is_plain_text_unless_allowed(reference):
    tok = get_tokenizer()
    text = "a<|endoftext|>b"
    assert 50256 not in tok.encode(text)
    assert tok.encode(text) == reference.encode(text, disallowed_special=())
    assert tok.encode(text, allow_special=True) == tok.encode("a") + [50256] + tok.encode("b")


def test_long_real_text_and_batches_match(reference):
    with gzip.open(tokenizer_mod.resources.files("gptrain") / "assets" / "shakespeare_plays.txt.gz", "rt") as f:
        text = f.read(200_000)
    docs = text.split("\n\n")[:300]
    tok = get_tokenizer()
    assert tok.encode(text) == reference.encode_ordinary(text)
    assert tok.encode_batch(docs, num_threads=2) == [reference.encode_ordinary(d) for d in docs]


def test_chat_tokens_live_in_the_padded_rows():
    chat = get_tokenizer(chat=True)
    assert chat.n_vocab == 50261 and chat.name == "gpt2-chat" and chat.sha256 != GPT2_RANKS_SHA256
    assert [chat.token_id(t) for t in CHAT_TOKENS] == [50257, 50258, 50259, 50260]
    text = "<|user|>hi<|end|><|assistant|>"
    assert chat.encode(text, allow_special=True) == [50258] + get_tokenizer().encode("hi") + [50260, 50259]
    assert 50258 not in chat.encode(text)  # ordinary encoding never produces special ids
    assert chat.decode([50258, 50260]) == "<|user|><|end|>"
    assert tokenizer_for_vocab(50257) is get_tokenizer() and tokenizer_for_vocab(50261) is chat
    with pytest.raises(GptrainError, match="no gptrain tokenizer has a vocabulary of 50304"):
        tokenizer_for_vocab(50304)
    with pytest.raises(GptrainError, match="not a special token"):
        get_tokenizer().token_id("<|user|>")


def test_shipped_asset_is_the_verified_file(shared_data):
    shipped = (tokenizer_mod.resources.files("gptrain") / "assets" / "gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == GPT2_RANKS_SHA256
    assert shipped == (shared_data / "gpt2" / "gpt2.tiktoken").read_bytes()


@pytest.fixture
def fake_assets(tmp_path, monkeypatch):
    """Point the tokenizer at a copy of the package's assets directory that a test may damage."""
    (tmp_path / "assets").mkdir()
    real = tokenizer_mod.resources.files("gptrain") / "assets" / "gpt2.tiktoken"
    (tmp_path / "assets" / "gpt2.tiktoken").write_bytes(real.read_bytes())
    monkeypatch.setattr(tokenizer_mod, "resources", types.SimpleNamespace(files=lambda package: tmp_path))
    tokenizer_mod.gpt2_ranks.cache_clear()
    tokenizer_mod._shared_tokenizer.cache_clear()
    yield tmp_path / "assets" / "gpt2.tiktoken"
    tokenizer_mod.gpt2_ranks.cache_clear()
    tokenizer_mod._shared_tokenizer.cache_clear()


def test_missing_asset_gives_clear_error(fake_assets):
    fake_assets.unlink()
    with pytest.raises(GptrainError, match=r"gpt2\.tiktoken is missing; reinstall gptrain"):
        get_tokenizer()


def test_altered_asset_gives_clear_error(fake_assets):
    data = bytearray(fake_assets.read_bytes())
    data[100] ^= 1
    fake_assets.write_bytes(bytes(data))
    with pytest.raises(GptrainError, match=r"gpt2\.tiktoken has sha256 [0-9a-f]{64}, expected 306cd27f.*altered"):
        get_tokenizer()
