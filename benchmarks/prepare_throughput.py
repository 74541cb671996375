"""Tokens/s of `gptrain prepare` against the lecture's approach, on the same local corpus, cores and run.

Baseline (the lecture's fineweb.py, restated): a multiprocessing Pool of the same number of workers maps single
documents (`imap`, chunksize 16) through `[eot] + encode_ordinary(text)` -> np.array -> range check -> uint16,
and the main process copies each result into a shard buffer and saves full shards with np.save.
gptrain: `prepare(FILES, PrepareConfig(workers=N))`, i.e. batched tasks, tiktoken writing into numpy buffers,
sha256 and crash-safe shard writes included.

Both read the same .jsonl (json.loads per line in the main process). Runs alternate between them; the median
of --repeats runs is reported, as wall-clock tokens/s and as tokens per CPU-second (all processes; robust to a
machine shared with other work, where wall figures swing). The headline compares equal worker counts; the lecture script as shipped uses
cpu_count()//2 workers, reported on its own line for reference.

    python benchmarks/prepare_throughput.py --corpus shakespeare --mb 20 --repeats 5
    python benchmarks/prepare_throughput.py --corpus webtext --mb 20 --repeats 5   # real web pages (../shared/data)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gptrain.data.prepare import PrepareConfig, prepare
from gptrain.data.sources import shakespeare_documents
from gptrain.tokenizer import get_tokenizer


WEBTEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "webtext"


def make_corpus(path: Path, kind: str, mb: float) -> int:
    """About `mb` MB of text as .jsonl: web-page-sized pieces (1-8 KB) of the shipped Shakespeare, or the Dolma
    web documents of ../shared/data/webtext (full rows, metadata included) repeated."""
    rng = random.Random(0)
    if kind == "webtext":
        rows = [json.loads(line) for f in sorted(WEBTEXT.glob("*.jsonl")) for line in f.read_text().splitlines()]
        make = lambda: rows[rng.randrange(len(rows))]  # noqa: E731
    else:
        text = "".join(shakespeare_documents())
        make = lambda: {"text": text[(a := rng.randrange(0, len(text) - 8000)):a + rng.randrange(1000, 8000)]}  # noqa: E731
    n_docs, size = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            row = make()
            f.write(json.dumps(row) + "\n")
            size += len(row["text"])
            n_docs += 1
    return n_docs


def _read_docs(path: Path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)


def _lecture_tokenize(doc):
    enc = get_tokenizer().enc
    tokens = [enc.eot_token]
    tokens.extend(enc.encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def baseline(corpus: Path, out: Path, workers: int, shard_size: int = 100_000_000) -> int:
    out.mkdir(parents=True, exist_ok=True)
    total, shard_index, count = 0, 0, 0
    buf = np.empty((shard_size,), dtype=np.uint16)
    with mp.Pool(workers) as pool:
        for tokens in pool.imap(_lecture_tokenize, _read_docs(corpus), chunksize=16):
            if count + len(tokens) < shard_size:
                buf[count:count + len(tokens)] = tokens
                count += len(tokens)
            else:
                rest = shard_size - count
                buf[count:] = tokens[:rest]
                np.save(out / f"shard_{shard_index:06d}", buf)
                shard_index += 1
                buf[:len(tokens) - rest] = tokens[rest:]
                count = len(tokens) - rest
            total += len(tokens)
    if count:
        np.save(out / f"shard_{shard_index:06d}", buf[:count])
    return total


def ours(corpus: Path, out: Path, workers: int) -> int:
    m = prepare(str(corpus), PrepareConfig(out=str(out), workers=workers, val_tokens=0), progress=False)
    return m["totals"]["tokens"]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers are joined when a pool closes):
    unlike wall time, it does not depend on how busy the rest of the machine is."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=["shakespeare", "webtext"], default="shakespeare")
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of text")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        n_docs = make_corpus(corpus, args.corpus, args.mb)
        lecture_workers = max(1, (os.cpu_count() or 2) // 2)
        runs = {"baseline": (baseline, args.workers), "gptrain": (ours, args.workers),
                f"lecture ({lecture_workers} workers)": (baseline, lecture_workers)}
        rates = {k: [] for k in runs}
        per_cpu = {k: [] for k in runs}
        tokens = {}
        for r in range(args.repeats):
            for name, (fn, workers) in runs.items():
                out = tmp / f"run{r}"
                c0, t0 = _cpu_seconds(), time.perf_counter()
                tokens[name] = fn(corpus, out, workers)
                rates[name].append(tokens[name] / (time.perf_counter() - t0))
                per_cpu[name].append(tokens[name] / (_cpu_seconds() - c0))
                shutil.rmtree(out)
        assert len(set(tokens.values())) == 1, tokens
        # The floor under both pipelines: tiktoken's encoder alone, one process, no IPC, no shard writing.
        texts = [row["text"] for row in _read_docs(corpus)]
        enc = get_tokenizer().enc
        c0 = time.process_time()
        core = sum(len(enc.encode_to_numpy(t, disallowed_special=())) + 1 for t in texts) / (time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in rates.items()}
        cpu = {k: statistics.median(v) for k, v in per_cpu.items()}
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg "
              f"{os.getloadavg()[0]:.1f}; {args.corpus} corpus {args.mb:g} MB, {n_docs:,} docs, "
              f"{tokens['gptrain']:,} tokens; "
              f"workers {args.workers}; median of {args.repeats}")
        for k in rates:
            print(f"{k:>22}: {med[k] / 1e6:.2f}M tokens/s wall (runs: {', '.join(f'{x / 1e6:.2f}' for x in rates[k])}), "
                  f"{cpu[k] / 1e6:.2f}M tokens per CPU-second")
        print(f"{'tiktoken encoder alone':>22}: {core / 1e6:.2f}M tokens per CPU-second (the ceiling)")
        print(f"speedup vs baseline, same {args.workers} workers: {med['gptrain'] / med['baseline']:.2f}x wall, "
              f"{cpu['gptrain'] / cpu['baseline']:.2f}x per CPU-second; vs the lecture's default worker count: "
              f"{med['gptrain'] / med[f'lecture ({lecture_workers} workers)']:.2f}x wall")


if __name__ == "__main__":
    main()
