"""Hugging Face interop against transformers' own GPT2LMHeadModel and tokenizer, on small random models."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptrain import cli
from gptrain.errors import GptrainError
from gptrain.hf import load_model, save_pretrained, tokenizer_files
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(n_positions=32, n_embd=32, n_layer=2, n_head=2)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every weight, bias and LayerNorm, so no transposition or offset can hide behind the
    zeros and ones of a fresh initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def hf_gpt2(vocab_size: int, seed: int = 0):
    config = transformers.GPT2Config(vocab_size=vocab_size, **SHAPE)
    return randomize(transformers.GPT2LMHeadModel(config), seed)


def tiny_gptrain(vocab_size: int = 50257, pad_vocab_to: int = 64, seed: int = 0) -> GPT:
    config = GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, pad_vocab_to=pad_vocab_to)
    return randomize(GPT(config), seed)


def logits_diff(ours: GPT, theirs, vocab_size: int) -> float:
    idx = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, _ = ours(idx)
        b = theirs(idx).logits
    assert a.shape == b.shape == (2, 32, vocab_size)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("vocab_size", [50257, 50261])
def test_hf_to_gptrain_logits_match(tmp_path, vocab_size):
    hf = hf_gpt2(vocab_size)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.config.vocab_size == vocab_size and model.config.padded_vocab_size == 50304
    assert torch.count_nonzero(model.transformer.wte.weight[vocab_size:]) == 0
    assert model.lm_head.weight is model.transformer.wte.weight
    assert logits_diff(model, hf, vocab_size) <= 1e-4


def test_sharded_safetensors_load(tmp_path):
    hf = hf_gpt2(50257, seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert logits_diff(load_model(str(tmp_path)), hf, 50257) <= 1e-4


def test_hub_style_pytorch_bin_loads_safely(tmp_path):
    """The layout of OpenAI's checkpoints on the hub: no `transformer.` prefix, causal-mask buffers, a pickle."""
    hf = hf_gpt2(50257, seed=3)
    hf.config.to_json_file(tmp_path / "config.json")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert logits_diff(GPT.from_pretrained(str(tmp_path)), hf, 50257) <= 1e-4

    torch.save({"weights": sd, "payload": Path("x")}, tmp_path / "pytorch_model.bin")  # arbitrary objects
    with pytest.raises(GptrainError, match="pytorch_model.bin cannot be read as plain tensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("vocab_size,pad", [(50257, 64), (50257, 128), (50261, 64)])
def test_gptrain_to_hf_logits_match(tmp_path, vocab_size, pad):
    model = tiny_gptrain(vocab_size, pad)
    save_pretrained(model, tmp_path / "out")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["transformer.wte.weight"].shape == (vocab_size, 32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert logits_diff(model, hf, vocab_size) <= 1e-4
    back = load_model(str(tmp_path / "out"))  # and round trip into gptrain, bit for bit
    assert logits_diff(back, hf, vocab_size) <= 1e-4
    assert torch.equal(back.transformer.wte.weight[:vocab_size], model.transformer.wte.weight[:vocab_size])


TEXTS = [
    "Hello, world! It's GPT-2's tokenizer: don't, we'll, they've.",
    "Ünïcödé café Straße, русский, 中文, 日本語, 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "spaces" + " " * 50 + "tabs\t\t\tnewlines\n\n\n  \n",
    "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}\n",
    "one<|endoftext|>two",
]


@pytest.mark.parametrize("chat", [False, True])
def test_autotokenizer_on_export_gives_gptrain_ids(tmp_path, chat):
    tok = get_tokenizer(chat)
    save_pretrained(tiny_gptrain(tok.n_vocab), tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf_tok) == tok.n_vocab and hf_tok.eos_token_id == 50256
    texts = TEXTS + (["<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"] if chat else [])
    for text in texts:
        # HF always treats its special tokens as special: compare with gptrain's allow_special encoding.
        assert hf_tok(text)["input_ids"] == tok.encode(text, allow_special=True), text
        assert hf_tok.decode(tok.encode(text, allow_special=True)) == text
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ([50256, 50260] if chat else 50256)


def test_tokenizer_files_equal_the_original_gpt2_files(shared_data):
    files = tokenizer_files(50257, 1024)
    assert json.loads(files["vocab.json"]) == json.loads((shared_data / "gpt2" / "encoder.json").read_text())
    assert files["merges.txt"] == (shared_data / "gpt2" / "vocab.bpe").read_text(encoding="utf-8")


def test_export_never_clobbers_a_foreign_directory(tmp_path):
    model = tiny_gptrain()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GptrainError, match="non-empty directory that is not a gptrain export.*--force"):
        save_pretrained(model, out)
    assert os.listdir(out) == ["notes.txt"]
    save_pretrained(model, out, force=True)
    assert "notes.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    save_pretrained(tiny_gptrain(seed=5), out)  # a previous export is replaced without --force
    assert torch.equal(load_model(str(out)).transformer.wpe.weight, tiny_gptrain(seed=5).transformer.wpe.weight)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup directories left behind


def test_load_model_rejects_bad_sources_in_one_line(tmp_path):
    with pytest.raises(GptrainError, match="no such directory"):
        load_model(str(tmp_path / "missing" / "x y"))
    with pytest.raises(GptrainError, match="not a Hugging Face GPT-2 directory"):
        load_model(str(tmp_path))
    hf_gpt2(50257).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [("activation_function", "relu", "activation_function='relu' is not GPT-2"),
                                ("vocab_size", 1000, "vocab_size=1000 is not a vocabulary gptrain can tokenize"),
                                ("n_layer", 3, "missing .'transformer.h.2")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(GptrainError, match=message) as e:
            load_model(str(tmp_path))
        assert "\n" not in str(e.value)


def test_errors_name_the_flag_the_source_came_from(tmp_path, monkeypatch):
    """train's --init-from (and lm-eval's pretrained=) resolve through load_model too: its errors name that flag."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: offline, nothing cached
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for src, message in [("gpt2", "no such directory here .*nor a hub model in the Hugging Face cache"),
                         (str(tmp_path / "typo"), "no such directory here"),
                         (str(tmp_path), "not a Hugging Face GPT-2 directory"),
                         (str(tmp_path / "run"), "this run has no valid checkpoint")]:
        with pytest.raises(GptrainError, match=f"^--init-from {re.escape(src)}: {message}"):
            load_model(src, flag="--init-from")
        with pytest.raises(GptrainError, match=f"^--model {re.escape(src)}: {message}"):
            load_model(src)
    with pytest.raises(GptrainError, match="^pretrained=gpt2: no such directory"):
        load_model("gpt2", flag="pretrained=")


def test_export_command_says_when_it_replaced_a_previous_export(tmp_path, capsys):
    tiny_gptrain().save_pretrained(tmp_path / "model")
    export = ["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    assert cli.main(export) == 0
    assert "replacing" not in capsys.readouterr().out
    assert cli.main(export) == 0
    assert f"to {tmp_path / 'out'}, replacing the previous export there:" in capsys.readouterr().out
    (tmp_path / "out" / "notes.txt").write_text("mine")  # no longer only an export: refused, kept, until --force
    assert cli.main(export) == 2
    assert "is a non-empty directory that is not a gptrain export" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert cli.main(export + ["--force"]) == 0
    assert ", replacing what it held before (--force):" in capsys.readouterr().out
    assert not (tmp_path / "out" / "notes.txt").exists()


def fake_hub_cache(home: Path, repo_id: str, hf) -> None:
    """The Hugging Face cache layout: hub/models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hf.config.to_json_file(snapshot / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(snapshot / "model.safetensors"), metadata={"format": "pt"})


def test_export_command_resolves_hub_name_from_local_cache(tmp_path):
    hf = hf_gpt2(50257, seed=7)
    fake_hub_cache(tmp_path / "hf", "openai-community/gpt2", hf)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "gptrain", "export", "--model", "gpt2", "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "exported gpt2" in run.stdout and "model.safetensors" in run.stdout
    assert logits_diff(load_model(str(tmp_path / "out")), hf, 50257) <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("hi there")["input_ids"] == [5303, 612]


def test_uncached_hub_name_says_how_to_provide_a_directory(tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path, "gpt2", hf_gpt2(50257, seed=9))  # the pre-2024 spelling of the repo id
    assert load_model("openai-community/gpt2").config.n_layer == 2
    assert cli.main(["export", "--model", "gpt2-medium", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptrain: error: --model gpt2-medium: no such directory here (")
    assert "nor a hub model in the Hugging Face cache" in err and "check the path" in err  # runs/typo reads right too
    assert "hf download openai-community/gpt2-medium" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


class _Loader:
    def state_dict(self):
        return {"pos": 0}


def test_gptrain_run_and_checkpoint_load_and_export(tmp_path, capsys):
    from gptrain.train.checkpoint import Checkpointer
    model = tiny_gptrain(50261, seed=11)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(tmp_path / "run", model=model, optimizer=opt, loader=_Loader(), config={})
    ckpt.save(1, tokens_seen=0)
    step = ckpt.save(2, tokens_seen=0)
    idx = torch.randint(0, 50261, (1, 16))
    for src in (tmp_path / "run", step, tmp_path / "run" / "checkpoints"):
        loaded = load_model(str(src))
        assert loaded.config == model.config and torch.equal(loaded(idx)[0], model(idx)[0])
    with pytest.raises(GptrainError, match="holds gptrain checkpoints"):  # even --force never deletes a run
        save_pretrained(model, tmp_path / "run", force=True)
    assert cli.main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "vocabulary 50261" in capsys.readouterr().out
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (umask), not owner-only
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert logits_diff(model, hf, 50261) <= 1e-4

    (step / "__0_0.distcp").write_bytes(b"broken")  # damaged newest: a run dir falls back, the dir itself errs
    assert torch.equal(load_model(str(tmp_path / "run"))(idx)[0], load_model(str(step.parent / "step_00000001"))(idx)[0])
    with pytest.raises(GptrainError, match="is not usable"):
        load_model(str(step))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(GptrainError, match="no valid checkpoint"):
        load_model(str(tmp_path / "empty"))


def test_cli_help():
    run = subprocess.run([sys.executable, "-m", "gptrain", "--help"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and "export" in run.stdout and "train" in run.stdout
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0


def test_chat_export_renders_conversations_as_gptrain_does(tmp_path):
    """The chat template written into an export's tokenizer_config.json (what vLLM and TGI read) gives the same
    prompt ids as gptrain's own chat format."""
    from gptrain.chat.format import render_for_completion, render_conversation
    tok = get_tokenizer(chat=True)
    save_pretrained(GPT(GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=32)),
                    tmp_path / "chat")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "chat")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 2?"}]
    def ids(**kw):  # rendered, then tokenized, as vLLM does
        return hf_tok.encode(hf_tok.apply_chat_template(conv, tokenize=False, **kw), add_special_tokens=False)
    assert ids(add_generation_prompt=True) == render_for_completion(conv, tok)
    assert ids() == render_conversation(conv, tok)[0]
    assert "chat_template" not in json.loads(tokenizer_files(50257, 32)["tokenizer_config.json"])  # base: none


def test_a_missing_local_path_without_the_hf_extra_is_named_as_a_path(tmp_path, monkeypatch):
    """`--model runs/typo` on the core install: a missing directory, not a request for huggingface_hub."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "huggingface_hub" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GptrainError, match=r"--model runs/typo: no such directory here \(.*runs/typo\); if it names a"
                                           r" hub model, .*pip install 'gptrain\[hf\]'"):
        load_model("runs/typo")
    (tmp_path / "runs" / "demo" / "checkpoints").mkdir(parents=True)  # runs/ exists: a path, whatever is installed
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(GptrainError) as e:
        load_model("runs/typo")
    assert str(e.value) == f"--model runs/typo: no such directory here ({tmp_path / 'runs' / 'typo'}); models in runs/: demo"
