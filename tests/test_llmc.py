"""llm.c interchange: model and tokenizer files out and in, llm.c's logs in the report, and prepare's shards as
llm.c's data loader expects them. The reference side of each test is written here from the formats as llm.c's
sources describe them (train_gpt2.py's write_model / write_tokenizer, llmc/logger.h, llmc/dataloader.h), not
from gptrain/llmc.py."""

import glob
import json
import struct

import numpy as np
import pytest
import torch

from gptrain import cli, llmc
from gptrain.errors import GptrainError
from gptrain.hf import load_model
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer

ORDER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
         "mlp.c_proj.bias")


def random_model(vocab_size=50257, seed=0, n_layer=2, n_embd=32) -> GPT:
    """Random values everywhere (padded rows too, as training leaves them), so no offset hides behind zeros."""
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_embd=n_embd))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def reference_file(model: GPT, path, version=3, vocab_rows=None):
    """llm.c's model file as train_gpt2.py's write_model describes it, written independently of gptrain/llmc.py."""
    c = model.config
    sd = model.state_dict()
    vocab_rows = vocab_rows or -(-c.vocab_size // 128) * 128
    wte = torch.zeros(vocab_rows, c.n_embd)
    wte[: c.vocab_size] = sd["transformer.wte.weight"][: c.vocab_size]
    tensors = [wte, sd["transformer.wpe.weight"]]
    tensors += [sd[f"transformer.h.{i}.{kind}"] for kind in ORDER for i in range(c.n_layer)]
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    header = struct.pack("<8i", 20240326, version, c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd,
                         vocab_rows) + bytes(4 * 248)
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors:
            t = t.detach().float().contiguous()
            f.write(t.numpy().tobytes() if version == 3 else t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def logits(model, seed=1):
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)[0]


def export(model, tmp_path, dtype="float32", name="out"):
    return llmc.export(model, tmp_path / name, dtype)


# ---------------------------------------------------------------- model files

@pytest.mark.parametrize("vocab_size", [50257, 50261])
def test_float32_round_trip_is_bit_for_bit_and_equals_the_reference_writer(tmp_path, vocab_size):
    model = random_model(vocab_size)
    export(model, tmp_path)
    reference_file(model, tmp_path / "ref.bin")
    assert (tmp_path / "out" / "model.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    back = load_model(str(tmp_path / "out" / "model.bin"))
    assert back.config == model.config
    for name, t in model.state_dict().items():
        want = t[:vocab_size] if name in ("transformer.wte.weight", "lm_head.weight") else t
        got = back.state_dict()[name]
        assert torch.equal(got[: want.shape[0]], want), name
    assert torch.count_nonzero(back.transformer.wte.weight[vocab_size:]) == 0  # padded rows zero
    assert back.lm_head.weight is back.transformer.wte.weight


def rne_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 -> float32, round to nearest, ties to even, by integer arithmetic on the bits."""
    u = x.numpy().view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return torch.from_numpy(u.astype(np.uint32).view(np.float32))


def test_bfloat16_export_rounds_to_nearest_even(tmp_path):
    model = random_model()
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 3.0, -0.0])
    with torch.no_grad():
        model.transformer.ln_f.weight[: len(ties)] = ties
    export(model, tmp_path, "bfloat16")
    raw = (tmp_path / "out" / "model.bin").read_bytes()
    assert struct.unpack("<8i", raw[:32])[:2] == (20240326, 5)
    reference_file(model, tmp_path / "ref.bin", version=5)
    assert raw == (tmp_path / "ref.bin").read_bytes()
    back = load_model(str(tmp_path / "out" / "model.bin"))
    for name, t in back.state_dict().items():
        src = model.state_dict()[name][: t.shape[0]]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            src, t = src[:50257], t[:50257]
        assert torch.equal(t, src.to(torch.bfloat16).float()), name  # torch's own conversion
        assert torch.equal(t, rne_bfloat16(src.contiguous())), name
    assert back.transformer.ln_f.weight[: len(ties)].tolist() == [1.0, 1 + 2 ** -6, -1.0, 1 + 2 ** -7, 3.0, -0.0]


@pytest.mark.parametrize("version", [3, 5])
def test_a_reference_file_loads_with_the_original_logits(tmp_path, version):
    model = random_model(seed=3)
    reference_file(model, tmp_path / "m.bin", version=version, vocab_rows=50432)  # another padding than gptrain's
    back = load_model(str(tmp_path / "m.bin"))
    if version == 5:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    assert (logits(back) - logits(model)).abs().max().item() <= 1e-5
    assert back.config.padded_vocab_size == 50304


def test_llmc_checkpoint_names_and_every_command_reads_them(tmp_path, capsys):
    """llm.c's CUDA trainer writes model_NNNNNNNN.bin; --model takes it (sample here, through the CLI)."""
    model = random_model()
    reference_file(model, tmp_path / "model_00000020.bin", version=5)
    rc = cli.main(["sample", "--model", str(tmp_path / "model_00000020.bin"), "--prompt", "Hello",
                   "--max-new-tokens", "3", "--seed", "0"])
    assert rc == 0


def malformed(tmp_path):
    model = random_model()
    reference_file(model, tmp_path / "good.bin")
    good = (tmp_path / "good.bin").read_bytes()
    header = bytearray(good[:1024])
    cases = {}
    cases["magic"] = (struct.pack("<i", 20240520) + good[4:], r"wrong magic number 20240520 \(an llm.c token shard")
    cases["version"] = (good[:4] + struct.pack("<i", 4) + good[8:], r"unknown llm.c model version 4")
    cases["short_header"] = (good[:100], r"truncated: 100 bytes, shorter than llm.c's 1024-byte header")
    cases["truncated"] = (good[:-10], r"truncated: [\d,]+ bytes, but its header \(version 3, 2 layers")
    cases["longer"] = (good + bytes(8), r"longer than its header says")
    header[8:12] = struct.pack("<i", 64)  # maxT 64 but only 32 rows of wpe follow: header vs size
    cases["header_size"] = (bytes(header) + good[1024:], r"truncated: .* context 64")
    return cases


@pytest.mark.parametrize("case", ["magic", "version", "short_header", "truncated", "longer", "header_size"])
def test_malformed_files_are_one_line_naming_the_file(tmp_path, capsys, case):
    data, message = malformed(tmp_path)[case]
    path = tmp_path / f"{case}.bin"
    path.write_bytes(data)
    with pytest.raises(GptrainError, match=message) as e:
        load_model(str(path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    assert cli.main(["eval", "val", "--model", str(path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_export_cli_writes_model_tokenizer_and_readme(tmp_path, capsys):
    run = tmp_path / "hf"
    random_model().save_pretrained(str(run))
    assert cli.main(["export", "--model", str(run), "--out", str(tmp_path / "x"), "--format", "llmc",
                     "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "model.bin" in out and "README.txt" in out
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["README.txt", "model.bin", "tokenizer.bin"]
    assert "train_gpt2cu" in (tmp_path / "x" / "README.txt").read_text()
    # the export is replaced by another of either format without --force
    assert cli.main(["export", "--model", str(tmp_path / "x" / "model.bin"), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "config.json").is_file()
    assert cli.main(["export", "--model", str(run), "--out", str(tmp_path / "y"), "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 applies to --format llmc" in capsys.readouterr().err


# ---------------------------------------------------------------- tokenizer file

def read_tokenizer(path):
    """llmc/tokenizer.h's reader, in Python: header, then a length byte and the bytes per token."""
    raw = (path).read_bytes()
    magic, version, n, eot = struct.unpack("<4i", raw[:16])
    pos, table = 1024, []
    for _ in range(n):
        length = raw[pos]
        table.append(raw[pos + 1: pos + 1 + length])
        pos += 1 + length
    assert pos == len(raw)
    return magic, version, eot, table


@pytest.mark.parametrize("chat", [False, True])
def test_tokenizer_file_decodes_as_gptrains_tokenizer(tmp_path, chat):
    tok = get_tokenizer(chat=chat)
    llmc.write_tokenizer(tmp_path / "t.bin", tok.n_vocab)
    magic, version, eot, table = read_tokenizer(tmp_path / "t.bin")
    assert (magic, version, eot, len(table)) == (20240328, 2, 50256, tok.n_vocab)
    assert all(table[i] == tok.enc.decode_single_token_bytes(i) for i in range(tok.n_vocab))
    text = "Hello world! Ünïcödé 日本語 <|endoftext|> and so on"
    ids = tok.encode(text, allow_special=True)
    assert b"".join(table[i] for i in ids) == text.encode()


# ---------------------------------------------------------------- logs

MAIN_LOG = """s:0 tel:10.9876
s:0 trl:10.9912 lr:0.000006 norm:15.32
s:1 trl:10.5000 lr:0.000012 norm:9.81
s:2 trl:nan lr:0.000018 norm:nan
s:2 trl:9.9000 lr:0.000018 norm:5.00
s:3 trl:9.5000 lr:0.000024 norm:4.10
s:4 tel:9.4000
s:4 eval:0.2512
"""

C_STDOUT = """[GPT-2]
max_seq_len: 1024
val loss 11.012345
step 0: train loss 11.000000 (took 1200.0 ms)
step 1: train loss 10.250000 (took 1100.0 ms)
val loss 10.100000
step 2: train loss 10.000000 (took 1100.0 ms)
generating:
---
step 3 tokens of text
---
"""

CU_STDOUT = """val loss 11.000000
step    1/10 | loss 10.980000 (+nanz)| norm 12.3400 (+nanz)| lr 6.00e-06 | 100.00 ms | 30.0% bf16 MFU | 50000 tok/s
step    2/10 | loss 10.500000 (+nanz)| norm 8.0000 (+nanz)| lr 1.20e-05 | 100.00 ms | 30.0% bf16 MFU | 50000 tok/s
val loss 10.400000
HellaSwag: 2520/10042 = 0.250946
"""


def test_read_log_main_log_and_both_trainers_printed_output(tmp_path):
    (tmp_path / "main.log").write_text(MAIN_LOG)
    train, evals = llmc.read_log(tmp_path / "main.log")
    assert train[0] == {"train_loss": 10.9912, "lr": 0.000006, "grad_norm": 15.32}
    assert train[2]["train_loss"] == 9.9  # the later record of a step wins (a resumed run)
    assert evals == {0: {"val_loss": 10.9876}, 4: {"val_loss": 9.4, "hellaswag_acc_norm": 0.2512}}
    (tmp_path / "c.txt").write_text(C_STDOUT)
    train, evals = llmc.read_log(tmp_path / "c.txt")
    assert {s: r["train_loss"] for s, r in train.items()} == {0: 11.0, 1: 10.25, 2: 10.0}
    assert evals == {0: {"val_loss": 11.012345}, 2: {"val_loss": 10.1}}
    (tmp_path / "cu.txt").write_text(CU_STDOUT)
    train, evals = llmc.read_log(tmp_path / "cu.txt")
    assert train[1] == {"train_loss": 10.5, "grad_norm": 8.0, "lr": 1.2e-05}
    assert evals == {0: {"val_loss": 11.0}, 2: {"val_loss": 10.4, "hellaswag_acc_norm": 0.250946}}
    (tmp_path / "other.txt").write_text("hello\n")
    with pytest.raises(GptrainError, match=r"other.txt: no llm.c log lines"):
        llmc.read_log(tmp_path / "other.txt")


def test_report_compare_overlays_an_llmc_log_against_tokens(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from test_report import write_run
    run = write_run(tmp_path / "run", steps=60, evals_every=10, tokens_per_step=2048)
    logdir = tmp_path / "llmc"
    logdir.mkdir()
    (logdir / "main.log").write_text(MAIN_LOG)
    assert cli.main(["report", str(run), "--compare", str(logdir)]) == 0
    assert "drawn against steps only" in capsys.readouterr().err
    assert cli.main(["report", str(run), "--compare", str(logdir / "main.log"),
                     "--compare-tokens-per-step", "2048"]) == 0
    assert "steps only" not in capsys.readouterr().err
    md = (run / "report" / "report.md").read_text()
    assert "## llm.c llmc/main.log" in md and "| tokens per step | 2048 |" in md
    assert (run / "report" / "report.png").stat().st_size > 10_000
    assert cli.main(["report", str(logdir / "main.log")]) == 0  # an llm.c log alone
    assert (logdir / "report" / "report.png").is_file()
    other = write_run(tmp_path / "other", steps=30, evals_every=10, tokens_per_step=4096)
    assert cli.main(["report", str(run), "--compare", str(other), "--out", str(tmp_path / "two")]) == 0
    assert "## other" in (tmp_path / "two" / "report.md").read_text()  # a gptrain run as LOG


# ---------------------------------------------------------------- data

def test_prepared_shards_follow_llmc_data_loader_conventions(tmp_path):
    """llmc/dataloader.h: header magic 20240520, version 1, token count; uint16 tokens; files found by glob."""
    from gptrain.data.prepare import PrepareConfig, prepare
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {d}, line {i}: some words in it.\n" * 40}) + "\n"
                            for d in range(40) for i in range(1)))
    manifest = prepare(str(docs), PrepareConfig(out=str(tmp_path / "data"), shard_tokens=10_000, val_tokens=2_000,
                                                workers=1), progress=False)
    shards = {s["path"]: s for s in manifest["shards"]}
    train = sorted(glob.glob(str(tmp_path / "data" / "train_*.bin")))  # llm.c's -i pattern (POSIX glob, as C's)
    val = sorted(glob.glob(str(tmp_path / "data" / "val_*.bin")))  # its -j pattern
    assert len(train) >= 2 and len(val) >= 1 and len(train) + len(val) == len(shards)
    for paths, split in ((train, "train"), (val, "val")):
        for p in paths:
            raw = open(p, "rb").read()
            magic, version, ntok = struct.unpack("<3i", raw[:12])
            assert (magic, version) == (20240520, 1) and len(raw) == 1024 + 2 * ntok
            rec = shards[p.rsplit("/", 1)[1]]
            assert rec["split"] == split and rec["tokens"] == ntok
            tokens = np.frombuffer(raw[1024:], dtype="<u2")
            assert tokens[0] == 50256 or split == "train"
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["totals"]["val"]["tokens"] > 0


def test_train_init_from_an_llmc_file(tmp_path, small_shards):
    model = random_model()
    reference_file(model, tmp_path / "init.bin")
    rc = cli.main(["train", "--init-from", str(tmp_path / "init.bin"), "--data", str(small_shards),
                   "--out", str(tmp_path / "run"), "--micro-batch-size", "2", "--seq-len", "16",
                   "--total-batch-size", "32", "--max-steps", "1", "--eval-every", "0", "--sample-every", "0",
                   "--hellaswag-data", "none", "--threads", "1", "--dtype", "float32", "--no-compile"])
    assert rc == 0
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["train"]["init_from"] == str(tmp_path / "init.bin")
    assert run["model"]["n_embd"] == 32 and run["model"]["vocab_size"] == 50257
