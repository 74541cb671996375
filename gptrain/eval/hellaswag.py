"""HellaSwag as the lecture scores it, batched: download/verify the validation set, render, score, count.

Rendering is the lecture's: the context's tokens, then `" " + ending` tokens for each of the 4 endings. Scoring is
completion style: `acc` picks the ending with the lowest summed loss over its tokens, `acc_norm` the lowest mean
per-token loss (ties go to the first ending, as `argmin` does). Examples are split across ranks and the counts
all-reduced, so every rank returns the full-set result. The training loop calls `evaluate` directly.

The validation file is fetched from its official location into `$GPTRAIN_CACHE/hellaswag` (default
`~/.cache/gptrain`), verified, then renamed into place; `GPTRAIN_HELLASWAG_URL` overrides the URL (a mirror, or
a loopback server in tests). Verification is structural (every line a JSON object with a `ctx` string, 4 `endings`
strings and a `label` in 0..3), the count (10,042), and CONTENT_SHA256: the sha256 of one canonical JSON line
`[ind, ctx, endings, label]` per example, in file order. It covers exactly what is scored and does not depend on
the file's JSON formatting. It was computed from a copy of the validation set stated to hold the original's content
(not a byte copy), and that copy's first example is the one the lecture quotes ("A man is sitting on a roof. he",
label 3); the original file's byte sha256 could not be checked where this was written, so none is claimed.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch

from gptrain.errors import GptrainError
from gptrain.eval.scoring import Progress, score_continuations
from gptrain.tokenizer import get_tokenizer

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILENAME = "hellaswag_val.jsonl"
N_VAL = 10042
CONTENT_SHA256 = "6ab38e72c66bb715b21c5f55686d3776cc92083833bf3030bf6a8970d7aeede4"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTRAIN_CACHE") or Path.home() / ".cache" / "gptrain") / "hellaswag"


# ---------------------------------------------------------------- reading and verifying

def parse(lines, source: str, flag: str = "--data") -> list[dict]:
    """Examples from JSONL lines, each checked for the fields the scorer reads; labels become ints. `flag` is the
    option that named the file, for the advice."""
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except ValueError:
            raise GptrainError(f"{source}:{lineno} is not valid JSON; the file is damaged or not HellaSwag JSONL") from None
        ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str) and isinstance(ex.get("endings"), list)
              and len(ex["endings"]) == 4 and all(isinstance(e, str) for e in ex["endings"])
              and str(ex.get("label")) in ("0", "1", "2", "3"))
        if not ok:
            raise GptrainError(f"{source}:{lineno} is not a HellaSwag example (needs \"ctx\": str, \"endings\": 4 strings, "
                               f"\"label\": 0..3); point {flag} at the validation JSONL (.jsonl or .jsonl.gz)")
        ex["label"] = int(ex["label"])
        examples.append(ex)
    return examples


def content_sha256(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        line = json.dumps([ex.get("ind"), ex["ctx"], ex["endings"], ex["label"]], ensure_ascii=True, separators=(",", ":"))
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def verify_official(examples: list[dict], source: str) -> None:
    """The official validation set: 10,042 examples with the known content digest."""
    if len(examples) != N_VAL:
        raise GptrainError(f"{source} holds {len(examples)} examples, expected {N_VAL}: the file is truncated or not "
                           "HellaSwag's validation split")
    digest = content_sha256(examples)
    if digest != CONTENT_SHA256:
        raise GptrainError(f"{source} has content sha256 {digest}, expected {CONTENT_SHA256}: the examples differ "
                           "from HellaSwag's validation split")


def read_jsonl(path: str | os.PathLike, flag: str = "--data") -> list[dict]:
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return parse(f, str(path), flag)
    except FileNotFoundError:
        raise GptrainError(f"{flag} {path}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise GptrainError(f"{flag} {path} cannot be read ({type(e).__name__}: {e}); is it a .jsonl or .jsonl.gz file?") from None


# ---------------------------------------------------------------- download

def download(url: str | None = None, dest: Path | None = None, progress: bool = True) -> Path:
    """Fetch the validation set into `dest` (the cache) atomically: written beside it, verified, then renamed."""
    url = url or os.environ.get("GPTRAIN_HELLASWAG_URL") or URL
    dest = dest or cache_dir() / FILENAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0)
                bar = Progress(total or 1, "downloading HellaSwag", "bytes", enabled=progress and total > 0)
                received = 0
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                if total and received != total:
                    raise GptrainError(f"downloading HellaSwag from {url} failed (the connection closed after "
                                       f"{received:,} of {total:,} bytes); nothing was cached, retry or pass --data PATH")
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            raise GptrainError(f"downloading HellaSwag from {url} failed ({reason}); check the network, set "
                               "GPTRAIN_HELLASWAG_URL to a mirror, or pass --data PATH to a local copy") from None
        with open(tmp, encoding="utf-8", errors="strict") as f:
            try:
                examples = parse(f, url)
            except UnicodeDecodeError:
                raise GptrainError(f"{url} did not return UTF-8 text; nothing was cached") from None
        try:
            verify_official(examples, url)
        except GptrainError as e:
            raise GptrainError(f"{e}; nothing was cached, retry or pass --data PATH") from None
        os.replace(tmp, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(url: str | None = None, progress: bool = False) -> Path:
    """The cached official file, downloaded first when it is not there yet."""
    cached = cache_dir() / FILENAME
    if not cached.is_file():
        download(url, cached, progress=progress)
    return cached


def load_examples(path: str | os.PathLike | None = None, limit: int | None = None, *, url: str | None = None,
                  progress: bool = False, flag: str = "--data") -> list[dict]:
    """HellaSwag validation examples: from `path` (.jsonl / .jsonl.gz, checked for structure only; named by
    option `flag`), else from the cache (downloaded on first use; verified on every read). `limit` keeps the
    first N."""
    if path is not None:
        examples = read_jsonl(path, flag)
    else:
        cached = fetch(url, progress)
        examples = read_jsonl(cached)
        try:
            verify_official(examples, str(cached))
        except GptrainError as e:
            raise GptrainError(f"{e}; delete {cached} to download it again") from None
    return examples[:limit] if limit is not None else examples


# ---------------------------------------------------------------- rendering and scoring

def render(example: dict, tokenizer=None) -> tuple[list[int], list[list[int]], int]:
    """(context tokens, the 4 endings' tokens each encoded with a leading space, label), as the lecture renders."""
    tok = tokenizer or get_tokenizer()
    return tok.encode(example["ctx"]), [tok.encode(" " + e) for e in example["endings"]], example["label"]


def predict(model, examples: list[dict], *, batch_size: int = 16, device=None, autocast: torch.dtype | None = None,
            progress: bool = False) -> list[tuple[int, int]]:
    """(prediction by summed loss, prediction by mean loss) per example; `batch_size` is examples per forward pass."""
    requests = []
    for ex in examples:
        ctx, endings, _ = render(ex)
        requests += [(ctx, end) for end in endings]
    bar = Progress(len(requests), "hellaswag", "endings", enabled=progress)
    scores = score_continuations(model, requests, batch_size=4 * batch_size, device=device, autocast=autocast,
                                 progress=bar)
    preds = []
    for i in range(0, len(scores), 4):
        four = scores[i:i + 4]
        preds.append((min(range(4), key=lambda j: four[j].nll),
                      min(range(4), key=lambda j: four[j].nll / four[j].n)))
    return preds


def evaluate(model, examples: list[dict], *, batch_size: int = 16, device=None, rank: int = 0, world_size: int = 1,
             autocast: torch.dtype | None = None, progress: bool = False) -> dict:
    """{"acc", "acc_norm", "n"} over all `examples`; each rank scores examples rank, rank+world_size, ... and the
    counts are summed across ranks when a process group is running."""
    mine = examples[rank::world_size]
    preds = predict(model, mine, batch_size=batch_size, device=device, autocast=autocast, progress=progress)
    counts = [sum(p == ex["label"] for (p, _), ex in zip(preds, mine)),
              sum(p == ex["label"] for (_, p), ex in zip(preds, mine)), len(mine)]
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        t = torch.tensor(counts, dtype=torch.long, device=dev)
        torch.distributed.all_reduce(t)
        counts = t.tolist()
    correct, correct_norm, n = counts
    if n == 0:
        raise GptrainError("HellaSwag evaluation got no examples; check --limit and the data file")
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
