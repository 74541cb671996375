"""Conversation datasets: every source becomes a list of conversations in the chat format's message form.

`load_conversations(source)` reads
- `oasst-100`: the set shipped inside the package (100 OpenAssistant trees, Apache-2.0; gptrain/assets/
  oasst_en_100_tree.NOTICE), so SFT works offline;
- local `.jsonl`, `.jsonl.gz`, `.json` or `.parquet` files whose records are any of
  - OpenAI-style `{"messages": [{"role", "content"}, ...]}`,
  - OpenAssistant message trees `{"prompt": {"text", "role": "prompter", "replies": [...]}}`: each root-to-leaf
    path, taking the best-ranked assistant reply (lowest `rank`) at every branch and every user follow-up,
  - Human/Assistant transcripts `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}` (Anthropic HH-RLHF);
- `hf:NAME` (a Hugging Face hub dataset, or a local dataset directory) with a `messages` column, through
  `datasets.load_dataset`.

Every conversation is cleaned the same way: contents stripped, empty messages dropped, consecutive messages of
one role joined, trailing non-assistant messages dropped (nothing to learn from them); conversations left without
an assistant reply are skipped, and `read_conversations` counts the records that gave none.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gptrain.chat.format import validate_messages
from gptrain.errors import GptrainError, require

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
SHIPPED = {"oasst-100": "oasst_en_100_tree.jsonl.gz"}  # name -> file in gptrain/assets


@dataclass
class Conversations:
    """What a source gave: its usable conversations and how many records were read for them; `skipped` records
    left none (e.g. an empty final Assistant turn), so a summary can count them instead of losing them silently."""
    conversations: list[list[dict]]
    records: int
    skipped: int


def load_conversations(source: str, split: str = "train", limit: int | None = None) -> list[list[dict]]:
    """Conversations from a file or `hf:NAME`; `split` applies to `hf:` sources, `limit` keeps the first N."""
    return read_conversations(source, split, limit).conversations


def read_conversations(source: str, split: str = "train", limit: int | None = None) -> Conversations:
    """`load_conversations` with the count of records read and of records skipped for want of a reply."""
    if source.startswith("hf:"):
        records, where = _hf_records(source[3:], split), source
    elif source in SHIPPED:
        with resources.as_file(resources.files("gptrain") / "assets" / SHIPPED[source]) as path:
            records, where = list(_file_records(path)), source
    else:
        path = Path(source)
        if path.is_dir():
            raise GptrainError(f"--data {source} is a directory; pass a .jsonl/.json/.parquet file, "
                               f"or hf:{source} to read it as a Hugging Face dataset directory")
        if not path.is_file():
            raise GptrainError(f"conversation file {source} does not exist; pass a .jsonl, .jsonl.gz, .json or "
                               ".parquet file, or hf:NAME for a Hugging Face dataset")
        records, where = _file_records(path), str(path)
    out, n, skipped = [], 0, 0
    for n, record in enumerate(records, 1):
        convs = [c for c in map(clean, record_conversations(record, f"{where}, record {n}")) if c]
        skipped += not convs
        out += convs
        if limit is not None and len(out) >= limit:
            return Conversations(out[:limit], n, skipped)
    if not out:
        raise GptrainError(f"{where} holds no usable conversation (each needs at least one non-empty "
                           "assistant reply)")
    return Conversations(out, n, skipped)


def record_conversations(record, where: str) -> list[list[dict]]:
    """The conversations in one record, whichever of the supported layouts it has."""
    if not isinstance(record, dict):
        raise GptrainError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return [validate_messages(list(record["messages"]) if record["messages"] is not None else None, where)]
    if isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
        return oasst_paths(record["prompt"], where)
    if isinstance(record.get("chosen"), str):
        return [hh_transcript(record["chosen"], where)]
    raise GptrainError(f"{where}: unknown conversation layout with keys {sorted(record)[:8]}; expected 'messages' "
                       "(OpenAI style), an OpenAssistant tree ('prompt' with 'replies') or 'chosen' "
                       "(Human/Assistant transcript)")


def hh_transcript(text: str, where: str = "transcript") -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise GptrainError(f"{where}: a Human/Assistant transcript must start with '\\n\\nHuman:'; "
                           f"it starts with {text[:40]!r}")
    return [{"role": _HH_ROLES[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def oasst_paths(node: dict, where: str = "tree") -> list[list[dict]]:
    """Root-to-leaf paths of an OpenAssistant tree, following the best-ranked assistant reply at each branch."""
    if node.get("role") != "prompter":
        raise GptrainError(f"{where}: an OpenAssistant tree must start with a 'prompter' message, "
                           f"got role {node.get('role')!r}")

    def live(children, role):
        return [c for c in children or () if c.get("role") == role and not c.get("deleted", False)]

    def paths(m) -> list[list[dict]]:
        if m.get("role") not in _OASST_ROLES or not isinstance(m.get("text"), str):
            raise GptrainError(f"{where}: message {m.get('message_id', '?')} needs role prompter/assistant "
                               "and a 'text' string")
        msg = {"role": _OASST_ROLES[m["role"]], "content": m["text"]}
        if m["role"] == "prompter":
            answers = live(m.get("replies"), "assistant")
            if not answers:
                return []
            best = min(enumerate(answers), key=lambda ia: (ia[1].get("rank") is None, ia[1].get("rank") or 0, ia[0]))[1]
            return [[msg] + rest for rest in paths(best)]
        follow_ups = [p for c in live(m.get("replies"), "prompter") for p in paths(c)]
        return [[msg] + rest for rest in follow_ups] or [[msg]]

    return paths(node)


def clean(conv: list[dict]) -> list[dict]:
    """Strip contents, drop empty messages, join consecutive same-role messages, drop a non-assistant tail;
    [] when no assistant reply is left."""
    out: list[dict] = []
    for m in conv:
        text = m["content"].strip()
        if not text:
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": m["role"], "content": text})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    return out


def _file_records(path: Path):
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_records(path)
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GptrainError(f"{path} is not valid JSON ({e}); fix the file or convert it to JSONL") from None
        return data if isinstance(data, list) else [data]
    if name.endswith(".parquet"):
        datasets = require("datasets", "reading parquet conversations")
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    raise GptrainError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .json or .parquet")


def _jsonl_records(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise GptrainError(f"{path}, line {n}: invalid JSON ({e.msg}); fix or remove that line") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise GptrainError(f"cannot read {path}: {e}; is it a complete UTF-8 (gzipped) JSONL file?") from None


def _hf_records(name: str, split: str):
    datasets = require("datasets", "reading hf: conversation datasets")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the library raises many types (network, missing split, bad files): all mean "cannot load"
        raise GptrainError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''} (check the name, the split and the network "
                           "or local cache)") from None
    if "messages" not in ds.column_names:
        raise GptrainError(f"Hugging Face dataset {name!r} has no 'messages' column (columns: "
                           f"{', '.join(ds.column_names)}); gptrain reads chat datasets in the OpenAI messages layout")
    return ds.select_columns(["messages"])
