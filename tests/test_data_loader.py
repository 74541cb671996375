"""The loader: every train token once per epoch across ranks, rows of whole documents in a new order each
epoch, the same order for the same seed, exact resume (also on another world size), the lecture's order in sequential mode, a
deterministic validation stream, and clear errors for bad shards."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from gptrain.config import write_json_atomic
from gptrain.data.loader import TrainLoader, ValLoader, check_tokenizer, load_manifest
from gptrain.data.shards import HEADER_BYTES, write_shard
from gptrain.errors import GptrainError
from gptrain.tokenizer import get_tokenizer

EOT = 50256


def make_dir(path, shard_docs: list[int], val_docs: int = 4, seed: int = 0) -> list[list[np.ndarray]]:
    """Shards of documents whose tokens (apart from the leading EOT) are all distinct, so any repeat or gap in
    what a loader yields is visible. shard_docs: documents per train shard. Returns the documents per shard."""
    rng = np.random.default_rng(seed)
    next_id = iter(i for i in range(65536) if i != EOT)
    manifest = {"tokenizer": {"name": "gpt2", "sha256": get_tokenizer().sha256}, "shards": []}
    shards = []
    for split, counts in (("val", [val_docs]), ("train", shard_docs)):
        for k, n in enumerate(counts):
            docs = [np.array([EOT] + [next(next_id) for _ in range(rng.integers(1, 60))], dtype=np.uint16)
                    for _ in range(n)]
            tokens = np.concatenate(docs)
            name = f"{split}_{k:06d}.bin"
            sha = write_shard(path / name, tokens)
            manifest["shards"].append({"path": name, "split": split, "tokens": len(tokens), "documents": n,
                                       "sha256": sha})
            if split == "train":
                shards.append(docs)
    write_json_atomic(path / "manifest.json", manifest)
    return shards


def epoch_stream(data_dir, B, T, W, seed=0, steps=None, shuffle=True):
    """The rows one epoch feeds, flattened in the order of all ranks' batches: per step, rank 0's, rank 1's..."""
    loaders = [TrainLoader(data_dir, B, T, rank=r, world_size=W, seed=seed, shuffle=shuffle) for r in range(W)]
    steps = loaders[0].batches_per_epoch if steps is None else steps
    xs, ys = [], []
    for _ in range(steps):
        for L in loaders:
            x, y = L.next_batch()
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
            xs.append(x.reshape(-1))
            ys.append(y.reshape(-1))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy(), loaders


@pytest.fixture
def data(tmp_path):
    shards = make_dir(tmp_path, [30, 12, 25, 1, 18])
    return tmp_path, shards


def shard_streams(shards):
    """(shard, document, position) of every token but EOT (they are unique), and each document's length."""
    where = {int(t): (s, i, k) for s, docs in enumerate(shards) for i, d in enumerate(docs)
             for k, t in enumerate(d) if t != EOT}
    return where, {(s, i): len(d) for s, docs in enumerate(shards) for i, d in enumerate(docs)}


def check_row(row: np.ndarray, shards, index) -> int:
    """A row is a contiguous piece of one shard's stream of whole documents; returns that shard."""
    where, length = index
    owners = {where[int(t)][0] for t in row if t != EOT}
    assert len(owners) == 1
    for a, b in zip(row, row[1:]):
        if a != EOT and b != EOT:  # inside a document: consecutive tokens of it
            (sa, ia, ka), (sb, ib, kb) = where[int(a)], where[int(b)]
            assert (sa, ia, ka + 1) == (sb, ib, kb)
        elif a != EOT:  # a document ends whole before the next one's EOT
            s, i, k = where[int(a)]
            assert k == length[(s, i)] - 1
        elif b != EOT:  # a document starts right after its EOT
            assert where[int(b)][2] == 1
    return owners.pop()


@pytest.mark.parametrize("W", [1, 2, 3])
def test_each_train_token_once_per_epoch(data, W):
    data_dir, shards = data
    B, T = 2, 16
    x, y, loaders = epoch_stream(data_dir, B, T, W)
    all_tokens = np.concatenate([d for docs in shards for d in docs])
    rows = sum((sum(len(d) for d in docs) - 1) // T for docs in shards)
    assert loaders[0].batches_per_epoch == rows // (B * W) and len(x) == loaders[0].tokens_per_epoch
    words = x[x != EOT]
    assert len(np.unique(words)) == len(words)  # no token twice: ranks disjoint, no repeats
    assert len(all_tokens) - len(x) <= len(shards) * T + B * T * W  # all but shard tails and the final partial step
    xr, yr = x.reshape(-1, T), y.reshape(-1, T)
    assert np.array_equal(xr[:, 1:], yr[:, :-1])  # y is the next token of the same row
    where = shard_streams(shards)
    owners = [check_row(np.append(a, b[-1]), shards, where) for a, b in zip(xr, yr)]
    runs = [s for k, s in enumerate(owners) if k == 0 or s != owners[k - 1]]
    assert len(runs) == len(set(runs))  # shards are read one after another
    assert all(L.epoch == 1 for L in loaders)


def test_new_order_each_epoch_same_for_same_seed(data):
    data_dir, shards = data
    B, T = 2, 8
    L = TrainLoader(data_dir, B, T, seed=3)
    epochs = []
    for _ in range(3):
        epochs.append(np.stack([L.next_batch()[0].numpy() for _ in range(L.batches_per_epoch)]).reshape(-1, T))
    where = shard_streams(shards)
    shard_orders = set()
    for rows in epochs:
        owners = [check_row(r, shards, where) for r in rows]
        shard_orders.add(tuple(s for k, s in enumerate(owners) if k == 0 or s != owners[k - 1]))
        for s in set(owners):  # the rows of a shard come in shuffled order, not as its stream runs
            mine = rows[[o == s for o in owners]]
            assert any(not np.array_equal(a[1:], b[:-1]) for a, b in zip(mine, mine[1:])) or len(mine) < 3
    assert len(shard_orders) > 1
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert {tuple(r) for r in epochs[0]} != {tuple(r) for r in epochs[1]}  # new documents order, so new rows
    again = TrainLoader(data_dir, B, T, seed=3)
    assert np.array_equal(np.stack([again.next_batch()[0].numpy() for _ in range(L.batches_per_epoch)])
                          .reshape(-1, T), epochs[0])
    other = TrainLoader(data_dir, B, T, seed=4)
    assert not np.array_equal(other.next_batch()[0].numpy(), epochs[0][:B])


@pytest.mark.parametrize("shuffle", [True, False])
def test_exact_resume_mid_epoch_and_across_epoch(data, shuffle):
    data_dir, _ = data
    B, T, W = 2, 8, 2
    ref = [TrainLoader(data_dir, B, T, rank=r, world_size=W, seed=7, shuffle=shuffle) for r in range(W)]
    per_epoch = ref[0].batches_per_epoch
    for stop in (5, per_epoch - 2):  # mid-epoch, and just before the epoch boundary
        states = []
        for L in ref:
            L.load_state_dict(TrainLoader(data_dir, B, T, seed=7, shuffle=shuffle).state_dict())
            for _ in range(stop):
                L.next_batch()
            states.append(json.loads(json.dumps(L.state_dict())))  # survives JSON
        for r, L in enumerate(ref):
            resumed = TrainLoader(data_dir, B, T, rank=r, world_size=W, seed=0, shuffle=shuffle)
            resumed.load_state_dict(states[r])
            for _ in range(5):  # crosses into the next epoch in the second round
                a, b = L.next_batch(), resumed.next_batch()
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert resumed.epoch == L.epoch
    assert ref[0].epoch == 1


def test_resume_on_other_world_size_neither_skips_nor_repeats(data):
    data_dir, shards = data
    B, T = 2, 8
    x2, _, loaders = epoch_stream(data_dir, B, T, W=2, steps=10)
    state = loaders[0].state_dict()
    assert state == loaders[1].state_dict()  # one global cursor, the same on every rank
    rest = [TrainLoader(data_dir, B, T, rank=r, world_size=3) for r in range(3)]
    for L in rest:
        L.load_state_dict(state)
    xs = []
    while rest[0].epoch == 0:
        for L in rest:
            xs.append(L.next_batch()[0].reshape(-1))
    x = np.concatenate([x2, torch.cat(xs).numpy()])
    full, _, _ = epoch_stream(data_dir, B, T, W=1)
    assert np.array_equal(x, full[:len(x)]) and len(full) - len(x) < B * T * 3



def optimizer_steps(data_dir, B, T, W, accum, steps, seed=5, state=None):
    """The rows each optimizer step reads (accum micro-steps on each of W ranks), in the global order: micro-step
    m of rank r is the step's (m*W + r)-th slice of B rows; and the epoch after each step."""
    loaders = [TrainLoader(data_dir, B, T, rank=r, world_size=W, seed=seed, accum=accum) for r in range(W)]
    for L in loaders:
        if state is not None:
            L.load_state_dict(state)
    out, epochs = [], []
    for _ in range(steps):
        out.append(np.concatenate([L.next_batch()[0].numpy() for _ in range(accum) for L in loaders]))
        epochs.append(loaders[0].epoch)
    assert all(L.state_dict() == loaders[0].state_dict() for L in loaders)
    return out, epochs, loaders[0].state_dict()


# one total batch of G = 12 rows, split into processes, micro-batches and accumulation in every way
SPLITS = [(12, 1, 1), (3, 1, 4), (6, 2, 1), (2, 2, 3), (3, 4, 1), (1, 4, 3)]  # (B, W, accum)


def test_the_rows_of_each_step_depend_on_the_total_batch_not_on_the_world_size(data):
    """Across three epochs (the ends of epochs and the next shuffles included) every split of the same total
    batch reads the same rows at every optimizer step, and a state saved under one split resumes under any
    other onto exactly the rows the uninterrupted run reads."""
    data_dir, _ = data
    T = 16
    per_epoch = TrainLoader(data_dir, 12, T).batches_per_epoch
    steps = 3 * per_epoch + 2
    ref, ref_epochs, _ = optimizer_steps(data_dir, 12, T, 1, 1, steps)
    assert ref_epochs[-1] == 3 and TrainLoader(data_dir, 12, T).epoch_rows % 12  # wraps with a tail left over
    for B, W, accum in SPLITS[1:]:
        got, epochs, _ = optimizer_steps(data_dir, B, T, W, accum, steps)
        assert epochs == ref_epochs
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)), (B, W, accum)
        assert TrainLoader(data_dir, B, T, world_size=W, accum=accum).tokens_per_epoch == per_epoch * 12 * T
    for (B1, W1, a1), (B2, W2, a2) in zip(SPLITS, SPLITS[3:] + SPLITS[:3]):
        k = per_epoch + 3
        _, _, state = optimizer_steps(data_dir, B1, T, W1, a1, k)
        rest, _, _ = optimizer_steps(data_dir, B2, T, W2, a2, steps - k, seed=0, state=json.loads(json.dumps(state)))
        assert all(np.array_equal(a, b) for a, b in zip(rest, ref[k:])), (B1, W1, a1, B2, W2, a2)

class LectureLoader:
    """The lecture's DataLoaderLite, restated plainly: .npy shards whose names contain the split, sorted; each
    rank reads B*T+1 tokens at its own offset; when the next read would pass the end, go to the next shard."""

    def __init__(self, data_dir, B, T, rank, world, split="train"):
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.files = sorted(p for p in data_dir.iterdir() if split in p.name)
        self.shard = 0
        self.tokens = self._load(0)
        self.pos = B * T * rank

    def _load(self, k):
        return torch.tensor(np.load(self.files[k]).astype(np.int32), dtype=torch.long)

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.pos:self.pos + B * T + 1]
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.pos += B * T * self.world
        if self.pos + (B * T * self.world + 1) > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.files)
            self.tokens = self._load(self.shard)
            self.pos = B * T * self.rank
        return x, y


@pytest.mark.parametrize("W", [1, 2])
def test_sequential_mode_is_the_lectures_loader_on_npy_shards(tmp_path, W):
    rng = np.random.default_rng(1)
    for k, n in enumerate([500, 333, 700]):  # lecture-style .npy shards, no manifest
        np.save(tmp_path / f"edufineweb_train_{k + 1:06d}.npy", rng.integers(0, 50257, n).astype(np.uint16))
    np.save(tmp_path / "edufineweb_val_000000.npy", rng.integers(0, 50257, 300).astype(np.uint16))
    B, T = 2, 16
    ours = TrainLoader(tmp_path, B, T, rank=0, world_size=W, shuffle=False)
    lecture = LectureLoader(tmp_path, B, T, rank=0, world=W)
    for _ in range(ours.batches_per_epoch * 2 + 3):  # wraps around twice
        a, b = ours.next_batch(), lecture.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ours.epoch == 2
    val = ValLoader(tmp_path, B, T, max_tokens=3 * B * T)
    lecture_val = LectureLoader(tmp_path, B, T, 0, 1, split="val")
    assert len(val) == 3
    for a in val.batches():
        b = lecture_val.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reads_bare_llmc_bin_shards(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens[::-1].copy())
    m = load_manifest(tmp_path)
    assert [(s["split"], s["tokens"]) for s in m["shards"]] == [("train", 1000), ("val", 1000)]
    x, y = TrainLoader(tmp_path, 2, 10, shuffle=False).next_batch()
    assert x.reshape(-1).tolist() == list(range(20)) and y.reshape(-1).tolist() == list(range(1, 21))
    check_tokenizer(m, get_tokenizer())  # bare shards carry no tokenizer hash: assumed GPT-2


def test_val_loader_is_deterministic_and_split_across_ranks(data):
    data_dir, _ = data
    B, T = 1, 8
    vals = [ValLoader(data_dir, B, T, rank=r, world_size=2) for r in range(2)]
    first = [list(v.batches()) for v in vals]
    assert len(first[0]) > 1
    for v, f in zip(vals, first):
        again = list(v.batches())
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(f, again))
    seen = torch.cat([torch.cat([x.reshape(-1) for x, _ in f]) for f in first])
    words = seen[seen != EOT]
    assert len(torch.unique(words)) == len(words)
    assert len(ValLoader(data_dir, B, T, max_tokens=2 * B * T)) == 2


def test_prefetch_builds_the_document_index_ahead(data):
    data_dir, shards = data
    L = TrainLoader(data_dir, 2, 8)
    L.next_batch()
    first, second = int(L.order[0]), int(L.order[1])
    assert second in L.shards._index  # the next shard is being indexed (and verified) before it is reached
    assert L.shards._index[second].result().tolist() == np.cumsum([0] + [len(d) for d in shards[second][:-1]]).tolist()
    for i, docs in enumerate(shards):
        assert L.shards.starts(i).tolist() == np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()
    assert first != second


def test_bad_shards_and_data(tmp_path, data):
    data_dir, _ = data
    with pytest.raises(GptrainError, match=r"fewer than one batch of B\*W = 64\*3 rows"):
        TrainLoader(data_dir, 64, 64, world_size=3)
    with pytest.raises(GptrainError, match="does not exist"):
        TrainLoader(tmp_path / "nope", 2, 8)

    manifest = load_manifest(data_dir)
    mismatched = dict(manifest, tokenizer={"name": "other", "sha256": "ab" * 32})
    with pytest.raises(GptrainError, match="tokenized with 'other'.*prepare the data again"):
        check_tokenizer(mismatched, get_tokenizer())
    check_tokenizer(manifest, get_tokenizer(chat=True))  # GPT-2 shards suit the chat vocabulary

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(data_dir, d)
        edit(d / "train_000000.bin")
        return d

    def flip_token(p):
        raw = bytearray(p.read_bytes())
        raw[HEADER_BYTES + 5] ^= 1
        p.write_bytes(bytes(raw))

    d = broken("sha", flip_token)
    with pytest.raises(GptrainError, match=r"train_000000.bin has sha256 .* corrupt"):
        L = TrainLoader(d, 2, 8, shuffle=False)
        L.next_batch()
    d = broken("trunc", lambda p: p.write_bytes(p.read_bytes()[:-7]))
    with pytest.raises(GptrainError, match=r"train_000000.bin is truncated"):
        TrainLoader(d, 2, 8)
    d = broken("magic", lambda p: p.write_bytes(b"\0" * 8 + p.read_bytes()[8:]))
    with pytest.raises(GptrainError, match=r"train_000000.bin has magic 0, expected 20240520"):
        TrainLoader(d, 2, 8)
    (data_dir / "manifest.json").write_text("{not json")
    with pytest.raises(GptrainError, match="cannot read .*manifest.json"):
        load_manifest(data_dir)


def test_state_from_other_data_is_refused(tmp_path, data):
    data_dir, _ = data
    other = tmp_path / "other"
    other.mkdir()
    make_dir(other, [5, 5], seed=1)
    sd = TrainLoader(other, 2, 8).state_dict()
    with pytest.raises(GptrainError, match="resume with the data directory"):
        TrainLoader(data_dir, 2, 8).load_state_dict(sd)
    with pytest.raises(GptrainError, match="rows of 8 tokens, this one 16; resume with --seq-len 8"):
        TrainLoader(data_dir, 2, 16).load_state_dict(TrainLoader(data_dir, 2, 8).state_dict())


@pytest.mark.parametrize("text, prompt", [
    ("\n\n  THE TRAGEDY OF HAMLET\n\nACT I.\n", "THE TRAGEDY OF HAMLET\n"),  # a whole line keeps its newline
    ("In the beginning God created the heaven and the earth, and the earth was without form, and void",
     "In the beginning God created the heaven and the earth, and the earth was"),  # cut: at a whole word
    ("Short text", "Short text"),  # the whole document
])
def test_the_default_sample_prompt_is_the_first_line_of_the_first_val_document(tmp_path, text, prompt):
    from gptrain.data.loader import opening_words
    tok = get_tokenizer()
    tokens = np.array([EOT, *tok.encode(text), EOT, *tok.encode("a second document")], dtype=np.uint16)
    manifest = {"data_dir": str(tmp_path), "shards": [
        {"path": "val.bin", "split": "val", "tokens": len(tokens), "sha256": write_shard(tmp_path / "val.bin", tokens)}]}
    assert opening_words(manifest, tok) == prompt


def test_a_run_directory_given_as_data_is_named_as_one(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    write_json_atomic(run / "config.json", {"train": {"data": "data/shakespeare"}})
    with pytest.raises(GptrainError) as e:
        load_manifest(run)
    assert str(e.value) == (f"--data {run} is a training run's directory, not prepared data; pass the data directory "
                            "it trained on: --data data/shakespeare")


def test_data_given_as_a_file_says_how_to_prepare_it(tmp_path, capsys):
    from gptrain.cli import main as cli_main
    plays = tmp_path / "mydata" / "plays.txt"
    plays.parent.mkdir()
    plays.write_text("First Citizen:\n")
    assert cli_main(["train", "--preset", "tiny", "--data", str(plays), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"gptrain: error: --data {plays} is a file, not prepared data; prepare it "
                                       f"first: gptrain prepare {plays} --out data/plays, then pass --data data/plays\n")
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"")
    with pytest.raises(GptrainError, match=r"prepare it first: gptrain prepare \S+corpus.jsonl.gz --out data/corpus,"):
        load_manifest(tmp_path / "corpus.jsonl.gz")
    make_dir(tmp_path, [3])
    with pytest.raises(GptrainError, match=rf"is a file of prepared data; pass its directory: --data {tmp_path}$"):
        load_manifest(tmp_path / "train_000000.bin")
    with pytest.raises(GptrainError, match=r"data directory \S+nope does not exist; create it with `gptrain prepare "
                                           r"SOURCE --out \S+nope`"):
        load_manifest(tmp_path / "nope")


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_batch_too_large_for_the_data_names_sizes_that_fit(data, shuffle):
    """The error names --micro-batch-size and --seq-len values (powers of two) that do fit; they do, and twice
    them does not."""
    data_dir, _ = data
    with pytest.raises(GptrainError) as e:
        TrainLoader(data_dir, 64, 128, world_size=2, shuffle=shuffle)
    b, t = map(int, re.search(r"; use --micro-batch-size (\d+) or --seq-len (\d+), or prepare more text$",
                              str(e.value)).groups())
    assert "(B: --micro-batch-size, T: --seq-len, W: processes)" in str(e.value)
    TrainLoader(data_dir, b, 128, world_size=2, shuffle=shuffle)
    TrainLoader(data_dir, 64, t, world_size=2, shuffle=shuffle)
    for B, T in ((2 * b, 128), (64, 2 * t)):
        with pytest.raises(GptrainError, match="fewer than one batch"):
            TrainLoader(data_dir, B, T, world_size=2, shuffle=shuffle)


@pytest.mark.parametrize("val_docs, val_tokens, needs", [(4, 10_000, "--eval-every 0"), (200, 100, "--val-tokens"),
                                                        (200, 10_000, None), (4, 0, None)])
def test_a_batch_too_large_for_the_data_names_what_validation_then_needs_too(tmp_path, val_docs, val_tokens, needs):
    """Each size the error names comes with the flag validation needs at that size (`gptrain train`'s loaders
    with val_tokens > 0), so one retry with either set of flags builds both loaders."""
    make_dir(tmp_path, [30, 12, 25, 1, 18], val_docs=val_docs)
    with pytest.raises(GptrainError) as e:
        TrainLoader(tmp_path, 64, 128, world_size=2, val_tokens=val_tokens)
    msg = str(e.value)
    fixes = re.search(r"; use (.*?)(?: \(--eval-every 0: the [\d,]+ validation tokens are fewer than one such "
                      r"batch\))?, or prepare more text$", msg).group(1).split(" or ")
    assert len(fixes) == 2
    for fix in fixes:
        flags = dict(re.findall(r"(--[a-z-]+) (\d+)", fix))
        assert (needs is None) == (len(flags) == 1) and (needs or "") in fix, msg
        B, T = int(flags.get("--micro-batch-size", 64)), int(flags.get("--seq-len", 128))
        TrainLoader(tmp_path, B, T, world_size=2, val_tokens=val_tokens)
        if val_tokens and "--eval-every" not in flags:
            ValLoader(tmp_path, B, T, world_size=2, max_tokens=int(flags.get("--val-tokens", val_tokens)))
        elif val_tokens:
            with pytest.raises(GptrainError, match="fewer than one batch"):
                ValLoader(tmp_path, B, T, world_size=2, max_tokens=val_tokens)


def test_a_validation_split_smaller_than_a_batch(data):
    data_dir, _ = data
    total = load_manifest(data_dir)["totals"]["val"]["tokens"]
    with pytest.raises(GptrainError) as e:
        ValLoader(data_dir, 8, total)
    msg = str(e.value)
    assert msg.startswith(f"{data_dir} holds {total:,} validation tokens, fewer than one batch of B*T*W+1 = "
                          f"8*{total}*1+1 = {8 * total + 1:,}; pass --eval-every 0 to train without validation")
    assert "--val-tokens" not in msg  # no corpus total recorded: a larger split is not known to leave train a batch
    # A smaller micro-batch that fits is named when there is one; another command names its own flags.
    with pytest.raises(GptrainError, match=r"; pass --eval-every 0 to train without validation, or use "
                                           r"--micro-batch-size 4$"):
        ValLoader(data_dir, 8, (total - 1) // 4)
    with pytest.raises(GptrainError, match=r"; use --batch-size 4$"):
        ValLoader(data_dir, 8, (total - 1) // 4, batch_flag="--batch-size", skip_hint=None)
    # The budget, not the split, too small: the flag that sets it.
    with pytest.raises(GptrainError, match=r"^--val-tokens 10 \(tokens per evaluation\) is fewer than one batch of "
                                           r"B\*T\*W = 2\*8\*1 = 16; pass --val-tokens 16 or more$"):
        ValLoader(data_dir, 2, 8, max_tokens=10)
    # A corpus large enough for both splits to hold a batch: a larger split is named too.
    manifest = json.loads((data_dir / "manifest.json").read_text())
    write_json_atomic(data_dir / "manifest.json", dict(manifest, totals={"tokens": 10 ** 6}))
    with pytest.raises(GptrainError, match=rf", or prepare the source again into a new --out with `gptrain prepare "
                                           rf"\.\.\. --val-tokens {2 * 8 * total}`$"):
        ValLoader(data_dir, 8, total)


def test_an_unfinished_prepare_is_named_as_one(tmp_path, data):
    """A directory whose prepare stopped before its train (or any) shard says so, not to change --val-tokens."""
    data_dir, _ = data
    manifest = json.loads((data_dir / "manifest.json").read_text())
    val_only = dict(manifest, shards=[sh for sh in manifest["shards"] if sh["split"] == "val"])
    write_json_atomic(data_dir / "manifest.json", dict(val_only, complete=False))
    with pytest.raises(GptrainError, match=rf"^{data_dir} has no train shards: its prepare did not finish "
                                           r"\(.*manifest.json is not marked complete\); run the same `gptrain prepare "
                                           rf"... --out {data_dir}` again"):
        TrainLoader(data_dir, 2, 8)
    write_json_atomic(data_dir / "manifest.json", dict(val_only, shards=[], complete=False))
    with pytest.raises(GptrainError, match="has no validation shards: its prepare did not finish"):
        ValLoader(data_dir, 2, 8)
    write_json_atomic(data_dir / "manifest.json", dict(val_only, complete=True))  # finished, all of it val
    with pytest.raises(GptrainError, match="has no train shards; prepare the source again into a new --out with a "
                                           "smaller --val-tokens$"):
        TrainLoader(data_dir, 2, 8)


def test_a_smaller_batch_for_small_data_keeps_the_runs_accumulation(tmp_path):
    """Under `gptrain train` (accum given) each size that fits comes with the --total-batch-size that keeps the
    configured accumulation: a smaller micro-batch under the old total would run many more micro-steps a step."""
    make_dir(tmp_path, [30, 12, 25, 1, 18])
    with pytest.raises(GptrainError) as e:
        TrainLoader(tmp_path, 64, 128, world_size=2, accum=3)
    fixes = re.search(r"; use (.*), or prepare more text$", str(e.value)).group(1).split(" or ")
    for fix in fixes:
        flags = {k: int(v) for k, v in re.findall(r"(--[a-z-]+) (\d+)", fix)}
        B, T = flags.get("--micro-batch-size", 64), flags.get("--seq-len", 128)
        assert flags["--total-batch-size"] == B * T * 2 * 3
