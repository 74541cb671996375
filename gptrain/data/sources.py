"""Where documents come from: the Hugging Face Hub (streamed), local files, or the Shakespeare corpus shipped
inside the package. Every source is an ordered, repeatable stream of document strings, which is what makes
`prepare` resumable (skip the documents already in finished shards) and the validation split a fixed rule.

SOURCE forms:
  shakespeare                      the shipped corpus, one document per work (42 works)
  fineweb-edu[:CONFIG]             HuggingFaceFW/fineweb-edu, CONFIG default sample-10BT
  fineweb[:CONFIG]                 HuggingFaceFW/fineweb, CONFIG default sample-10BT
  hf:NAME[:CONFIG]                 any `datasets` dataset: a hub name (OWNER/NAME) or a local dataset directory
  PATH or GLOB ...                 .txt (one document per file), .jsonl (one per line), .parquet (one per row),
                                   each optionally .gz
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import shlex
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

from gptrain.errors import GptrainError, require

HUB_ALIASES = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
HUB_DEFAULT_CONFIG = {"fineweb-edu": "sample-10BT", "fineweb": "sample-10BT"}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Each shipped work opens with its title, a blank line and this byline; nothing else in the corpus matches it.
SHAKESPEARE_BYLINE = "by William Shakespeare\n"


@dataclass
class Source:
    """A named, repeatable stream of documents. `params` identify it in the manifest (resume checks them)."""
    kind: str  # shakespeare | hub | files
    params: dict = field(default_factory=dict)

    def documents(self, skip: int = 0) -> Iterator[str]:
        """The documents in source order, after the first `skip` (already prepared) ones."""
        if self.kind == "shakespeare":
            docs = iter(shakespeare_documents()[skip:])
        elif self.kind == "hub":
            docs = _hub_documents(skip=skip, **self.params)
        else:
            docs = _skip(_file_documents(self.params["files"], self.params["text_field"]), skip)
        return docs

    def text_bytes(self) -> int | None:
        """Local files' size in bytes, uncompressed where gzip records it; None for other sources (unknown or,
        for the shipped corpus, not needed)."""
        if self.kind != "files":
            return None
        return sum(_uncompressed_size(f) for f in self.params["files"])


def resolve_source(spec: list[str] | str, split: str = "train", text_field: str = "text") -> Source:
    """Turn the command line's SOURCE argument(s) into a Source, or stop with a line naming the fix."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise GptrainError("prepare needs a SOURCE: shakespeare, fineweb-edu, fineweb, hf:NAME, or local files")
    head = specs[0]
    name, _, config = head.partition(":")
    if len(specs) == 1 and head == "shakespeare":
        return Source("shakespeare", {"name": "shakespeare"})
    if len(specs) == 1 and name in HUB_ALIASES:
        return Source("hub", {"path": HUB_ALIASES[name], "config": config or HUB_DEFAULT_CONFIG[name],
                              "split": split, "text_field": text_field})
    if len(specs) == 1 and name == "hf":
        path, _, config = config.partition(":")
        if not path:
            raise GptrainError(f"source {head!r} names no dataset; write hf:OWNER/NAME[:CONFIG] or hf:LOCAL_DIR")
        if os.path.isdir(path):
            path = str(Path(path).resolve())
        return Source("hub", {"path": path, "config": config or None, "split": split, "text_field": text_field})
    files: list[str] = []
    for s in specs:
        matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
        if not matches:
            raise GptrainError(f"source {s!r}: no such file, and not one of shakespeare, fineweb-edu[:CONFIG], "
                               "fineweb[:CONFIG], hf:NAME[:CONFIG]; check the path")
        for m in matches:
            if os.path.isdir(m):
                raise GptrainError(f"source {m!r} is a directory; pass its files (e.g. '{m}/*.jsonl') or "
                                   f"hf:{m} to read it with `datasets`")
            if not _local_format(m):
                raise GptrainError(f"source file {m!r} has an unsupported type; use .txt, .jsonl or .parquet "
                                   "(optionally .gz)")
            files.append(str(Path(m).resolve()))
    return Source("files", {"files": files, "text_field": text_field})


def shakespeare_documents() -> list[str]:
    """The shipped corpus split into its 42 works; concatenating them gives back the file's text exactly."""
    path = resources.files("gptrain") / "assets" / "shakespeare_plays.txt.gz"
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise GptrainError(f"the shipped corpus {path} is missing; reinstall gptrain") from None
    lines = text.splitlines(keepends=True)
    # A work starts at its title: the line two above each byline.
    starts = [i - 2 for i, line in enumerate(lines) if line == SHAKESPEARE_BYLINE and i >= 2]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]


def _skip(it: Iterator[str], n: int) -> Iterator[str]:
    for _ in range(n):
        if next(it, None) is None:
            return iter(())
    return it


def _local_format(path: str) -> str | None:
    p = path[:-3] if path.endswith(".gz") else path
    return next((s for s in LOCAL_SUFFIXES if p.endswith(s)), None)


def _uncompressed_size(path: str) -> int:
    size = os.path.getsize(path)
    if path.endswith(".gz") and size >= 18:  # gzip's trailer holds the input size mod 2**32
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            size = max(size, int.from_bytes(f.read(4), "little"))
    return size


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(data: bytes, path: str, offset: int, where: str | None = None) -> str:
    """UTF-8 text of `data` (found at byte `offset` of the file), or a line saying how to convert the file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = offset + e.start
        if e.reason == "unexpected end of data":  # cut inside a character: most likely a partial copy
            raise GptrainError(f"{where or path} ends inside a UTF-8 character (byte offset {at:,}): the file is "
                               f"truncated or not UTF-8; check that it is complete, or convert it, e.g. "
                               f"{_iconv_hint(path)}") from None
        raise GptrainError(f"{where or path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {at:,}); "
                           f"convert it first, e.g. {_iconv_hint(path)}") from None


def _iconv_hint(path: str) -> str:
    fmt = _local_format(path)
    plain = path[:-3] if path.endswith(".gz") else path
    target = shlex.quote(plain[:-len(fmt)] + ".utf8" + fmt)
    if path.endswith(".gz"):
        return f"gzip -dc {shlex.quote(path)} | iconv -f latin1 -t utf-8 > {target}"
    return f"iconv -f latin1 -t utf-8 {shlex.quote(path)} > {target}"


def _file_documents(files: list[str], text_field: str) -> Iterator[str]:
    for path in files:
        fmt = _local_format(path)
        try:
            if fmt == ".txt":
                with _open_bytes(path) as f:
                    data = f.read()
                bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # an editor's mark, not text
                text = _decode(data[bom:], path, bom)
                # Newlines as text mode reads them (universal newlines): CRLF and a lone CR become LF.
                yield text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
            elif fmt == ".jsonl":
                yield from _jsonl_documents(path, text_field)
            else:
                yield from _parquet_documents(path, text_field)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut or damaged .gz (often a partial download)
            raise GptrainError(f"cannot read source file {path}: {e}; check that the file is complete") from None
        except OSError as e:
            raise GptrainError(f"cannot read source file {path}: {e.strerror or e}") from None


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    """One document per line. Read as bytes so that a decoding error can name the line and the file offset; a BOM
    opening the file is dropped (json.loads refuses it), one inside a JSON string is the string's text."""
    offset = 0
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            line = _decode(raw, path, start, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptrainError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            yield _text_of(row, text_field, f"{path}:{lineno}")


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    pq = require("pyarrow.parquet", "reading .parquet files")
    arrow_error = require("pyarrow", "reading .parquet files").ArrowException
    raw = gzip.open(path, "rb") if path.endswith(".gz") else path
    try:
        pf = pq.ParquetFile(raw)
        if text_field not in pf.schema_arrow.names:
            raise GptrainError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                               "pass --text-field NAME")
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise GptrainError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text; "
                                       "pass --text-field NAME of a string column")
                yield text
    except arrow_error as e:  # e.g. "Parquet magic bytes not found in footer": not Parquet, or cut short
        raise GptrainError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]}); check that the file "
                           "is complete") from None
    finally:
        if isinstance(raw, io.IOBase):
            raw.close()


def _text_of(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise GptrainError(f"{where} has no field {text_field!r} (fields: {keys}); pass --text-field NAME")
    text = row[text_field]
    if not isinstance(text, str):
        raise GptrainError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text; "
                           "pass --text-field NAME of a string field")
    return text


def _hub_documents(path: str, config: str | None, split: str, text_field: str, skip: int = 0) -> Iterator[str]:
    """Stream a `datasets` dataset (hub name or local directory): the raw corpus never has to fit on disk."""
    datasets = require("datasets", f"streaming {path}")
    try:
        ds = datasets.load_dataset(path, name=config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptrainError(f"cannot open dataset {path!r} (config {config}, split {split!r}): {first}; "
                           "check the name, --split and your network or HF cache") from None
    features = getattr(ds, "features", None)
    if features is not None and text_field not in features:
        raise GptrainError(f"dataset {path!r} has no field {text_field!r} (fields: {', '.join(features)}); "
                           "pass --text-field NAME")
    if skip:
        ds = ds.skip(skip)
    for i, row in enumerate(ds, skip):
        yield _text_of(row, text_field, f"dataset {path!r} row {i}")
