"""llm.c interchange: its model file, tokenizer file and training log, so a run moves between the two trainers.

Formats as llm.c's own sources define them (karpathy/llm.c: `train_gpt2.py` writes them, `train_gpt2.c`,
`train_gpt2.cu`, `llmc/tokenizer.h` and `llmc/logger.h` read and write them):

- model file (`gpt2_124M.bin`, `model_NNNNNNNN.bin`): 256 little-endian int32 (magic 20240326, version, max T,
  V, layers, heads, channels, padded V, zeros), then every parameter in one dtype, version 3 float32 and 5
  bfloat16. Order: wte (padded V rows, those past V zero), wpe, then each per-layer kind for all layers in turn
  (ln_1 w/b, c_attn w/b, attn c_proj w/b, ln_2 w/b, c_fc w/b, mlp c_proj w/b), then ln_f w/b; matrices in
  nn.Linear's (out, in) layout, which is gptrain's, so nothing is transposed. The LM head is wte (tied).
- tokenizer file (`gpt2_tokenizer.bin`): 256 int32 (magic 20240328, version 2, number of tokens, end-of-text id),
  then per token id a length byte and that many bytes.
- `main.log` (`-o DIR` of the CUDA trainer): `s:STEP trl:LOSS lr:LR norm:NORM`, `s:STEP tel:VAL`,
  `s:STEP eval:HELLASWAG_ACC_NORM`. The CPU trainer `train_gpt2.c` writes no log file; its printed lines
  (`step N: train loss X`, `val loss X`) are read too, as are train_gpt2.cu's (`step  N/M | loss X ...`).

A chat model (vocabulary 50261) is written as it is: llm.c takes V from the header, so its four extra rows lie
inside the padded rows and the tokenizer file lists the four tokens; llm.c trains and samples it like any model
(its data and its samples simply never contain those ids unless the shards do).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from gptrain.errors import GptrainError
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import gpt2_ranks, tokenizer_for_vocab

MODEL_MAGIC = 20240326
TOKENIZER_MAGIC = 20240328
OTHER_MAGICS = {20240327: "an llm.c debug state file", 20240328: "an llm.c tokenizer file",
                20240520: "an llm.c token shard (data)"}
VERSIONS = {3: torch.float32, 5: torch.bfloat16}  # llm.c model file version -> parameter dtype
VERSION_OF = {"float32": 3, "bfloat16": 5}
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
PAD_MULTIPLE = 128  # llm.c pads the vocabulary rows to this (50257 -> 50304)
LAYER_KINDS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")


def padded_vocab(vocab_size: int) -> int:
    return math.ceil(vocab_size / PAD_MULTIPLE) * PAD_MULTIPLE


def tensor_names(n_layer: int) -> list[str]:
    """gptrain's state-dict names in the order llm.c stores them."""
    return (["transformer.wte.weight", "transformer.wpe.weight"]
            + [f"transformer.h.{i}.{kind}" for kind in LAYER_KINDS for i in range(n_layer)]
            + ["transformer.ln_f.weight", "transformer.ln_f.bias"])


def tensor_shapes(config: GPTConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    C = config.n_embd
    per_layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
                 "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
                 "mlp.c_proj.bias": (C,)}
    ends = {"transformer.wte.weight": (vocab_rows, C), "transformer.wpe.weight": (config.block_size, C),
            "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    return {name: ends[name] if name in ends else per_layer[name.split(".", 3)[3]]
            for name in tensor_names(config.n_layer)}


# ---------------------------------------------------------------- model file

def model_header(config: GPTConfig, version: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (MODEL_MAGIC, version, config.block_size, config.vocab_size, config.n_layer, config.n_head,
                  config.n_embd, padded_vocab(config.vocab_size))
    return header


def write_model(model: GPT, path: str | Path, dtype: str = "float32") -> None:
    """llm.c's model file of `model`: version 3 (float32) or 5 (bfloat16, rounded to nearest even by torch's
    conversion), vocabulary rows padded with zeros to a multiple of 128. Written tensor by tensor."""
    config = model.config
    sd = model.state_dict()
    with open(path, "wb") as f:
        f.write(model_header(config, VERSION_OF[dtype]).tobytes())
        for name in tensor_names(config.n_layer):
            t = sd[name].detach().to("cpu", torch.float32)
            if name == "transformer.wte.weight":
                t = torch.cat([t[: config.vocab_size],
                               t.new_zeros(padded_vocab(config.vocab_size) - config.vocab_size, t.shape[1])])
            if dtype == "bfloat16":
                t = t.to(torch.bfloat16).view(torch.int16)
            f.write(t.contiguous().numpy().tobytes())


def read_model(path: str | Path) -> GPT:
    """A GPT from an llm.c model file (version 3 or 5; llm.c's own `model_NNNNNNNN.bin` checkpoints included).
    Anything malformed is one GptrainError line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            if len(raw) < HEADER_BYTES:
                raise GptrainError(f"{path}: truncated: {size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header")
            header = np.frombuffer(raw, dtype="<i4")
            config, dtype, vocab_rows = _parse_header(header, path)
            shapes = tensor_shapes(config, vocab_rows)
            itemsize = torch.empty(0, dtype=dtype).element_size()
            expected = HEADER_BYTES + itemsize * sum(math.prod(s) for s in shapes.values())
            if size != expected:
                what = "truncated" if size < expected else "longer than its header says"
                raise GptrainError(
                    f"{path}: {what}: {size:,} bytes, but its header (version {header[1]}, {config.n_layer} layers, "
                    f"{config.n_embd} channels, context {config.block_size}, vocabulary {config.vocab_size} padded to "
                    f"{vocab_rows}) needs {expected:,}")
            sd = {name: _read_tensor(f, shape, dtype, path) for name, shape in shapes.items()}
    except OSError as e:
        raise GptrainError(f"{path}: cannot be read ({e.strerror or e})") from None
    wte = torch.zeros(config.padded_vocab_size, config.n_embd)
    wte[: config.vocab_size] = sd["transformer.wte.weight"][: config.vocab_size]
    sd["transformer.wte.weight"] = wte
    from gptrain.hf import load_weights_into
    return load_weights_into(config, sd, str(path))


def _parse_header(header: np.ndarray, path: Path) -> tuple[GPTConfig, torch.dtype, int]:
    magic, version, max_t, vocab, layers, heads, channels, vocab_rows = (int(v) for v in header[:8])
    if magic != MODEL_MAGIC:
        known = OTHER_MAGICS.get(magic, "not an llm.c model file")
        raise GptrainError(f"{path}: wrong magic number {magic} ({known}); an llm.c model file starts with "
                           f"{MODEL_MAGIC}")
    if version not in VERSIONS:
        raise GptrainError(f"{path}: unknown llm.c model version {version}; gptrain reads version 3 (float32) and 5 "
                           "(bfloat16), the versions llm.c's train_gpt2.py and train_gpt2.cu write")
    if min(max_t, vocab, layers, heads, channels) <= 0 or vocab_rows < vocab:
        raise GptrainError(f"{path}: header does not describe a model (context {max_t}, vocabulary {vocab} padded to "
                           f"{vocab_rows}, {layers} layers, {heads} heads, {channels} channels)")
    try:
        tokenizer_for_vocab(vocab)
        config = GPTConfig(block_size=max_t, vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=channels)
    except (GptrainError, ValueError) as e:
        raise GptrainError(f"{path}: {e}") from None
    return config, VERSIONS[version], vocab_rows


def _read_tensor(f, shape: tuple[int, ...], dtype: torch.dtype, path: Path) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    if f.readinto(memoryview(t.numpy()).cast("B")) != t.numel() * t.element_size():
        raise GptrainError(f"{path}: truncated while reading (the file changed while it was read?)")
    return t.view(torch.bfloat16).float() if dtype == torch.bfloat16 else t


def is_model_file(path: Path) -> bool:
    """Whether `--model path` should be read as an llm.c file: a `.bin` file (its magic is checked on reading)."""
    return path.is_file() and path.suffix == ".bin"


# ---------------------------------------------------------------- tokenizer file

def token_bytes(vocab_size: int) -> list[bytes]:
    """Each id's bytes for the vocabulary gptrain reads with `vocab_size` ids (special tokens as their text)."""
    tok = tokenizer_for_vocab(vocab_size)
    table: list[bytes | None] = [None] * vocab_size
    for b, rank in gpt2_ranks().items():
        table[rank] = b
    for text, i in tok.special_tokens.items():
        table[i] = text.encode()
    assert all(table), "every id of the vocabulary has bytes"
    return table


def write_tokenizer(path: str | Path, vocab_size: int) -> None:
    """llm.c's tokenizer file, version 2 (with the end-of-text id), for the model's vocabulary."""
    tok = tokenizer_for_vocab(vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (TOKENIZER_MAGIC, 2, vocab_size, tok.eot)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for b in token_bytes(vocab_size):
            f.write(bytes([len(b)]) + b)


# ---------------------------------------------------------------- export

def readme(config: GPTConfig, dtype: str) -> str:
    version = VERSION_OF[dtype]
    build = ("make train_gpt2cu (bfloat16, the default build)" if dtype == "bfloat16"
             else "make train_gpt2fp32cu (CUDA, float32) or make train_gpt2 test_gpt2 (CPU)")
    return f"""Written by gptrain export --format llmc for llm.c (https://github.com/karpathy/llm.c).

model.bin      llm.c model file, version {version} ({dtype}): {config.n_layer} layers, {config.n_head} heads,
               {config.n_embd} channels, context {config.block_size}, vocabulary {config.vocab_size} padded to
               {padded_vocab(config.vocab_size)} rows (the extra rows zero).
tokenizer.bin  llm.c tokenizer file, version 2, {config.vocab_size} tokens, end-of-text id 50256.

Which llm.c programs read them (build: {build}):
  ./train_gpt2cu (version 5) or ./train_gpt2fp32cu (version 3) -e /path/to/model.bin
      -i 'DATA/train_*.bin' -j 'DATA/val_*.bin' -o LOGDIR   (DATA: a `gptrain prepare` directory)
  ./train_gpt2 and ./test_gpt2 (CPU, version 3 only) read gpt2_124M.bin from their working directory:
      ln -s /path/to/model.bin gpt2_124M.bin
  all of them look for the tokenizer as gpt2_tokenizer.bin in the working directory:
      ln -s /path/to/tokenizer.bin gpt2_tokenizer.bin
Back into gptrain: gptrain sample --model LOGDIR/model_00001000.bin (or this model.bin), and
  gptrain report RUN --compare LOGDIR/main.log --compare-tokens-per-step N to overlay the two runs' losses.
"""


def export(model: GPT, out: Path, dtype: str, force: bool = False) -> list[Path]:
    from gptrain.hf import write_export_dir
    config = model.config

    def write(tmp: Path) -> None:
        write_model(model, tmp / "model.bin", dtype)
        write_tokenizer(tmp / "tokenizer.bin", config.vocab_size)
        (tmp / "README.txt").write_text(readme(config, dtype), encoding="utf-8")

    item = 2 if dtype == "bfloat16" else 4
    needed = HEADER_BYTES + item * sum(math.prod(s) for s in tensor_shapes(config, padded_vocab(config.vocab_size))
                                       .values())
    return write_export_dir(out, write, needed, force)


# ---------------------------------------------------------------- logs

LOG_KEYS = {"trl": "train_loss", "tel": "val_loss", "eval": "hellaswag_acc_norm", "lr": "lr", "norm": "grad_norm"}
TRAIN_KEYS = {"train_loss", "lr", "grad_norm"}
MAIN_LOG_LINE = re.compile(r"^s:(\d+)((?:\s+\w+:\S+)+)\s*$")
C_STEP = re.compile(r"^step (\d+): train loss (\S+)")  # train_gpt2.c
CU_STEP = re.compile(r"^step\s+(\d+)/\d+ \| loss (\S+) .*?\| norm (\S+) .*?\| lr (\S+) ")  # train_gpt2.cu, 1-based
VAL = re.compile(r"^val loss (\S+)")
HELLASWAG = re.compile(r"^HellaSwag: \d+/\d+ = (\S+)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_log(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records, eval records), each step -> {gptrain metric name: value}, from llm.c's main.log or the
    printed output of train_gpt2.c / train_gpt2.cu. A printed val loss or HellaSwag belongs to the step about to
    run (they print it before that step's update, as the log does). Later records of a step win (a resumed run)."""
    path = Path(path)
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    next_step = 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise GptrainError(f"{path}: cannot be read ({e.strerror or e})") from None
    for line in lines:
        line = line.strip()
        if m := MAIN_LOG_LINE.match(line):
            step = int(m[1])
            rec = {}
            for pair in m[2].split():
                key, _, value = pair.partition(":")
                if (v := _number(value)) is not None:
                    rec[LOG_KEYS.get(key, key)] = v
            for k, v in rec.items():
                (train if k in TRAIN_KEYS else evals).setdefault(step, {})[k] = v
        elif m := C_STEP.match(line):
            next_step = int(m[1]) + 1
            train[next_step - 1] = {"train_loss": _number(m[2])}
        elif m := CU_STEP.match(line):
            next_step = int(m[1])
            train[next_step - 1] = {"train_loss": _number(m[2]), "grad_norm": _number(m[3]), "lr": _number(m[4])}
        elif m := VAL.match(line):
            evals.setdefault(next_step, {})["val_loss"] = _number(m[1])
        elif m := HELLASWAG.match(line):
            evals.setdefault(next_step, {})["hellaswag_acc_norm"] = _number(m[1])
    if not train and not evals:
        raise GptrainError(f"{path}: no llm.c log lines in it (main.log's `s:STEP trl:LOSS`, or train_gpt2's "
                           "printed `step N: train loss X`); pass llm.c's main.log (its -o directory) or a gptrain run")
    return train, evals


def log_file(path: Path) -> Path | None:
    """The llm.c log that `path` names (the file itself, or an llm.c -o directory's main.log); None for anything
    else (a gptrain run directory has metrics.jsonl)."""
    if path.is_file():
        return path
    if path.is_dir() and not (path / "metrics.jsonl").exists() and (path / "main.log").is_file():
        return path / "main.log"
    return None
