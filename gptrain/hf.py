"""Hugging Face interop: the one place a `--model SRC` is resolved, and the `export` command.

`load_model(src)` reads a local transformers GPT-2 directory, a hub name already in the local HF cache (this
code never downloads: clusters are often offline), or a gptrain run/checkpoint directory. `save_pretrained`
writes a directory that `transformers.AutoModelForCausalLM` and `AutoTokenizer` load offline; it needs only
safetensors and json, so exporting does not require transformers to be installed.

HF's GPT-2 stores the four projection weights as `Conv1D` (in, out) matrices, the transpose of `nn.Linear`;
HF's vocabulary is unpadded, gptrain's embedding is padded (the padded rows are zero on import and dropped on
export, and never reach logits or loss either way).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from gptrain import llmc
from gptrain.chat.format import HF_CHAT_TEMPLATE
from gptrain.config import check_output_dir, fsync_dir
from gptrain.errors import GptrainError, disk_full, is_disk_full, require
from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import CHAT_TOKENS, ENDOFTEXT, EOT_ID, gpt2_ranks, tokenizer_for_vocab

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old HF checkpoints, not weights
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which gptrain uses
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
LLMC_FILES = ("model.bin", "tokenizer.bin", "README.txt")  # gptrain/llmc.py's export
EXPORT_FILES = frozenset(("config.json", "generation_config.json", "model.safetensors") + TOKENIZER_FILES + LLMC_FILES)
# OpenAI's GPT-2 repos moved from bare names to the openai-community organisation; a cache may hold either.
HUB_ORG = "openai-community"
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
STEP_DIR = re.compile(r"^step_\d{8,}$")  # a checkpoint directory's name (gptrain/train/checkpoint/layout.py)


# ---------------------------------------------------------------- config

def config_from_hf(hf: dict, source: str) -> GPTConfig:
    """gptrain's config for a transformers GPT2Config, refusing variants that would compute something else."""
    def need(key, ok, default=None):
        value = hf.get(key, default)
        if not ok(value):
            raise GptrainError(f"{source}: {key}={value!r} is not GPT-2 as gptrain computes it; "
                               "only standard GPT-2 checkpoints (gelu_new, eps 1e-5, tied lm_head) can be loaded")
    need("model_type", lambda v: v == "gpt2", "gpt2")
    need("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    need("layer_norm_epsilon", lambda v: v == LAYER_NORM_EPS, LAYER_NORM_EPS)
    need("n_inner", lambda v: v in (None, 4 * hf.get("n_embd", 768)))
    need("scale_attn_weights", lambda v: v is True, True)
    need("scale_attn_by_inverse_layer_idx", lambda v: v is False, False)
    need("tie_word_embeddings", lambda v: v is True, True)
    need("add_cross_attention", lambda v: v is False, False)
    vocab_size = hf.get("vocab_size", 50257)
    try:
        tokenizer_for_vocab(vocab_size)
    except GptrainError as e:
        raise GptrainError(f"{source}: vocab_size={vocab_size} is not a vocabulary gptrain can tokenize ({e})") from None
    try:
        return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=vocab_size, n_layer=hf.get("n_layer", 12),
                         n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768))
    except ValueError as e:
        raise GptrainError(f"{source}: {e}") from None


def config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict:
    """A GPT2Config for the exported model. Dropout is 0 because gptrain trains without it."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------- weights

def state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights (with or without the `transformer.` prefix) -> gptrain names, Linear layout, padded rows."""
    out = {}
    lm_head = None
    for key, t in sd.items():
        if key == "lm_head.weight":
            lm_head = t
            continue
        key = key.removeprefix("transformer.")
        if key.endswith(HF_BUFFERS):
            continue
        out["transformer." + key] = t.t() if key.endswith(CONV1D) else t
    wte = out.get("transformer.wte.weight")
    if wte is None:
        raise GptrainError(f"{source}: no wte.weight (token embedding) among its tensors; is this a GPT-2 checkpoint?")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise GptrainError(f"{source}: lm_head.weight differs from wte.weight; gptrain's GPT-2 ties them, "
                           "so an untied model cannot be loaded")
    if wte.shape[0] != config.vocab_size:
        raise GptrainError(f"{source}: wte.weight has {wte.shape[0]} rows but config.json says "
                           f"vocab_size={config.vocab_size}")
    padded = wte.new_zeros(config.padded_vocab_size, wte.shape[1])
    padded[: config.vocab_size] = wte
    out["transformer.wte.weight"] = padded
    out["lm_head.weight"] = padded
    return out


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """gptrain weights -> HF GPT2LMHeadModel names and Conv1D layout, vocabulary cut to the tokenizer's."""
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":  # tied to wte; HF re-ties it from tie_word_embeddings
            continue
        if key == "transformer.wte.weight":
            t = t[: model.config.vocab_size]
        elif key.endswith(CONV1D):
            t = t.t()
        out[key] = t.detach().to("cpu").contiguous()
    return out


def load_weights_into(config: GPTConfig, sd: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT holding these gptrain-named weights, with one-line errors for missing/extra/misshapen tensors.

    The model is built on the meta device and takes the tensors as they are (no random initialisation, no
    second copy), which matters for gpt2-xl on a CPU; weights stored in another dtype become float32."""
    with torch.device("meta"):
        model = GPT(config)
    sd = dict(sd)
    sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise GptrainError(f"{source}: tensors do not match the model's config (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); is config.json the one saved with these weights?")
    for k, t in sd.items():
        if t.shape != expected[k].shape:
            raise GptrainError(f"{source}: {k} has shape {tuple(t.shape)}, the config needs {tuple(expected[k].shape)}")
    model.load_state_dict({k: t.to(expected[k].dtype).contiguous() for k, t in sd.items()}, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign= replaced the two tied parameters separately
    return model


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(path / shard))
        return sd
    if (path / "pytorch_model.bin").is_file():
        try:  # never unpickle arbitrary objects from a file a user hands us
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise GptrainError(f"{path / 'pytorch_model.bin'} cannot be read as plain tensors "
                               f"({type(e).__name__}); convert it to model.safetensors") from None
    raise GptrainError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")


# ---------------------------------------------------------------- load_model

def load_model(src: str, device=None, flag: str = "--model") -> GPT:
    """The model named by `--model SRC`: a HF GPT-2 directory, a gptrain run or checkpoint directory, an llm.c
    model file (`.bin`, gptrain/llmc.py), or a hub name (gpt2, gpt2-medium, openai-community/gpt2, ...) already
    in the local Hugging Face cache. `flag` is how the caller's user spelled the source (`--init-from`, or
    `pretrained=` in lm-eval's model_args), so that errors name what they typed."""
    given = f"{flag}{src}" if flag.endswith("=") else f"{flag} {src}"
    path = Path(src).expanduser()
    if _is_gptrain_dir(path):
        model = _load_gptrain(path, given)
    elif path.is_dir() and (path / "config.json").is_file():
        model = _load_hf_dir(path)
    elif llmc.is_model_file(path):
        model = llmc.read_model(path)
    elif path.exists():
        raise GptrainError(f"{given}: not a Hugging Face GPT-2 directory (config.json + model.safetensors), "
                           "a gptrain run or checkpoint directory (checkpoints/ or MANIFEST.json) nor an llm.c "
                           "model file (.bin)")
    elif path.parent.is_dir() and path.parent != Path("."):  # runs/typo: a local path, not a hub name
        near = sorted(p.name for p in path.parent.iterdir() if _is_gptrain_dir(p) or (p / "config.json").is_file())
        kind = "file" if path.suffix == ".bin" else "directory"
        raise GptrainError(f"{given}: no such {kind} here ({path.absolute()})"
                           + (f"; models in {path.parent}/: {', '.join(near[:8])}" if near else ""))
    elif HUB_NAME.match(src):
        if importlib.util.find_spec("huggingface_hub") is None:  # most likely a mistyped path, not a hub name
            raise GptrainError(f"{given}: no such directory here ({path.absolute()}); if it names a hub model, "
                               "reading it from the local Hugging Face cache needs: pip install 'gptrain[hf]'")
        model = _load_hf_dir(_hub_snapshot(src, given))
    else:
        raise GptrainError(f"{given}: no such directory")
    return model.to(device) if device is not None else model


def _load_hf_dir(path: Path) -> GPT:
    cfg_path = path / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise GptrainError(f"{cfg_path} is not readable JSON ({e})") from None
    config = config_from_hf(hf, str(cfg_path))
    sd = state_dict_from_hf(_read_hf_weights(path), config, str(path))
    return load_weights_into(config, sd, str(path))


def _is_gptrain_dir(path: Path) -> bool:
    """A run directory, its checkpoints/ folder, or one checkpoint (complete or not: find_checkpoint says why)."""
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "MANIFEST.json").exists()
                              or path.name == "checkpoints" or STEP_DIR.match(path.name) is not None)


def _load_gptrain(path: Path, given: str) -> GPT:
    from gptrain.train.checkpoint import find_checkpoint, load_model_weights
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise GptrainError(f"{given}: this run has no valid checkpoint under checkpoints/ yet")
    config, sd, _meta = load_model_weights(ckpt)
    return load_weights_into(config, sd, str(ckpt))


def _hub_snapshot(name: str, given: str) -> Path:
    """The cached snapshot directory of hub model `name`; never touches the network."""
    hub = require("huggingface_hub", f"loading the hub model {name!r} from the local Hugging Face cache")
    repo, _, short = name.rpartition("/")
    openai = short in OPENAI_MODELS and repo in ("", HUB_ORG)
    candidates = [f"{HUB_ORG}/{short}", short] if openai else [name]
    for repo_id in candidates:
        try:
            return Path(hub.snapshot_download(repo_id, local_files_only=True))
        except hub.errors.LocalEntryNotFoundError:
            continue
    raise GptrainError(
        f"{given}: no such directory here ({Path(name).absolute()}), nor a hub model in the Hugging Face "
        f"cache {hub.constants.HF_HUB_CACHE}; for a run or an exported model check the path, for a hub model run "
        f"`hf download {candidates[0]}` on a machine with internet and copy the cache (gptrain never downloads)")


# ---------------------------------------------------------------- tokenizer files

@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by vocab.json and merges.txt: printable Latin-1
    bytes stand for themselves, the other 68 bytes take the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + i)
    return dict(sorted(mapping.items()))


def _text(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def bpe_merges() -> list[tuple[bytes, bytes]]:
    """The merge list implied by the ranks: token of rank r is the merge of the two pieces that byte-pair encoding
    with only the ranks below r leaves of it (tiktoken keeps ranks, HF's tokenizer wants merges)."""
    ranks = gpt2_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
            if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        assert len(parts) == 2, f"token of rank {rank} is not a merge of two lower-ranked tokens"
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_files(vocab_size: int, block_size: int) -> dict[str, str]:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for the model's vocabulary, made
    from the shipped ranks (so they match gptrain's tokenizer id for id)."""
    tok = tokenizer_for_vocab(vocab_size)
    vocab = {_text(token): rank for token, rank in sorted(gpt2_ranks().items(), key=lambda kv: kv[1])}
    vocab[ENDOFTEXT] = EOT_ID
    merges = "#version: 0.2\n" + "".join(f"{_text(a)} {_text(b)}\n" for a, b in bpe_merges())
    extra = [t for t in CHAT_TOKENS if t in tok.special_tokens]
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True}
             for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    specials = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    if extra:
        specials["additional_special_tokens"] = extra
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
              "errors": "replace", "clean_up_tokenization_spaces": False, **specials, "added_tokens_decoder": added}
    if extra:  # a chat model: its format as a chat template, for transformers, vLLM and TGI
        config["chat_template"] = HF_CHAT_TEMPLATE
    dump = lambda obj: json.dumps(obj, ensure_ascii=False, indent=2) + "\n"  # noqa: E731
    return {"vocab.json": dump(vocab), "merges.txt": merges, "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(specials)}


# ---------------------------------------------------------------- save_pretrained

def _entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def _is_export(names: set[str]) -> bool:
    """Whether a directory holding these names is (at most) a previous export, which may be replaced."""
    return names <= EXPORT_FILES


def save_pretrained(model: GPT, out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write a transformers directory (config, weights with the vocabulary cut to the tokenizer's, generation
    config, tokenizer files) atomically (`write_export_dir`)."""
    from safetensors.torch import save_file
    config = model.config
    tok = tokenizer_for_vocab(config.vocab_size)
    weights = state_dict_to_hf(model)
    dtype = weights["transformer.wte.weight"].dtype
    eos = [EOT_ID] + ([tok.special_tokens["<|end|>"]] if "<|end|>" in tok.special_tokens else [])
    generation = {"bos_token_id": EOT_ID, "eos_token_id": eos if len(eos) > 1 else EOT_ID, "pad_token_id": EOT_ID}
    texts = {"config.json": json.dumps(config_to_hf(config, dtype), indent=2) + "\n",
             "generation_config.json": json.dumps(generation, indent=2) + "\n",
             **tokenizer_files(config.vocab_size, config.block_size)}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        # safetensors creates its file owner-only; give it the mode the user's umask gives the others
        os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)

    needed = sum(t.numel() * t.element_size() for t in weights.values()) + sum(map(len, texts.values()))
    return write_export_dir(out_dir, write, needed, force)


def write_export_dir(out_dir: str | os.PathLike, write: Callable[[Path], None], needed: int,
                     force: bool = False) -> list[Path]:
    """Fill a directory atomically: `write(tmp)` fills a temp directory beside `out_dir`, which is fsynced and
    renamed into place. An existing non-empty directory is replaced only if it holds nothing but a previous
    export's files (either format), or with `force`; the old one is kept until the new one is in place."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise GptrainError(f"--out {out} is a file, not a directory")
    if _is_gptrain_dir(out):
        raise GptrainError(f"--out {out} holds gptrain checkpoints; export into another directory")
    if out.is_dir() and not force and not _is_export(_entries(out)):
        raise GptrainError(f"--out {out} is a non-empty directory that is not a gptrain export; "
                           "pick another directory or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if out.exists():  # keep the old directory until the new one is in place
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except Exception as e:  # safetensors wraps a full disk in its own exception type
        if is_disk_full(e, out.parent, needed):
            raise disk_full(out.parent, needed, f"the export {out.name}",
                            "nothing was replaced (an earlier export there is intact); free space there (or choose "
                            "another --out) and run the same command again") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.iterdir())


# ---------------------------------------------------------------- the `export` command

def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="HF GPT-2 directory, gptrain run or checkpoint directory, llm.c model .bin, or hub name "
                             "in the local HF cache")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (created atomically)")
    parser.add_argument("--format", choices=("hf", "llmc"), default="hf",
                        help="hf: a transformers directory; llmc: llm.c's model.bin + tokenizer.bin (default: hf)")
    parser.add_argument("--dtype", choices=tuple(llmc.VERSION_OF),
                        help="llm.c model file precision: float32 (version 3) or bfloat16 (version 5, what "
                             "train_gpt2cu reads) (default: float32; --format llmc only)")
    parser.add_argument("--force", action="store_true", help="replace DIR even if it holds files other than an export")


def main(args) -> int:
    check_output_dir(args.out, "--out")
    if args.dtype and args.format != "llmc":
        raise GptrainError(f"--dtype {args.dtype} applies to --format llmc; a Hugging Face export keeps the "
                           "model's float32 weights")
    model = load_model(args.model)
    out = Path(args.out).expanduser()
    previous = _entries(out)  # what the export replaces, said below
    if args.format == "llmc":
        files = llmc.export(model, out, args.dtype or "float32", force=args.force)
    else:
        files = save_pretrained(model, out, force=args.force)
    replaced = ("" if not previous else ", replacing the previous export there" if _is_export(previous)
                else ", replacing what it held before (--force)")
    print(f"exported {args.model} ({model.num_params(padded=False):,} parameters, vocabulary "
          f"{model.config.vocab_size}) to {Path(args.out)}{replaced}:")
    for p in files:
        print(f"  {p.name:<24} {p.stat().st_size:>14,} bytes")
    if args.format == "llmc":
        print(f"llm.c reads it: {Path(args.out) / 'README.txt'} says which programs, with which flags")
    else:
        print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r}) "
              "and AutoTokenizer.from_pretrained(...)")
    return 0
