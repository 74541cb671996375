"""Training and validation batches from a prepared data directory.

TrainLoader, shuffled (default). Epoch e of seed s visits the train shards in a permutation drawn from (s, e).
Inside a shard, its documents are laid out in a permutation drawn from (s, e, shard) (documents are found by
their leading `<|endoftext|>`, so they stay separated when packed), that stream is cut into rows of T+1 tokens
at stride T (x, and y shifted by one), and the rows are taken in a permutation drawn from (s, e, shard) too.
An optimizer step takes the next G = B*W*accum rows of the epoch (the total batch in rows); micro-step m of rank
r reads the B of them starting at (m*W + r)*B. An epoch ends when the next G rows do not fit (on data of fewer
than G rows, when the next micro-step's B*W do not: such a step spans epochs). So the rows each
optimizer step reads, where epochs end and how the next one is shuffled depend on the seed, the data, T and the
total batch only, never on how G is split into processes and micro-batches: a run resumed at another world size
or micro-batch (same total batch and T) reads exactly the rows the uninterrupted run would have (the sums over
them differ in order, so losses agree to float tolerance, not bit for bit). Every train token is an input once
per epoch across all ranks (but for a shard's last < T tokens and the epoch's last < G rows), ranks never share
a row, and the position is one global row cursor: the state is (seed, epoch, cursor).

Why rows and not a contiguous stream: the rows of a batch, and of the next dozens of batches, would otherwise
come from one document. On a small corpus (the demo's Shakespeare: 39 works) those correlated batches cost a lot:
the tiny demo model's validation loss after 500 steps was 5.59 reading the stream in order, 5.32 from shuffled
rows. Shards stay the unit of reading (one is verified and indexed ahead while the current one is read).

TrainLoader(shuffle=False) is the lecture's DataLoaderLite: train shards in file order, consecutive B*T+1
windows, rank-strided, the tail of each shard dropped. (The lecture tests the end of a shard with each rank's
own offset, which lets ranks drift onto different shards; here every rank uses rank 0's test, which is the
condition that the next global step fits, so ranks > 0 stay in step. Rank 0, and W = 1, match it exactly.
A shard shorter than one step, on which the lecture's loader would fail, is skipped.)

Shards are memory-mapped. The first time a shard is used its sha256 is checked against the manifest and its
document index built, in a background thread that runs one shard ahead, so switching shards does not stall.
"""

from __future__ import annotations

import json
import shlex
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gptrain.data.shards import SHARD_SUFFIXES, document_starts, open_shard, verify_sha256
from gptrain.errors import GptrainError
from gptrain.tokenizer import EOT_ID, GPT2_RANKS_SHA256

MANIFEST = "manifest.json"
STATE_VERSION = 2


def read_manifest_json(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptrainError(f"cannot read {path} ({e}); restore it or re-run `gptrain prepare`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) or "tokenizer" not in manifest:
        raise GptrainError(f"{path} is not a gptrain manifest (no 'shards'/'tokenizer'); re-run `gptrain prepare`")
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    """The directory's manifest.json, or one inferred from bare llm.c `.bin` / lecture `.npy` shards (split from
    'val'/'train' in the file name, as the lecture does; no sha256, GPT-2 tokenizer assumed)."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise GptrainError(_file_as_data(data_dir))
    if not data_dir.is_dir():
        raise GptrainError(f"data directory {data_dir} does not exist; create it with `gptrain prepare SOURCE --out {data_dir}`")
    path = data_dir / MANIFEST
    if path.exists():
        manifest = read_manifest_json(path)
    else:
        shards = []
        for p in sorted(data_dir.iterdir()):
            split = "val" if "val" in p.name else "train" if "train" in p.name else None
            if p.suffix in SHARD_SUFFIXES and split:
                shards.append({"path": p.name, "split": split, "tokens": len(open_shard(p)), "documents": None,
                               "sha256": None})
        if not shards:
            if (data_dir / "checkpoints").is_dir() or (data_dir / "metrics.jsonl").is_file():
                from gptrain.train.config import recorded_train_config
                trained_on = recorded_train_config(str(data_dir)).get("data")
                raise GptrainError(f"--data {data_dir} is a training run's directory, not prepared data; pass the "
                                   "data directory " + (f"it trained on: --data {trained_on}" if trained_on else
                                                        "made by `gptrain prepare SOURCE --out DIR`"))
            raise GptrainError(f"{data_dir} has no manifest.json and no *train*/*val* .bin or .npy shards; "
                               f"run `gptrain prepare SOURCE --out {data_dir}`")
        manifest = {"format": "bare", "tokenizer": {"name": "gpt2", "sha256": None}, "shards": shards}
    manifest["data_dir"] = str(data_dir)
    manifest.setdefault("totals", {s: {"tokens": sum(sh["tokens"] for sh in manifest["shards"] if sh["split"] == s)}
                                   for s in ("train", "val")})
    return manifest


def _file_as_data(path: Path) -> str:
    """What to do when --data names a file: a source to prepare, or a file inside a prepared directory."""
    if path.suffix in SHARD_SUFFIXES or path.name == MANIFEST:
        return f"--data {path} is a file of prepared data; pass its directory: --data {shlex.quote(str(path.parent))}"
    from gptrain.data.sources import LOCAL_SUFFIXES
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = next((s for s in LOCAL_SUFFIXES if stem.endswith(s)), None)
    if suffix is None:
        return (f"--data {path} is a file, not prepared data; pass a directory made by "
                f"`gptrain prepare SOURCE --out DIR` (SOURCE: .txt, .jsonl or .parquet files, optionally .gz)")
    out = shlex.quote(f"data/{stem[:-len(suffix)] or 'mydata'}")
    return (f"--data {path} is a file, not prepared data; prepare it first: gptrain prepare {shlex.quote(str(path))} "
            f"--out {out}, then pass --data {out}")


def _unfinished(manifest: dict, what: str) -> str | None:
    """The message for a split that is missing because the directory's prepare never finished, else None."""
    if manifest.get("complete", True):  # bare shard directories have no such flag
        return None
    data_dir = manifest["data_dir"]
    return (f"{data_dir} has no {what}: its prepare did not finish ({Path(data_dir) / MANIFEST} is not marked "
            f"complete); run the same `gptrain prepare ... --out {data_dir}` again (it continues, or says why it "
            "stops), or prepare into a new --out")


def _pow2_fits(n: int, fits) -> int:
    """The largest power of two below n for which fits(k) holds, 0 if none. Suggested sizes are powers of two so
    that --total-batch-size (a multiple of B*T*W) stays valid for the usual power-of-two presets."""
    return next((k for k in (1 << i for i in reversed(range(n.bit_length()))) if k < n and fits(k)), 0)


def train_fit(sizes, B: int, T: int, world_size: int = 1, shuffle: bool = True) -> tuple[bool, int, int]:
    """Whether train shards of these token counts hold one step of B x T per rank; if not, the largest micro-batch
    at this T and the largest seq-len at this B that would (0 where none does)."""
    sizes = np.maximum(np.asarray(sizes, dtype=np.int64), 1)

    def fits(b: int, t: int) -> bool:
        if shuffle:  # rows of t+1 tokens at stride t
            return int(((sizes - 1) // t).sum()) >= b * world_size
        return int(sizes.max(initial=0)) >= b * t * world_size + 1

    if fits(B, T):
        return True, B, T
    return False, _pow2_fits(B, lambda b: fits(b, T)), _pow2_fits(T, lambda t: fits(B, t))


def opening_words(manifest: dict, tokenizer, max_tokens: int = 16) -> str:
    """A prompt that fits the data: the first line of the first validation document (the first train document
    when there is no validation split), at most `max_tokens` tokens of it, so in-loop samples continue text of
    the kind the model learns rather than a fixed string. A whole line keeps its newline (the sample starts the
    next line instead of gluing onto the last word); a line cut short ends at its last whole word."""
    for split in ("val", "train"):
        entry = next((sh for sh in manifest["shards"] if sh["split"] == split and sh["tokens"]), None)
        if entry is None:
            continue
        tokens = np.asarray(open_shard(Path(manifest["data_dir"]) / entry["path"])[:4 * max_tokens + 64])
        doc = tokens[1:] if len(tokens) and tokens[0] == tokenizer.eot else tokens
        ends = np.flatnonzero(doc == tokenizer.eot)
        whole = doc[:ends[0] if len(ends) else len(doc)]
        ids = whole[:max_tokens].tolist()
        while ids and tokenizer.decode(ids).endswith("\ufffd"):  # never end inside a multi-byte character
            ids.pop()
        lines = tokenizer.decode(ids).split("\n")
        first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
        if first is None:
            continue
        line = lines[first].strip()
        if first < len(lines) - 1:  # the whole first line
            return line + "\n"
        if len(ids) < len(whole) and " " in line:  # cut short: end at its last whole word
            line = line.rsplit(" ", 1)[0]
        return line
    return "\n"


def check_tokenizer(manifest: dict, tokenizer) -> None:
    """Stop unless the shards were tokenized with `tokenizer`'s vocabulary (GPT-2 shards also suit the chat
    tokenizer, whose extra tokens only add ids)."""
    info = manifest.get("tokenizer") or {}
    sha = info.get("sha256")
    if sha is None or sha == tokenizer.sha256 or (sha == GPT2_RANKS_SHA256 and tokenizer.name == "gpt2-chat"):
        return
    where = Path(manifest.get("data_dir", ".")) / MANIFEST
    raise GptrainError(f"{where} was tokenized with {info.get('name')!r} (sha256 {sha[:12]}), but the model reads "
                       f"{tokenizer.name!r} (sha256 {tokenizer.sha256[:12]}); prepare the data again with the model's "
                       "tokenizer or train a model with the data's")


class _Shards:
    """The shards of one split: memory maps, sha256 verified on first use, document index built ahead of use."""

    def __init__(self, manifest: dict, split: str, eot: int = EOT_ID, keep: int = 4):
        data_dir = Path(manifest["data_dir"])
        self.data_dir, self.split, self.eot, self.keep = data_dir, split, eot, keep
        entries = [sh for sh in manifest["shards"] if sh["split"] == split]
        self.paths = [data_dir / sh["path"] for sh in entries]
        self.sha = [sh.get("sha256") for sh in entries]
        self.maps = [open_shard(p) for p in self.paths]
        for p, m, sh in zip(self.paths, self.maps, entries):
            if len(m) != sh["tokens"]:
                raise GptrainError(f"shard {p} holds {len(m)} tokens, {data_dir / MANIFEST} says {sh['tokens']}; "
                                   "delete the directory's shards and re-run `gptrain prepare`")
        self.sizes = np.array([len(m) for m in self.maps], dtype=np.int64)
        self._verified: set[int] = set()
        self._index: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptrain-shards")

    def __len__(self):
        return len(self.paths)

    def _build(self, i: int) -> np.ndarray:
        if i not in self._verified and self.sha[i]:
            verify_sha256(self.paths[i], self.sha[i])
        self._verified.add(i)
        return document_starts(self.maps[i], self.eot)

    def prefetch(self, i: int) -> Future:
        with self._lock:
            fut = self._index.get(i)
            if fut is None:
                fut = self._index[i] = self._executor.submit(self._build, i)
                while len(self._index) > self.keep:
                    self._index.popitem(last=False)
            else:
                self._index.move_to_end(i)
            return fut

    def starts(self, i: int) -> np.ndarray:
        """Offsets of the documents of shard i (waits only if the background thread has not finished it)."""
        return self.prefetch(i).result()

    def tokens(self, i: int) -> np.ndarray:
        self.starts(i)  # verified before its tokens are used
        return self.maps[i]


def _to_xy(buf: np.ndarray, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(buf.astype(np.int64))
    return t[:-1].view(B, T), t[1:].view(B, T)


def _check_sizes(B: int, T: int, rank: int, world_size: int) -> None:
    if B < 1 or T < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise GptrainError(f"invalid batch layout B={B} T={T} rank={rank} world_size={world_size}")


class TrainLoader:
    """Micro-batches (x, y) of B x T for rank `rank` of `world_size`: shuffled per epoch, or the lecture's order."""

    def __init__(self, data_dir, B: int, T: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, *, val_tokens: int = 0, accum: int = 0):
        """val_tokens: the budget of `gptrain train`'s validation at the same B and T (0: none), and accum its
        gradient accumulation (0: not training), so that data too small for a batch names, with each size that
        fits, what validation then needs and the --total-batch-size that keeps the accumulation: one retry works
        (a smaller micro-batch under the same total would run many more micro-steps a step)."""
        _check_sizes(B, T, rank, world_size)
        self.manifest = load_manifest(data_dir)
        self.B, self.T, self.rank, self.world_size, self.seed, self.shuffle = B, T, rank, world_size, seed, shuffle
        self.shards = _Shards(self.manifest, "train")
        if not len(self.shards):
            raise GptrainError(_unfinished(self.manifest, "train shards") or
                               f"{data_dir} has no train shards; prepare the source again into a new --out with a "
                               "smaller --val-tokens")
        self.rows = (self.shards.sizes - 1) // T  # rows of T+1 tokens each shard yields (shuffled mode)
        self.epoch_rows = int(self.rows.sum())
        fits, b, t = train_fit(self.shards.sizes, B, T, world_size, shuffle)
        if not fits:
            raise GptrainError(self._too_small(b, t, val_tokens, accum))
        # The unit epochs are cut in: the rows of an optimizer step (G, all ranks and micro-steps), or of one
        # micro-step on data that holds fewer than G rows.
        g = B * world_size * max(accum, 1)
        self.step_rows = g if self.epoch_rows >= g else B * world_size
        self.step_micro = self.step_rows // (B * world_size)  # micro-steps a unit
        self.epoch, self.cursor, self.shard, self.micro = 0, 0, 0, 0
        self._plan_epoch = None
        self._normalize()

    def _too_small(self, b: int, t: int, val_tokens: int, accum: int) -> str:
        B, T, W = self.B, self.T, self.world_size
        if self.shuffle:
            held = (f"holds {int(self.shards.sizes.sum()):,} train tokens, {self.epoch_rows:,} rows of T+1 = {T + 1} "
                    f"tokens, fewer than one batch of B*W = {B}*{W} rows")
        else:
            held = (f"holds {int(self.shards.sizes.max()):,} train tokens in its largest shard (sequential mode "
                    f"reads shard by shard), fewer than one batch of B*T*W+1 = {B}*{T}*{W}+1 = {B * T * W + 1:,}")
        val_held = int(self.manifest["totals"]["val"]["tokens"])
        fixes, why = [], ""
        for flag, value, b_fix, t_fix in (("--micro-batch-size", b, b, T), ("--seq-len", t, B, t)):
            if not value:
                continue
            step = b_fix * t_fix * W  # what validation reads per round at that size (ValLoader's test)
            val_flag = (None if not val_tokens or step <= min(val_held - 1, val_tokens) else
                        "--eval-every 0" if val_held - 1 < step else f"--val-tokens {step}")
            total = f" --total-batch-size {step * accum}" if accum else ""
            fixes.append(f"{flag} {value}{total}" + (f" {val_flag}" if val_flag else ""))
            if val_flag == "--eval-every 0":
                why = f" (--eval-every 0: the {val_held:,} validation tokens are fewer than one such batch)"
        fix = " or ".join(fixes) + (why + ", or prepare more text" if fixes else "prepare more text")
        return (f"{self.manifest['data_dir']} {held} (B: --micro-batch-size, T: --seq-len, W: processes); use {fix}")

    # -- sizes --------------------------------------------------------------------------------------------------
    @property
    def tokens_per_epoch(self) -> int:
        """Train tokens one epoch reads as inputs (all ranks together)."""
        return self.batches_per_epoch * self.B * self.T * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-steps (one next_batch() on every rank) in a full epoch."""
        if self.shuffle:
            return self.epoch_rows // self.step_rows * self.step_micro
        step = self.B * self.T * self.world_size
        return int(sum((n - 1) // step for n in self.shards.sizes if n >= step + 1))

    # -- batches ------------------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        if self.shuffle:
            rows = torch.from_numpy(self._read_rows(self.cursor + self.rank * B, B).astype(np.int64))
            self.cursor += B * self.world_size
            self.micro = (self.micro + 1) % self.step_micro
            self._normalize()
            return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        start = self.cursor + self.rank * B * T
        buf = np.asarray(self.shards.tokens(self.shard)[start:start + B * T + 1])
        self.cursor += B * T * self.world_size
        self._normalize()
        return _to_xy(buf, B, T)

    def _normalize(self) -> None:
        """Move past the end of a shard (sequential) or of the epoch (shuffled) when the next step would not fit
        (shuffled: tested as an optimizer step begins, for all of its G rows)."""
        if self.shuffle:
            if self.micro == 0 and self.cursor + self.step_rows > self.epoch_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
            self._plan()
            return
        step = self.B * self.T * self.world_size
        while self.cursor + step + 1 > self.shards.sizes[self.shard]:
            self.cursor, self.shard = 0, self.shard + 1
            if self.shard == len(self.shards):
                self.epoch, self.shard = self.epoch + 1, 0
        self.shards.prefetch(self.shard)
        self.shards.prefetch((self.shard + 1) % len(self.shards))

    # -- the shuffled epoch's rows -----------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def _plan(self) -> None:
        """Shard order of the current epoch and where each shard's rows start in it (layouts built on first use)."""
        if self._plan_epoch == (self.seed, self.epoch):
            return
        self._plan_epoch = (self.seed, self.epoch)
        self.order = self._rng(0).permutation(len(self.shards))
        self.row_offsets = np.concatenate([[0], np.cumsum(self.rows[self.order])])
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self.shards.prefetch(int(self.order[0]))

    def _layout(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard i this epoch: (source offset, stream offset) of each document in document order, and row order."""
        if i not in self._layouts:
            starts = self.shards.starts(i)
            lengths = np.diff(np.append(starts, self.shards.sizes[i]))
            perm = self._rng(1, i).permutation(len(starts))
            rows = self._rng(2, i).permutation(int(self.rows[i]))
            self._layouts[i] = (starts[perm], np.concatenate([[0], np.cumsum(lengths[perm])]), rows)
            while len(self._layouts) > 3:  # a batch spans a few shards at most; older layouts are not needed again
                self._layouts.popitem(last=False)
        return self._layouts[i]

    def _read_rows(self, first: int, n: int) -> np.ndarray:
        """Rows first..first+n-1 of the epoch, (n, T+1)."""
        out = np.empty((n, self.T + 1), dtype=np.uint16)
        for k in range(n):
            j = int(np.searchsorted(self.row_offsets, first + k, side="right")) - 1
            i = int(self.order[j])
            row = int(self._layout(i)[2][first + k - int(self.row_offsets[j])])
            self._read_shard(i, row * self.T, out[k])
        # The next shard's index (next epoch's first at the end) is built while this one is trained on.
        if j + 1 < len(self.order):
            self.shards.prefetch(int(self.order[j + 1]))
        else:
            nxt = np.random.default_rng([self.seed, self.epoch + 1, 0]).permutation(len(self.shards))[0]
            self.shards.prefetch(int(nxt))
        return out

    def _read_shard(self, i: int, local: int, out: np.ndarray) -> None:
        """Tokens local.. of shard i's document stream this epoch, into out."""
        src, cum, _ = self._layout(i)
        tokens = self.shards.maps[i]
        k = int(np.searchsorted(cum, local, side="right")) - 1
        pos, done = local, 0
        while done < len(out):
            off = pos - int(cum[k])
            take = min(len(out) - done, int(cum[k + 1]) - pos)
            s = int(src[k]) + off
            out[done:done + take] = tokens[s:s + take]
            done += take
            pos += take
            k += 1

    # -- resume -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch starts, for all ranks together (JSON-able, a few integers)."""
        return {"version": STATE_VERSION, "shuffle": self.shuffle, "seed": self.seed, "epoch": self.epoch,
                "shard": self.shard, "cursor": self.cursor, "seq_len": self.T,
                "train_tokens": int(self.shards.sizes.sum())}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION or sd.get("shuffle") != self.shuffle:
            raise GptrainError(f"loader state {sd} is not a {'shuffled' if self.shuffle else 'sequential'} gptrain "
                               "loader state; resume with the same --shuffle setting")
        if sd["train_tokens"] != int(self.shards.sizes.sum()):
            raise GptrainError(f"the checkpoint's data had {sd['train_tokens']:,} train tokens, "
                               f"{self.manifest['data_dir']} has {int(self.shards.sizes.sum()):,}; "
                               "resume with the data directory the run started with")
        if self.shuffle and sd["seq_len"] != self.T:
            raise GptrainError(f"the checkpoint's loader read rows of {sd['seq_len']} tokens, this one {self.T}; "
                               f"resume with --seq-len {sd['seq_len']}")
        self.seed, self.epoch, self.shard, self.cursor = int(sd["seed"]), int(sd["epoch"]), int(sd["shard"]), int(sd["cursor"])
        self.micro = 0  # checkpoints are taken between optimizer steps
        self._normalize()


class ValLoader:
    """The first `max_tokens` validation tokens (all of them if None), in file order, split across ranks the same
    way as training batches; `batches()` yields the same sequence every call."""

    def __init__(self, data_dir, B: int, T: int, rank: int = 0, world_size: int = 1, max_tokens: int | None = None,
                 *, batch_flag: str = "--micro-batch-size", skip_hint: str | None = "--eval-every 0 to train without "
                 "validation"):
        """batch_flag and skip_hint name, in the error for a split smaller than one batch, the caller's flag for B
        and how to go on without validation (the defaults are `gptrain train`'s)."""
        _check_sizes(B, T, rank, world_size)
        self.manifest = load_manifest(data_dir)
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shards = _Shards(self.manifest, "val")
        total = int(self.shards.sizes.sum())
        step = B * T * world_size
        usable = total - 1 if max_tokens is None else min(total - 1, max_tokens)
        self.steps = max(usable, 0) // step
        self.tokens, self.available = self.steps * step, total - 1  # evaluated per round; in the split (as targets)
        if self.steps == 0:
            raise GptrainError((_unfinished(self.manifest, "validation shards") if not total else None) or
                               self._too_small(total, max_tokens, batch_flag, skip_hint))
        self.offsets = np.concatenate([[0], np.cumsum(self.shards.sizes)])

    def _too_small(self, total: int, max_tokens: int | None, batch_flag: str, skip_hint: str | None) -> str:
        B, T, W = self.B, self.T, self.world_size
        step, data_dir = B * T * W, self.manifest["data_dir"]
        if max_tokens is not None and max_tokens < step <= total - 1:  # the budget, not the data, is too small
            return (f"--val-tokens {max_tokens:,} (tokens per evaluation) is fewer than one batch of B*T*W = "
                    f"{B}*{T}*{W} = {step:,}; pass --val-tokens {step:,} or more")
        fixes = [f"pass {skip_hint}"] if skip_hint else []
        b = _pow2_fits(B, lambda k: k * T * W <= total - 1)
        fixes += [f"use {batch_flag} {b}"] if b else []
        # Twice a batch: the split stops at a line end within --val-tokens, so it may hold a little less.
        if self.manifest.get("totals", {}).get("tokens", 0) > 3 * step:  # and train still holds a batch
            fixes.append(f"prepare the source again into a new --out with `gptrain prepare ... --val-tokens "
                         f"{2 * step}`")
        return (f"{data_dir} holds {total:,} validation tokens, fewer than one batch of B*T*W+1 = {B}*{T}*{W}+1 = "
                f"{step + 1:,}; " + (", or ".join(fixes) or "prepare a larger validation split"))

    def __len__(self) -> int:
        return self.steps

    def batches(self):
        B, T = self.B, self.T
        for s in range(self.steps):
            a = s * B * T * self.world_size + self.rank * B * T
            yield _to_xy(self._read(a, B * T + 1), B, T)

    def _read(self, a: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.uint16)
        j = int(np.searchsorted(self.offsets, a, side="right")) - 1
        done = 0
        while done < n:
            local = a + done - int(self.offsets[j])
            piece = self.shards.tokens(j)[local:local + n - done]
            out[done:done + len(piece)] = piece
            done += len(piece)
            j += 1
        return out
