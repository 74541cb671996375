"""`gptrain prepare`: shards decode back to the source documents, token ids equal tiktoken's GPT-2 encoding,
the validation split is a fixed rule, and an interrupted prepare continues without rewriting finished shards."""

import gzip
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

import gptrain.data.prepare as prepare_mod
from gptrain.cli import main as cli_main
from gptrain.data.loader import TrainLoader
from gptrain.data.prepare import PrepareConfig, prepare
from gptrain.data.shards import HEADER_BYTES, MAGIC, document_starts, file_sha256, open_shard
from gptrain.data.sources import shakespeare_documents
from gptrain.errors import GptrainError
from gptrain.tokenizer import get_tokenizer

EOT = 50256


@lru_cache(maxsize=1)
def _reference(data_dir: str) -> tiktoken.Encoding:
    """tiktoken's own gpt2 spec (its regex and special token) with the ranks file read from ../shared/data."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.load_tiktoken_bpe(f"{data_dir}/gpt2/gpt2.tiktoken")
    return tiktoken.Encoding(name="gpt2-reference", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    starts = list(document_starts(tokens, EOT)) + [len(tokens)]
    return [np.asarray(tokens[a:b]) for a, b in zip(starts, starts[1:])]


def shard_docs(out, split=None) -> list[np.ndarray]:
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for sh in manifest["shards"]:
        if split in (None, sh["split"]):
            docs += split_docs(open_shard(out / sh["path"]))
    return docs


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    assert cli_main(["prepare", "shakespeare", "--out", str(out), "--shard-tokens", "300000", "--workers", "2"]) == 0
    return out


def test_the_readme_quick_start_quotes_what_prepare_makes(shakespeare_dir):
    """README: "42 Shakespeare works (1.44M training tokens, 129k held out)" is what prepare writes now."""
    totals = json.loads((shakespeare_dir / "manifest.json").read_text())["totals"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = (f"{totals['documents']} Shakespeare works ({totals['train']['tokens'] / 1e6:.2f}M training tokens, "
              f"{totals['val']['tokens'] / 1e3:.0f}k held out)")
    assert quoted in " ".join(readme.split())


def test_shakespeare_shards_decode_to_every_work(shakespeare_dir):
    works = shakespeare_documents()
    assert len(works) == 42 and works[0].startswith("ALL'S WELL THAT ENDS WELL")
    manifest = json.loads((shakespeare_dir / "manifest.json").read_text())
    docs = shard_docs(shakespeare_dir)  # val shards come first: the val split is the first documents
    assert len(docs) == 42 == manifest["totals"]["documents"] == manifest["documents_read"]
    tok = get_tokenizer()
    for work, ids in zip(works, docs):
        assert ids[0] == EOT and EOT not in ids[1:]
        assert tok.decode(ids[1:]) == work
    assert manifest["complete"] is True
    assert manifest["tokenizer"] == {"name": "gpt2", "sha256": tok.sha256}
    train = [sh for sh in manifest["shards"] if sh["split"] == "train"]
    assert len(train) > 3 and all(sh["tokens"] <= 300_000 for sh in train)  # shards close at a document boundary
    for sh in manifest["shards"]:
        path = shakespeare_dir / sh["path"]
        header = np.fromfile(path, dtype="<i4", count=3)
        assert list(header) == [MAGIC, 1, sh["tokens"]]
        assert path.stat().st_size == HEADER_BYTES + 2 * sh["tokens"]
        assert file_sha256(path) == sh["sha256"]
        assert len(split_docs(open_shard(path))) == sh["documents"]
    val = manifest["totals"]["val"]
    assert val["documents"] == 3 and val["tokens"] >= 100_000  # the first works, up to --val-tokens


def test_shakespeare_token_ids_equal_tiktoken(shakespeare_dir, shared_data):
    ref = _reference(str(shared_data))
    docs = shard_docs(shakespeare_dir)
    for work, ids in zip(shakespeare_documents(), docs):
        assert ids.tolist() == [EOT] + ref.encode_ordinary(work)
    manifest = json.loads((shakespeare_dir / "manifest.json").read_text())
    assert manifest["totals"]["tokens"] == sum(len(ref.encode_ordinary(w)) + 1 for w in shakespeare_documents())


def test_worker_encoding_is_ordinary_encoding(shared_data):
    """Special-token text is plain text, as encode_ordinary treats it; every document gets one leading EOT, and a
    document without text (empty, whitespace only) gets no tokens at all."""
    ref = _reference(str(shared_data))
    texts = ["a<|endoftext|>b", "", "  spaces   and\n\nnewlines ", " \n\t", "Ünïcödé 😀 中文", "x" * 5000]
    flat, lengths = prepare_mod.encode_texts(texts)
    with_text = [t for t in texts if t.strip()]
    assert flat.dtype == np.uint16
    assert lengths.tolist() == [len(ref.encode_ordinary(t)) + 1 if t.strip() else 0 for t in texts]
    assert flat.tolist() == sum(([EOT] + ref.encode_ordinary(t) for t in with_text), [])


def test_jsonl_webtext_under_spawn(tmp_path, shared_data, monkeypatch):
    """Real web documents through worker processes started with `spawn` (macOS/Windows), several batches."""
    files = sorted((shared_data / "webtext").glob("*.jsonl"))
    texts = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines() if line.strip()]
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 20_000)
    out = tmp_path / "web"
    prepare(str(shared_data / "webtext" / "*.jsonl"),
            PrepareConfig(out=str(out), shard_tokens=20_000, val_tokens=20_000, workers=2, start_method="spawn"),
            progress=False)
    ref = _reference(str(shared_data))
    docs = shard_docs(out)
    assert len(docs) == len(texts) == 20
    assert [d.tolist() for d in docs] == [[EOT] + ref.encode_ordinary(t) for t in texts]


def test_hub_path_reads_webtext_jsonl_through_datasets(tmp_path, shared_data):
    pytest.importorskip("datasets")
    files = sorted((shared_data / "webtext").glob("*.jsonl"))
    texts = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines() if line.strip()]
    m = prepare(f"hf:{shared_data / 'webtext'}", PrepareConfig(out=str(tmp_path / "o"), val_tokens=20_000, workers=1),
                progress=False)
    assert m["documents_read"] == len(texts) == m["totals"]["documents"]
    tok = get_tokenizer()
    assert [tok.decode(d[1:]) for d in shard_docs(tmp_path / "o")] == texts  # files in name order, rows in order


def test_local_formats_txt_gz_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    works = shakespeare_documents()[:6]
    (tmp_path / "a.txt").write_text(works[0])
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(works[1])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        for w in works[2:4]:
            f.write(json.dumps({"body": w, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": works[4:6], "n": [1, 2]}), tmp_path / "d.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "d.parquet").read_bytes()[:-100])
    with pytest.raises(GptrainError, match=r"cut.parquet is not a readable Parquet file \(.*\); check that the file is "
                                           r"complete$"):
        prepare(str(tmp_path / "cut.parquet"), PrepareConfig(out=str(tmp_path / "o"), text_field="body"),
                progress=False)
    # .txt files carry no field name; --text-field applies to .jsonl and .parquet.
    out = tmp_path / "out"
    m = prepare([str(tmp_path / "*.txt*"), str(tmp_path / "*.jsonl.gz"), str(tmp_path / "d.parquet")],
                PrepareConfig(out=str(out), text_field="body", val_tokens=0, workers=1), progress=False)
    assert m["totals"]["documents"] == 6 and m["totals"]["val"]["tokens"] == 0
    tok = get_tokenizer()
    assert [tok.decode(d[1:]) for d in shard_docs(out)] == works


def test_hub_path_reads_local_parquet_through_datasets(tmp_path):
    """`hf:DIR` goes through datasets.load_dataset(..., streaming=True), the code path of hub corpora."""
    pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    works = shakespeare_documents()
    ds_dir = tmp_path / "hubdata" / "data"
    ds_dir.mkdir(parents=True)
    pq.write_table(pa.table({"text": works[:20], "id": list(range(20))}), ds_dir / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": works[20:], "id": list(range(20, 42))}), ds_dir / "train-00001-of-00002.parquet")
    out = tmp_path / "out"
    m = prepare(f"hf:{tmp_path / 'hubdata'}", PrepareConfig(out=str(out), shard_tokens=400_000, val_tokens=50_000,
                                                             workers=2), progress=False)
    assert m["source"]["kind"] == "hub" and m["documents_read"] == 42 == m["totals"]["documents"]
    tok = get_tokenizer()
    assert [tok.decode(d[1:]) for d in shard_docs(out)] == works
    with pytest.raises(GptrainError, match="no field 'content'.*--text-field"):
        prepare(f"hf:{tmp_path / 'hubdata'}", PrepareConfig(out=str(tmp_path / "o2"), text_field="content"),
                progress=False)


def test_val_split_is_independent_of_shards_and_length(tmp_path, shakespeare_dir):
    """A shorter prepare with other shard sizes has the same validation documents, and none of them in train."""
    out = tmp_path / "short"
    prepare("shakespeare", PrepareConfig(out=str(out), shard_tokens=90_000, max_tokens=400_000, workers=1),
            progress=False)
    short_val, full_val = shard_docs(out, "val"), shard_docs(shakespeare_dir, "val")
    assert [d.tolist() for d in short_val] == [d.tolist() for d in full_val]
    val_set = {d.tobytes() for d in full_val}
    assert not any(d.tobytes() in val_set for d in shard_docs(shakespeare_dir, "train"))
    # Running again without --max-tokens extends the same directory to the whole corpus.
    m = prepare("shakespeare", PrepareConfig(out=str(out), shard_tokens=90_000, workers=1), progress=False)
    assert m["complete"] and m["documents_read"] == 42
    assert [d.tolist() for d in shard_docs(out)] == [d.tolist() for d in shard_docs(shakespeare_dir)]


def test_interrupted_prepare_continues_without_rewriting(tmp_path, shakespeare_dir, monkeypatch):
    out = tmp_path / "resume"
    cfg = PrepareConfig(out=str(out), shard_tokens=300_000, workers=1)
    real_write = prepare_mod.write_shard
    written = []

    def crash_on_third(path, tokens):
        if len(written) == 3:
            raise RuntimeError("simulated crash")  # while the fourth shard is being written
        written.append(path)
        return real_write(path, tokens)

    monkeypatch.setattr(prepare_mod, "write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare("shakespeare", cfg, progress=False)
    monkeypatch.setattr(prepare_mod, "write_shard", real_write)
    partial = json.loads((out / "manifest.json").read_text())
    assert len(partial["shards"]) == 3 and not partial["complete"]
    before = {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in written}

    m = prepare("shakespeare", cfg, progress=False)
    assert {p: (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns) for p in before} == before
    full = json.loads((shakespeare_dir / "manifest.json").read_text())
    assert m["shards"] == full["shards"]  # the same shards, byte for byte (sha256), as one uninterrupted prepare
    with pytest.raises(GptrainError, match="different shard_tokens"):
        prepare("shakespeare", PrepareConfig(out=str(out), shard_tokens=1000), progress=False)


def test_document_longer_than_a_shard_gets_its_own(tmp_path):
    out = tmp_path / "big"
    m = prepare("shakespeare", PrepareConfig(out=str(out), shard_tokens=20_000, val_tokens=30_000, max_tokens=150_000,
                                             workers=1), progress=False)
    assert all(sh["documents"] == 1 and sh["tokens"] > 20_000 for sh in m["shards"])  # every work is > 20k tokens
    assert [sh["split"] for sh in m["shards"]] == ["val", "train", "train", "train"]
    tok = get_tokenizer()
    assert [tok.decode(d[1:]) for d in shard_docs(out)] == shakespeare_documents()[:4]


def test_prepare_errors(tmp_path):
    with pytest.raises(GptrainError, match="no such file"):
        prepare(str(tmp_path / "missing*.jsonl"), PrepareConfig(out=str(tmp_path / "o")), progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(GptrainError, match=r"empty.jsonl holds no text \(2 bytes, no records\); nothing to prepare"):
        prepare(str(tmp_path / "empty.jsonl"), PrepareConfig(out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(GptrainError, match=r"rows.jsonl:1 has no field 'text' \(fields: content\); pass --text-field"):
        prepare(str(tmp_path / "rows.jsonl"), PrepareConfig(out=str(tmp_path / "o")), progress=False)
    (tmp_path / "doc.txt").write_text("short text")
    with pytest.raises(GptrainError, match=r"went to the validation split \(--val-tokens 100\).*smaller --val-tokens"):
        prepare(str(tmp_path / "doc.txt"), PrepareConfig(out=str(tmp_path / "o2"), val_tokens=100), progress=False)
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["complete"] is False  # never complete
    # Training on it says the prepare did not finish (the --val-tokens advice belongs to prepare, which knows why).
    with pytest.raises(GptrainError, match=r"has no train shards: its prepare did not finish \(.*not marked complete"):
        TrainLoader(tmp_path / "o2", 1, 1)
    with pytest.raises(GptrainError, match=r"--max-tokens 2 ends inside the validation split.*larger --max-tokens"):
        prepare("shakespeare", PrepareConfig(out=str(tmp_path / "o3"), max_tokens=2, workers=1), progress=False)
    with pytest.raises(GptrainError, match="needs --out"):
        prepare("shakespeare", PrepareConfig(), progress=False)


def test_cli_error_is_one_line(tmp_path, capsys):
    assert cli_main(["prepare", str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptrain: error: source ") and err.count("\n") == 1


def _book(tmp_path, works=2):
    """A plain-text book of a few hundred KB: one document."""
    path = tmp_path / "book.txt"
    path.write_text("".join(shakespeare_documents()[:works]))
    return path


def test_one_text_file_splits_into_val_and_train(tmp_path, capsys):
    """A lone .txt (one document) is cut at a line: its start is val (10% of the corpus by default), the rest
    train; the two pieces are the file's text exactly, never overlapping, and the manifest says how."""
    book = _book(tmp_path)
    out = tmp_path / "data"
    assert cli_main(["prepare", str(book), "--out", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["documents_read"] == 1 and "10% of the corpus" in m["val_rule"]
    assert m["val_tokens"] == int(book.stat().st_size / 4 * 0.1) and "10% of the corpus" in err
    (val,), (train,) = shard_docs(out, "val"), shard_docs(out, "train")
    tok, text = get_tokenizer(), book.read_text()
    assert val[0] == EOT == train[0] and EOT not in val[1:] and EOT not in train[1:]
    head, rest = tok.decode(val[1:]), tok.decode(train[1:])
    assert head + rest == text and head.endswith("\n") and len(head) < len(text) // 5
    assert abs(len(val) - m["val_tokens"]) < 50  # cut at the last line within the budget
    assert m["totals"]["val"]["tokens"] == len(val) and m["totals"]["train"]["tokens"] == len(train)


def test_prepare_resumes_after_the_cut(tmp_path, monkeypatch):
    """Killed after the val shard of a cut document: the rerun continues with the rest of that document."""
    book = _book(tmp_path)
    cfg = lambda out: PrepareConfig(out=str(tmp_path / out), workers=1)  # noqa: E731
    whole = prepare(str(book), cfg("whole"), progress=False)
    real_write = prepare_mod.write_shard

    def crash_on_train(path, tokens):
        if "train_" in path.name:
            raise RuntimeError("simulated crash")
        return real_write(path, tokens)

    monkeypatch.setattr(prepare_mod, "write_shard", crash_on_train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(str(book), cfg("resumed"), progress=False)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert [s["split"] for s in partial["shards"]] == ["val"] and not partial["complete"]
    monkeypatch.setattr(prepare_mod, "write_shard", real_write)
    assert prepare(str(book), cfg("resumed"), progress=False)["shards"] == whole["shards"]


def test_cut_point_prefers_line_ends():
    line_ends = prepare_mod._line_end_table()
    tok = get_tokenizer()
    doc = np.asarray([EOT] + tok.encode("one two\nthree four five\nsix seven"), dtype=np.uint16)
    assert tok.decode(doc[1:prepare_mod.cut_point(doc, 7, line_ends)]) == "one two\n"  # last line end in budget
    assert tok.decode(doc[1:prepare_mod.cut_point(doc, 8, line_ends)]) == "one two\nthree four five\n"
    assert prepare_mod.cut_point(doc, 2, line_ends) == 4  # no line end within 2 tokens: the first one past it
    no_lines = np.asarray([EOT] + tok.encode("a b c d e f"), dtype=np.uint16)
    assert prepare_mod.cut_point(no_lines, 3, line_ends) == 3
    assert prepare_mod.cut_point(no_lines, 100, line_ends) == len(no_lines) - 1  # train keeps a token


def test_train_runs_on_one_prepared_text_file(tmp_path, capsys):
    """`gptrain prepare book.txt` then `gptrain train --preset tiny` on it, no other flag but a short run."""
    out, run = tmp_path / "data", tmp_path / "run"
    assert cli_main(["prepare", str(_book(tmp_path)), "--out", str(out), "--workers", "1"]) == 0
    assert "/ 1 document in 1 shard," in capsys.readouterr().err
    assert cli_main(["train", "--preset", "tiny", "--data", str(out), "--out", str(run), "--max-steps", "2",
                     "--sample-every", "0"]) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if "fewer than --val-tokens 65,536" in line]
    assert len(note) == 1 and "each evaluation reads" in note[0]  # the small split is said, not silently used
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [0, 1]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2]


def test_sources_without_text_are_refused_before_writing(tmp_path, capsys):
    """An empty or whitespace-only source stops up front with one line, and leaves no --out directory behind."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    out = tmp_path / "data" / "empty"
    assert cli_main(["prepare", str(tmp_path / "empty.txt"), "--out", str(out)]) == 2
    empty = tmp_path / "empty.txt"
    assert capsys.readouterr().err == f"gptrain: error: {empty} holds no text (0 bytes); nothing to prepare\n"
    assert not (tmp_path / "data").exists()
    with pytest.raises(GptrainError, match=r"^the 3 source files hold no text \(\d+ bytes; its 4 documents are each "
                                           r"empty or whitespace\); nothing to prepare$"):
        prepare([str(tmp_path / "*.txt"), str(tmp_path / "rows.jsonl")], PrepareConfig(out=str(out), workers=1),
                progress=False)
    assert not (tmp_path / "data").exists()


def test_documents_without_text_are_skipped_beside_real_ones(tmp_path, capsys):
    """An empty file beside a book, and blank records between real ones, are not documents: no lone
    `<|endoftext|>` in the shards, and the summary says how many were skipped."""
    works = shakespeare_documents()[:3]
    (tmp_path / "a_empty.txt").write_text("")
    (tmp_path / "b_book.txt").write_text(works[0])
    with open(tmp_path / "c.jsonl", "w") as f:
        for text in ["", works[1], " \n", works[2]]:
            f.write(json.dumps({"text": text}) + "\n")
    out = tmp_path / "data"
    assert cli_main(["prepare", str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), "--out", str(out),
                     "--val-tokens", "0", "--workers", "1"]) == 0
    assert "; skipped 3 documents without text;" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["documents_read"] == 6 and m["documents_skipped"] == 3 and m["totals"]["documents"] == 3
    tok = get_tokenizer()
    assert [tok.decode(d[1:]) for d in shard_docs(out)] == works


def test_a_utf8_bom_is_not_data(tmp_path):
    """A BOM opening a text file (CRLF, gzip too) or a .jsonl file is dropped as CRs are normalised; a U+FEFF
    inside a JSON string is that string's text."""
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfFirst Citizen:\r\nBefore we proceed.\r\n")
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(b"\xef\xbb\xbfSecond\rline\n")
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "\ufeffkept"}).encode() + b"\r\n"
                                       + json.dumps({"text": "third"}).encode() + b"\n")
    out = tmp_path / "out"
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz"), str(tmp_path / "c.jsonl")],
            PrepareConfig(out=str(out), val_tokens=0, workers=1), progress=False)
    tok = get_tokenizer()
    assert [tok.decode(d[1:]) for d in shard_docs(out)] == [
        "First Citizen:\nBefore we proceed.\n", "Second\nline\n", "\ufeffkept", "third"]


def test_a_source_that_is_not_utf8_says_how_to_convert_it(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Café au lait\n".encode("latin1"))
    assert cli_main(["prepare", str(latin1), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"gptrain: error: {latin1} is not UTF-8 text (byte 0xe9 at offset 3); convert it first, e.g. "
        f"iconv -f latin1 -t utf-8 {latin1} > {tmp_path / 'latin1.utf8.txt'}\n")
    rows = tmp_path / "rows.jsonl"
    raw = b'{"text": "fine"}\n{"text": "na\xefve"}\n'
    rows.write_bytes(raw)
    at = raw.index(0xef)
    with pytest.raises(GptrainError, match=rf"rows.jsonl:2 is not UTF-8 text \(byte 0xef at offset {at}\)"):
        prepare(str(rows), PrepareConfig(out=str(tmp_path / "o")), progress=False)
    cut = tmp_path / "cut.txt.gz"  # a partial download: the one case where "complete" is the fix
    cut.write_bytes(gzip.compress(shakespeare_documents()[0].encode())[:5000])
    with pytest.raises(GptrainError, match=r"cannot read source file .*cut.txt.gz: .*; check that the file is "
                                           r"complete$"):
        prepare(str(cut), PrepareConfig(out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_small_file_trains_on_the_first_try(tmp_path, capsys):
    """A 2.6 KB file: prepare's progress line reads plainly, its note names the splits that are small and the flags
    `--preset tiny` needs, and they work; without them train's one-line error names every flag a retry needs."""
    small = tmp_path / "small.txt"
    small.write_text(shakespeare_documents()[0][:2600])
    out = tmp_path / "data"
    assert cli_main(["prepare", str(small), "--out", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^prepare: \d{3} tokens, 2 shards \| [\d.]+K? tokens/s$", err, re.M)
    note = next(line for line in err.splitlines() if line.startswith("prepare: note:"))
    assert re.match(rf"prepare: note: {re.escape(str(out))}'s train split \(\d{{3}} tokens\) and validation split "
                    r"\(\d{2} tokens\) are smaller than one batch of `gptrain train --preset tiny` \(8x128\+1 = 1,025 "
                    r"tokens\); train on it with --micro-batch-size 4 --total-batch-size 512 --eval-every 0 \(no validation "
                    r"loss\)$", note)
    run = ["train", "--preset", "tiny", "--data", str(out), "--sample-every", "0", "--max-steps", "1"]
    assert cli_main(run + ["--out", str(tmp_path / "r1")]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and ("use --micro-batch-size 4 --total-batch-size 512 --eval-every 0 or --seq-len 64 "
                                      "--total-batch-size 512 --eval-every 0 (--eval-every 0: the ") in line
    assert line.endswith(", or prepare more text\n")
    retry = re.search(r"; use (--micro-batch-size \d+ --total-batch-size \d+ --eval-every 0) or", line).group(1).split()
    capsys.readouterr()
    assert cli_main(run + ["--out", str(tmp_path / "r2"), *retry]) == 0  # one retry with the flags named
    assert "= 4×128 × 1 accum × 1 proc" in capsys.readouterr().out  # a step is still one micro-batch


def test_the_small_data_note_names_what_is_small():
    """Only the validation split small: the note says so, not that the corpus is; the flags follow the batch
    that train fits."""
    def note(train, val):
        shards = [{"split": "train", "tokens": n} for n in train] + [{"split": "val", "tokens": val}]
        manifest = {"shards": shards, "totals": {"train": {"tokens": sum(train)}, "val": {"tokens": val}}}
        return prepare_mod._small_data_note(Path("d"), manifest)
    tiny = "smaller than one batch of `gptrain train --preset tiny` (8x128+1 = 1,025 tokens); train on it with"
    assert note([5445], 493) == (f"prepare: note: d's validation split (493 tokens) is {tiny} --eval-every 0 (no "
                                 "validation loss)")
    assert note([846], 600) == f"prepare: note: d's train split (846 tokens) is {tiny} --micro-batch-size 4 --total-batch-size 512"
    assert note([846], 64) == (f"prepare: note: d's train split (846 tokens) and validation split (64 tokens) are "
                               f"{tiny} --micro-batch-size 4 --total-batch-size 512 --eval-every 0 (no validation loss)")
    assert note([5445], 2000) is None


def test_progress_amounts_read_well():
    assert [prepare_mod._amount(n) for n in (0, 736, 999.6, 12_345, 999_960, 4_500_000, 10_000_000_000)] == [
        "0", "736", "1.0K", "12.3K", "1.0M", "4.5M", "10.0B"]
