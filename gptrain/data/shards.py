"""Token shards on disk: llm.c's binary format (written and read) and the lecture's `.npy` (read).

llm.c format: a header of 256 little-endian int32 (magic 20240520, version 1, token count, rest zero) followed by
the tokens as little-endian uint16. gptrain writes exactly this, so shards are interchangeable with llm.c and
modded-nanogpt. Reads are memory-mapped: opening a 100M-token shard costs nothing until its tokens are touched.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from gptrain.config import write_atomic
from gptrain.errors import GptrainError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as int32
SHARD_SUFFIXES = (".bin", ".npy")


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write a shard crash-safely (temp file, fsync, rename) and return the sha256 of the file's bytes."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise GptrainError(f"shard {path} would hold {len(tokens)} tokens, more than llm.c's limit {MAX_SHARD_TOKENS}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    return write_atomic(path, [header.tobytes(), memoryview(tokens).cast("B")], f"shard {path.name}",
                        "the shards finished before it are kept: free space there and run the same command again "
                        "to continue after them")


def read_header(path: Path) -> int:
    """The token count of an llm.c shard, after checking magic, version and file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except FileNotFoundError:
        raise GptrainError(f"shard {path} is missing; re-run `gptrain prepare` for this directory") from None
    if len(header) < HEADER_INTS:
        raise GptrainError(f"shard {path} is truncated ({size} bytes, shorter than the {HEADER_BYTES}-byte header); "
                           "delete it and re-run `gptrain prepare`")
    if header[0] != MAGIC:
        raise GptrainError(f"shard {path} has magic {int(header[0])}, expected {MAGIC} (llm.c token shard); "
                           "it is not a token shard: remove it from the data directory")
    if header[1] != VERSION:
        raise GptrainError(f"shard {path} has version {int(header[1])}, only version {VERSION} (uint16 tokens) "
                           "is supported; re-tokenize it with `gptrain prepare`")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise GptrainError(f"shard {path} is truncated or padded: header says {n} tokens "
                           f"({HEADER_BYTES + 2 * n} bytes), file has {size} bytes; "
                           "delete it and re-run `gptrain prepare`")
    return n


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens (read-only, 1-D integer array) from an llm.c `.bin` or a lecture `.npy`."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise GptrainError(f"shard {path} is missing; re-run `gptrain prepare` for this directory") from None
        except ValueError as e:
            raise GptrainError(f"shard {path} is not a readable .npy token array ({e}); re-create it") from None
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise GptrainError(f"shard {path} holds a {arr.dtype} array of shape {arr.shape}, expected 1-D integer "
                               "tokens; re-create it")
        return arr
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    got = file_sha256(path)
    if got != expected:
        raise GptrainError(f"shard {path} has sha256 {got}, the manifest says {expected}: the file is corrupt or "
                           "was replaced; delete it and re-run `gptrain prepare` with the same arguments")


def document_starts(tokens: np.ndarray, eot: int) -> np.ndarray:
    """Offsets where documents begin: every `<|endoftext|>`, plus 0 when a shard starts mid-document
    (the lecture's shards cut documents at shard edges)."""
    starts = np.flatnonzero(tokens == eot)
    if len(tokens) and (len(starts) == 0 or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    return starts.astype(np.int64)
