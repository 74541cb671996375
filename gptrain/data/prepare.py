"""`gptrain prepare SOURCE --out DIR`: tokenize a corpus into verified llm.c shards plus `DIR/manifest.json`.

Layout of the output. Documents are read in source order; each is written as `<|endoftext|>` followed by its tokens
(a file or record without text is no document: it is skipped, and counted). The first documents, until they hold at
least `--val-tokens` tokens, form the validation split; every later document is train. A document that would take
the split past twice its size (one long book, the usual first try) is cut instead, after the last line that fits:
its start completes the validation split and the rest, as a document of its own, begins train. The rule depends only
on the source order and the text, so a longer prepare of the same source keeps the same validation set, and the two
splits never share text. For local files the default size is 10% of the corpus (estimated from its bytes), at most
10M tokens, so a small corpus is not swallowed by validation. Shards close at a document boundary: a shard holds
whole documents up to `--shard-tokens`, and a document longer than that gets a shard of its own.

Resume. A finished shard is written to a temp file, fsynced and renamed, then the manifest records it together
with the number of source documents consumed so far (and where the cut document was cut). Re-running the same
command skips those documents and continues with the next shard; finished shards are verified, never rewritten.
The manifest says `"complete": true` only after the last shard of a prepare that succeeded. `--max-tokens` stops early (at a
document boundary); a later run with a larger `--max-tokens` extends the same directory.

Speed. Worker processes receive batches of documents (about 1 MB of text each) and return one flat uint16 array
per batch, encoded straight into numpy buffers by tiktoken; the lecture's approach (one task per document, a
Python list per document, converted to numpy) spends much of its time on per-document overhead instead.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from gptrain.config import add_dataclass_args, check_output_dir, overrides_from_args, validate, write_json_atomic
from gptrain.data.loader import read_manifest_json
from gptrain.data.shards import file_sha256, write_shard
from gptrain.data.sources import Source, resolve_source
from gptrain.errors import GptrainError
from gptrain.tokenizer import get_tokenizer

MANIFEST = "manifest.json"
FORMAT = "gptrain-shards/1"
BATCH_CHARS = 1 << 20  # text per worker task: large enough to amortise IPC, small enough to keep workers busy
# Known sizes (GPT-2 tokens) of the FineWeb samples, for the ETA only.
KNOWN_TOKENS = {"sample-10BT": 10_000_000_000, "sample-100BT": 100_000_000_000, "sample-350BT": 350_000_000_000}


@dataclass
class PrepareConfig:
    out: str = field(default="", metadata={"help": "output directory for shards and manifest.json (required)",
                                           "required": True})
    split: str = field(default="train", metadata={"help": "dataset split to read (hub sources)"})
    text_field: str = field(default="text", metadata={"help": "field/column holding the text (hub, .jsonl, .parquet)"})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per shard (shards close at a document boundary)",
                                                             "ge": 1, "le": 2**31 - 1})
    val_tokens: int | None = field(default=None, metadata={
        "help": "the first documents of the source, up to this many tokens, form the validation split "
                "(none: 100M for fineweb/fineweb-edu, as the lecture's val shard; 100k for shakespeare; 10M for "
                "other hub datasets; for local files a tenth of the corpus, at most 10M)", "ge": 0})
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many tokens (val + train)", "ge": 1})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0: one per CPU core)", "ge": 0, "le": 256})
    start_method: str | None = field(default=None, metadata={
        "help": "multiprocessing start method (none: the platform's default)", "choices": [None, "spawn", "fork", "forkserver"]})


BYTES_PER_TOKEN = 4  # GPT-2 tokens of English text, roughly; only sizes the default validation split of local files
VAL_FRACTION = 0.1


def default_val_tokens(source: Source) -> int:
    if source.kind == "shakespeare":
        return 100_000
    if source.kind == "hub" and source.params["path"].startswith("HuggingFaceFW/"):
        return 100_000_000
    return 10_000_000


def choose_val_tokens(source: Source, requested: int | None) -> tuple[int, str]:
    """The validation split's size and how it was chosen (printed, and kept in the manifest)."""
    if requested is not None:
        return requested, "--val-tokens"
    default = default_val_tokens(source)
    size = source.text_bytes()
    if size is None:
        return default, f"the default for {source.kind} sources"
    estimate = size // BYTES_PER_TOKEN
    if estimate * VAL_FRACTION >= default:
        return default, f"the default for local files (10% of the corpus's ~{estimate:,} tokens is more)"
    return max(1, int(estimate * VAL_FRACTION)), (f"10% of the corpus's ~{estimate:,} tokens ({size:,} bytes / "
                                                  f"{BYTES_PER_TOKEN}); --val-tokens N to choose")


def _line_end_table() -> np.ndarray:
    """For every token id: does its text end a line? Where a long document may be cut."""
    tok = get_tokenizer()
    table = np.zeros(tok.n_vocab, dtype=np.bool_)
    for i in range(tok.n_vocab):
        if i != tok.eot and tok.enc.decode_single_token_bytes(i).endswith(b"\n"):
            table[i] = True
    return table


def cut_point(tokens: np.ndarray, budget: int, line_ends: np.ndarray) -> int:
    """Where to cut an `<|endoftext|>`-led document so its first part holds about `budget` tokens: after the last
    line end within the budget, else after the first one past it, else at the budget. Both parts keep text."""
    n = len(tokens)
    k = min(max(budget, 2), n - 1)
    ends = np.flatnonzero(line_ends[tokens[1:n - 1]]) + 2  # cutting at k keeps tokens[:k]; tokens[k - 1] ends a line
    before, after = ends[ends <= k], ends[ends > k]
    return int(before[-1]) if len(before) else int(after[0]) if len(after) else k


def has_text(text: str) -> bool:
    """An empty or whitespace-only file or record is not a document: as one it would be an `<|endoftext|>` alone."""
    return bool(text) and not text.isspace()


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Worker task: documents -> (flat uint16 tokens, each document `<|endoftext|>`-prefixed; per-document lengths).
    A document without text gets no tokens at all (length 0), so prepare can skip it and still count it as read.

    `encode_to_numpy` with no special tokens allowed or checked is tiktoken's ordinary encoding, written into a
    buffer instead of a Python list (tests compare it with `encode_ordinary`)."""
    tok = get_tokenizer()
    parts = [tok.enc.encode_to_numpy(t, disallowed_special=()) if has_text(t) else None for t in texts]
    lengths = np.fromiter((0 if p is None else len(p) + 1 for p in parts), dtype=np.int64, count=len(parts))
    flat = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for p in parts:
        if p is None:
            continue
        flat[pos] = tok.eot
        flat[pos + 1:pos + 1 + len(p)] = p
        pos += len(p) + 1
    return flat, lengths


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(docs: Iterator[str], workers: int, start_method: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in source order. At most a few batches are in flight, so a streamed source is never
    read ahead into memory (Pool.imap would consume the whole input iterator)."""
    if workers == 1:
        yield from map(encode_texts, _batches(docs))
        return
    ctx = multiprocessing.get_context(start_method)
    with ctx.Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for batch in _batches(docs):
            pending.append(pool.apply_async(encode_texts, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """One status line on stderr: tokens, tokens/s and, when the total is known, an ETA."""

    def __init__(self, expected: int | None, done: int):
        self.expected, self.start_tokens = expected, done
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, tokens: int, shards: int, final: bool = False):
        now = time.time()
        if not final and now - self.last < (0.5 if self.tty else 10):
            return
        self.last = now
        rate = (tokens - self.start_tokens) / max(now - self.t0, 1e-9)
        eta = ""
        if self.expected and rate > 0:
            eta = f" | ETA {_fmt_time(max(self.expected - tokens, 0) / rate)}"
        line = f"prepare: {_amount(tokens)} tokens, {_count(shards, 'shard')} | {_amount(rate)} tokens/s{eta}"
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def _amount(n: float) -> str:
    """736, 12.3K, 4.5M, 10.0B: short, and exact while small."""
    if round(n) < 1000:
        return f"{n:.0f}"
    for unit in "KM":
        n /= 1000
        if round(n, 1) < 1000:
            return f"{n:,.1f}{unit}"
    return f"{n / 1000:,.1f}B"


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _identity(source: Source, cfg: PrepareConfig, val_tokens: int) -> dict:  # what resuming must match
    tok = get_tokenizer()
    return {"source": {"kind": source.kind, **source.params},
            "tokenizer": {"name": tok.name, "sha256": tok.sha256},
            "shard_tokens": cfg.shard_tokens, "val_tokens": val_tokens}


def _totals(shards: list[dict]) -> dict:
    """Shards, tokens, documents and (when every shard records it: not in data prepared before bits per byte)
    the UTF-8 bytes of the text, per split and in all."""
    totals = {s: {"shards": 0, "tokens": 0, "documents": 0} for s in ("train", "val")}
    for split, t in totals.items():
        mine = [sh for sh in shards if sh["split"] == split]
        if all("bytes" in sh for sh in mine):
            t["bytes"] = sum(sh["bytes"] for sh in mine)
    for sh in shards:
        t = totals[sh["split"]]
        t["shards"] += 1
        t["tokens"] += sh["tokens"]
        t["documents"] += sh["documents"]
    totals["tokens"] = totals["train"]["tokens"] + totals["val"]["tokens"]
    totals["documents"] = totals["train"]["documents"] + totals["val"]["documents"]
    return totals


def _resume(out: Path, identity: dict) -> dict | None:
    """The existing manifest if it is a prepare of the same source and settings, its shards verified."""
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = read_manifest_json(path)
    for key, want in identity.items():
        if manifest.get(key) != want:
            raise GptrainError(f"{path} records a prepare with a different {key} ({manifest.get(key)}, now {want}); "
                               "use another --out directory, or the original arguments to continue it")
    for sh in manifest["shards"]:
        shard = out / sh["path"]
        if not shard.exists() or file_sha256(shard) != sh["sha256"]:
            raise GptrainError(f"shard {shard} is missing or differs from {path}; move {out} aside and prepare again")
    return manifest


def prepare(source_spec: list[str] | str, cfg: PrepareConfig, progress: bool = True) -> dict:
    """Run (or continue) a prepare; returns the manifest."""
    if not cfg.out:
        raise GptrainError("prepare needs --out DIR, the directory for shards and manifest.json")
    validate(cfg)
    check_output_dir(cfg.out, "--out")
    source = resolve_source(source_spec, split=cfg.split, text_field=cfg.text_field)
    val_target, val_rule = choose_val_tokens(source, cfg.val_tokens)
    out = Path(cfg.out)  # created with the first shard: a source without text leaves nothing behind
    identity = _identity(source, cfg, val_target)
    manifest = _resume(out, identity) or {"format": FORMAT, **identity, "val_rule": val_rule, "spec": source_spec,
                                          "documents_read": 0, "documents_skipped": 0, "complete": False,
                                          "shards": []}
    manifest["totals"] = _totals(manifest["shards"])
    total = manifest["totals"]["tokens"]
    if manifest["complete"] or (cfg.max_tokens is not None and total >= cfg.max_tokens):
        print(f"prepare: {out} is already {'complete' if manifest['complete'] else 'at --max-tokens'} "
              f"({total:,} tokens in {len(manifest['shards'])} shards)", file=sys.stderr)
        return manifest

    workers = cfg.workers or os.cpu_count() or 1
    expected = cfg.max_tokens or KNOWN_TOKENS.get(source.params.get("config") or "")
    bar = _Progress(expected if progress else None, total)
    counts = {s: manifest["totals"][s]["shards"] for s in ("train", "val")}
    val_tokens = manifest["totals"]["val"]["tokens"]
    docs_read = manifest["documents_read"]
    skipped = manifest.get("documents_skipped", 0)  # read, but without text
    buf: list[np.ndarray] = []
    buf_tokens, buf_split = 0, None
    line_ends = None  # built when a document has to be cut
    text_bytes = get_tokenizer().token_bytes  # UTF-8 bytes of the text behind each token (bits per byte)

    def flush():
        nonlocal buf, buf_tokens
        tokens = np.concatenate(buf)
        name = f"{buf_split}_{counts[buf_split]:06d}.bin"
        out.mkdir(parents=True, exist_ok=True)
        sha = write_shard(out / name, tokens)
        manifest["shards"].append({"path": name, "split": buf_split, "tokens": len(tokens), "documents": len(buf),
                                   "bytes": int(text_bytes[tokens].sum()), "sha256": sha})
        counts[buf_split] += 1
        manifest["documents_read"], manifest["documents_skipped"] = docs_read, skipped
        manifest["totals"] = _totals(manifest["shards"])
        write_json_atomic(out / MANIFEST, manifest)
        buf, buf_tokens = [], 0

    def add(doc: np.ndarray, split: str):
        nonlocal buf_tokens, buf_split, total, val_tokens
        if buf and (split != buf_split or buf_tokens + len(doc) > cfg.shard_tokens):
            flush()
        buf.append(doc)
        buf_tokens += len(doc)
        buf_split = split
        total += len(doc)
        if split == "val":
            val_tokens += len(doc)

    stopped = False
    for flat, lengths in _encoded(source.documents(skip=docs_read), workers, cfg.start_method):
        ends = np.cumsum(lengths)
        for end, n in zip(ends.tolist(), lengths.tolist()):
            if n == 0:
                docs_read += 1
                skipped += 1
                continue
            doc = flat[end - n:end]
            cut = manifest.get("val_cut")  # once a document was cut, validation is complete
            if cut is not None and cut["document"] == docs_read:  # resuming right after the cut: its start is val
                add(np.concatenate([doc[:1], doc[cut["tokens"]:]]), "train")
            elif cut is None and val_tokens < val_target and val_tokens + n > 2 * val_target and n > 2:
                line_ends = _line_end_table() if line_ends is None else line_ends
                k = cut_point(doc, val_target - val_tokens, line_ends)
                add(doc[:k], "val")
                manifest["val_cut"] = {"document": docs_read, "tokens": k}  # saved with the shard holding doc[:k]
                add(np.concatenate([doc[:1], doc[k:]]), "train")
            else:
                add(doc, "val" if cut is None and val_tokens < val_target else "train")
            docs_read += 1
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                stopped = True
                break
        if progress:
            bar.update(total, len(manifest["shards"]))
        if stopped:
            break
    if buf:
        flush()
    if total == 0:  # nothing was written (the directory is created with the first shard)
        raise GptrainError(_no_text(source, source_spec, docs_read))
    if manifest["totals"]["train"]["tokens"] == 0:  # before "complete" is written: this prepare failed
        if stopped:
            raise GptrainError(f"--max-tokens {cfg.max_tokens:,} ends inside the validation split ({val_target:,} "
                               f"tokens); run again with a larger --max-tokens to continue into train")
        size = (f"--val-tokens {val_target:,}" if manifest.get("val_rule") == "--val-tokens" else
                f"its default size, {val_target:,} tokens")
        raise GptrainError(f"all {total:,} tokens of {source_spec} went to the validation split ({size}); run again "
                           "into a new --out directory with a smaller --val-tokens")
    manifest["documents_read"], manifest["documents_skipped"] = docs_read, skipped
    manifest["complete"] = not stopped
    write_json_atomic(out / MANIFEST, manifest)
    if progress:
        bar.update(total, len(manifest["shards"]), final=True)
        t = manifest["totals"]
        cut = " (the last one cut at a line, the rest of it train)" if "val_cut" in manifest else ""
        empty = f"; skipped {_count(skipped, 'document')} without text" if skipped else ""
        print(f"prepare: {out}: train {t['train']['tokens']:,} tokens / {_count(t['train']['documents'], 'document')} "
              f"in {_count(t['train']['shards'], 'shard')}, val {t['val']['tokens']:,} tokens / "
              f"{_count(t['val']['documents'], 'document')}{cut}{empty}; val size: "
              f"{manifest.get('val_rule', '--val-tokens')}", file=sys.stderr)
        note = _small_data_note(out, manifest)
        if note:
            print(note, file=sys.stderr)
    return manifest


def _no_text(source: Source, spec: list[str] | str, docs_read: int) -> str:
    """Why a source gave no tokens: no documents, or only documents without text."""
    if source.kind != "files":
        if docs_read == 0:
            return f"source {spec} has no documents; check the path, --split and --text-field"
        return (f"source {spec} holds no text ({_count(docs_read, 'document')} read, each empty or whitespace); "
                "check --split and --text-field")
    files, specs = source.params["files"], [spec] if isinstance(spec, str) else list(spec)
    name = specs[0] if len(specs) == len(files) == 1 else f"the {len(files)} source files"
    size = source.text_bytes()
    if size == 0:
        detail = "0 bytes"
    elif docs_read == 0:
        detail = f"{size:,} bytes, no records"
    elif docs_read == 1:
        detail = f"{size:,} bytes; its one document is empty or whitespace"
    else:
        detail = f"{size:,} bytes; its {docs_read:,} documents are each empty or whitespace"
    return f"{name} {'holds' if name == specs[0] else 'hold'} no text ({detail}); nothing to prepare"


def _small_data_note(out: Path, manifest: dict) -> str | None:
    """Which flags `gptrain train --preset tiny` (the smallest recipe) needs on data smaller than one of its batches,
    so a small corpus trains on the first try. None when the preset fits as it is."""
    from gptrain.data.loader import train_fit
    from gptrain.train.config import TRAIN_PRESETS
    B0, T0 = TRAIN_PRESETS["tiny"]["micro_batch_size"], TRAIN_PRESETS["tiny"]["seq_len"]
    B, T = B0, T0
    fits, b, t = train_fit([sh["tokens"] for sh in manifest["shards"] if sh["split"] == "train"], B, T)
    flags, small = [], []  # the flags, and which splits need them
    if not fits:
        if not (b or t):
            return f"prepare: note: {out} holds too little train text to train on; add text"
        B, T = (b, T) if b else (B, t)
        # the preset's steps are one micro-batch: the smaller batch keeps that (no accumulation)
        flags.append(f"{f'--micro-batch-size {b}' if b else f'--seq-len {t}'} --total-batch-size {B * T}")
        small.append(f"train split ({manifest['totals']['train']['tokens']:,} tokens)")
    val = manifest["totals"]["val"]["tokens"]
    if val - 1 < B * T:  # the validation loader's test, at the batch that train fits
        flags.append("--eval-every 0 (no validation loss)")
        small.append(f"validation split ({val:,} tokens)")
    if not flags:
        return None
    return (f"prepare: note: {out}'s {' and '.join(small)} {'is' if len(small) == 1 else 'are'} smaller than one "
            f"batch of `gptrain train --preset tiny` ({B0}x{T0}+1 = {B0 * T0 + 1:,} tokens); train on it with "
            + " ".join(flags))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="+", metavar="SOURCE",
                        help="shakespeare | fineweb-edu[:CONFIG] | fineweb[:CONFIG] | hf:NAME[:CONFIG] (hub name or "
                             "local dataset dir) | files/globs (.txt, .jsonl, .parquet, optionally .gz)")
    add_dataclass_args(parser, PrepareConfig)


def main(args: argparse.Namespace) -> int:
    cfg = PrepareConfig(**overrides_from_args(args, PrepareConfig))
    try:
        prepare(args.source if len(args.source) > 1 else args.source[0], cfg)
    except KeyboardInterrupt:
        print("\nprepare: interrupted; finished shards are kept, re-run the same command to continue",
              file=sys.stderr)
        return 130
    return 0
