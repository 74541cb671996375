"""`gptrain sft`: supervised fine-tuning of a pretrained GPT into the chat format, with the loss on the
assistant's tokens only.

Conversations (gptrain/chat/datasets.py) are rendered by gptrain/chat/format.py; each one becomes ids plus
next-token targets that are -1 (ignored by the model's loss) wherever the format's mask is 0. Rows of
`seq_len + 1` tokens hold whole conversations: packed several to a row (default) or one per row (`--no-pack`),
padded at the end, so no conversation that fits a row is cut across rows; a longer one is cut into row-sized
pieces (each target learned once), and pieces with no assistant token are dropped. With packing, a conversation can attend to the ones
before it in its row, as pretraining documents do after their `<|endoftext|>`; the loss never reaches across.

A held-out slice of the conversations (`--val-fraction`) gives the validation loss. Everything else (the
optimizer, schedule, logging, checkpoints, `--resume auto`, preemption, the report) is the pretraining loop of
gptrain/train/trainer.py, which takes these loaders unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from gptrain.chat.datasets import read_conversations
from gptrain.chat.format import render_conversation, render_for_completion, stop_ids
from gptrain.config import add_dataclass_args, overrides_from_args, validate
from gptrain.errors import GptrainError
from gptrain.model import GPT
from gptrain.tokenizer import Tokenizer, get_tokenizer
from gptrain.train import distributed
from gptrain.train.command import check_run_inputs, print_plan, run_and_record
from gptrain.train.config import TrainConfig, recorded_train_config
from gptrain.train.trainer import Trainer, seed_everything


# ---------------------------------------------------------------- examples and rows

def encode_conversations(convs: list[list[dict]], seq_len: int, tokenizer: Tokenizer | None = None):
    """(ids, mask) int arrays, each at most seq_len + 1 tokens. A conversation longer than that is cut into
    consecutive pieces of seq_len + 1 tokens overlapping by one (so each target is learned once, the reply's end
    and its `<|end|>` included: a model with a short context still learns to stop); pieces without a learned
    token are dropped. Returns (examples, number of conversations cut, number dropped entirely)."""
    tok = tokenizer or get_tokenizer(chat=True)
    examples, cut, dropped = [], 0, 0
    for conv in convs:
        ids, mask = render_conversation(conv, tok)
        starts = range(0, max(1, len(ids) - 1), seq_len)
        cut += len(starts) > 1
        pieces = [(ids[a:a + seq_len + 1], mask[a:a + seq_len + 1]) for a in starts]
        pieces = [(i, m) for i, m in pieces if any(m[1:])]
        dropped += not pieces
        examples += [(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=np.bool_)) for i, m in pieces]
    return examples, cut, dropped


def split_train_val(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split by conversation (never inside one): at least one of each when there are two or more."""
    if not 0 <= val_fraction < 1:
        raise GptrainError(f"--val-fraction {val_fraction} must be in [0, 1)")
    n_val = min(len(items) - 1, max(1 if val_fraction > 0 else 0, round(len(items) * val_fraction)))
    order = np.random.default_rng(seed).permutation(len(items))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def make_row(examples, T: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One (x, y) row of T tokens from whole examples whose lengths sum to at most T + 1."""
    ids = np.full(T + 1, pad_id, dtype=np.int64)
    keep = np.zeros(T + 1, dtype=np.bool_)
    at = 0
    for e_ids, e_mask in examples:
        ids[at:at + len(e_ids)] = e_ids
        keep[at:at + len(e_ids)] = e_mask
        at += len(e_ids)
    return ids[:-1], np.where(keep[1:], ids[1:], -1)


class ConversationLoader:
    """Training rows of whole conversations, reshuffled every epoch from the seed; the same interface as the
    pretraining loader (`next_batch`, `epoch`, `state_dict`, `load_state_dict`), so the trainer's loop, its
    checkpoints and its exact resume work unchanged. Every rank builds the same global batch of B × world_size
    rows and takes its own B."""

    def __init__(self, examples, B: int, T: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, pack: bool = True, pad_id: int | None = None):
        if not examples:
            raise GptrainError("no training conversations left; add data or lower --val-fraction")
        too_long = max(len(ids) for ids, _ in examples)
        if too_long > T + 1:
            raise GptrainError(f"a conversation of {too_long} tokens does not fit rows of seq_len={T}; "
                               "encode_conversations cuts them to seq_len + 1")
        self.examples, self.B, self.T = examples, B, T
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.pack = shuffle, pack
        self.pad_id = get_tokenizer(chat=True).eot if pad_id is None else pad_id
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _take(self):
        ex = self.examples[self._order[self.cursor]]
        self.cursor += 1
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        return ex

    def _peek_len(self) -> int:
        return len(self.examples[self._order[self.cursor]][0])

    def _row(self):
        parts = [self._take()]
        used = len(parts[0][0])
        while self.pack and used + self._peek_len() <= self.T + 1:
            parts.append(self._take())
            used += len(parts[-1][0])
        return make_row(parts, self.T, self.pad_id)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row() for _ in range(self.B * self.world_size)]
        mine = rows[self.rank * self.B:(self.rank + 1) * self.B]
        return (torch.from_numpy(np.stack([x for x, _ in mine])), torch.from_numpy(np.stack([y for _, y in mine])))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": len(self.examples),
                "shuffle": self.shuffle, "pack": self.pack}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "n": len(self.examples), "shuffle": self.shuffle, "pack": self.pack}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise GptrainError(f"the checkpoint's conversation loader had {theirs}, this run has {mine}; resume with "
                               "the same --data, --val-fraction, --seq-len, --seed and packing")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


def pack_groups(examples, T: int, pack: bool = True) -> list[list]:
    """Examples grouped in order into rows of at most T + 1 tokens (one per row without packing)."""
    groups, used = [], T + 2
    for ex in examples:
        if pack and used + len(ex[0]) <= T + 1:
            groups[-1].append(ex)
            used += len(ex[0])
        else:
            groups.append([ex])
            used = len(ex[0])
    return groups


class ConversationValLoader:
    """The held-out conversations as fixed batches (the same every call), shared out evenly across ranks."""

    def __init__(self, examples, B: int, T: int, rank: int = 0, world_size: int = 1, pack: bool = True,
                 pad_id: int | None = None):
        pad_id = get_tokenizer(chat=True).eot if pad_id is None else pad_id
        groups = pack_groups(examples, T, pack)
        if len(groups) < world_size:
            raise GptrainError(f"{len(groups)} validation rows cannot be shared by {world_size} processes; "
                               "raise --val-fraction")
        rows = [make_row(g, T, pad_id) for g in groups[:len(groups) - len(groups) % world_size][rank::world_size]]
        self._batches = [(torch.from_numpy(np.stack([x for x, _ in rows[i:i + B]])),
                          torch.from_numpy(np.stack([y for _, y in rows[i:i + B]]))) for i in range(0, len(rows), B)]

    def batches(self):
        yield from self._batches

    def __len__(self) -> int:
        return len(self._batches)


# ---------------------------------------------------------------- the model

def widen_to_chat(model: GPT, seed: int = 0) -> GPT:
    """A GPT-2-vocabulary model (50257) as a chat model (50261): the chat tokens' rows already exist in the padded
    table, so only the config changes and those rows are set to the mean embedding (plus tiny noise, so the four
    tokens are distinguishable): their logits start near the average token's instead of at random."""
    chat = get_tokenizer(chat=True)
    n = model.config.vocab_size
    if n == chat.n_vocab:
        return model
    if n != get_tokenizer(chat=False).n_vocab:
        raise GptrainError(f"cannot fine-tune a model with vocabulary {n} into the chat format; "
                           f"expected {get_tokenizer(chat=False).n_vocab} (GPT-2) or {chat.n_vocab} (gptrain chat)")
    config = dataclasses.replace(model.config, vocab_size=chat.n_vocab)
    if config.padded_vocab_size != model.config.padded_vocab_size:
        raise GptrainError(f"model pads its vocabulary to {model.config.padded_vocab_size} rows, too few for the "
                           f"{chat.n_vocab} chat tokens")
    wide = GPT(config).to(next(model.parameters()).device)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        wte = wide.transformer.wte.weight
        mean, std = wte[:n].mean(0), wte[:n].std(0)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(chat.n_vocab - n, wte.shape[1], generator=g).to(wte) * std * 0.1
        wte[n:chat.n_vocab] = mean + noise
    return wide


# ---------------------------------------------------------------- the command

@dataclass
class SFTOptions:
    """What SFT adds to the training options (gptrain/train/config.py's TrainConfig)."""
    data_split: str = field(default="train", metadata={"help": "split of an hf: --data source"})
    max_conversations: int = field(default=0, metadata={"help": "use only the first N conversations (0: all)",
                                                        "ge": 0})
    val_fraction: float = field(default=0.05, metadata={"help": "conversations held out for the validation loss",
                                                        "ge": 0, "lt": 1})
    pack: bool = field(default=True, metadata={"help": "pack several whole conversations per row "
                                                      "(--no-pack: one conversation per row, padded)"})
    sample_question: str = field(default="What is the capital of France?",
                                 metadata={"help": "user message answered in the samples during training"})


# Fine-tuning recipe: an LR that fits the model (sft_lr), no decay to zero, no weight decay, few epochs. Flags
# override each value; seq_len and total_batch_size, when not given, follow the model's context window (up to
# 1024) and 4 micro-steps; warm-up is at most a tenth of the steps.
SFT_DEFAULTS = dict(min_lr_ratio=0.1, warmup_steps=20, weight_decay=0.0, micro_batch_size=4, epochs=2.0,
                    max_steps=0, eval_every=50, sample_every=100, num_samples=1, sample_tokens=64, save_every=200,
                    hellaswag_data="none")
SFT_LR_HELP = ("half the pretraining peak LR of a gptrain run, with its --embedding-lr-scale (the demo's: 1e-3, "
               "5x); for other weights 5e-5 x 768 / the model's width (5e-5 for GPT-2 124M)")


def sft_lr(init_from: str, model: GPT) -> tuple[float, float]:
    """(lr, embedding_lr_scale) for fine-tuning `model` when --lr is not given. A gptrain run records its
    pretraining LR: half of it, and the same embedding scale (on the demo model, against 5e-5 whose samples did not
    change: held-out assistant loss 6.46 after 2 epochs of oasst-100 and 9 of 15 replies closed with <|end|>;
    README, "SFT"). Other weights (a Hub GPT-2) get the usual 5e-5 at GPT-2 124M's width, more for narrower ones."""
    pre = recorded_train_config(init_from)
    if isinstance(pre.get("lr"), (int, float)) and pre["lr"] > 0:
        return 0.5 * pre["lr"], float(pre.get("embedding_lr_scale") or 1.0)
    return 5e-5 * 768 / model.config.n_embd, 1.0
NOT_FOR_SFT = ("data", "init_from", "model", "n_layer", "n_head", "n_embd", "val_tokens", "hellaswag_data",
               "hellaswag_limit", "compile", "sample_prompt")


class ChatTrainer(Trainer):
    """The pretraining loop with one change: its samples answer a chat question instead of continuing text."""

    def __init__(self, *args, question: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.question = question

    @torch.no_grad()
    def sample(self) -> list[str]:
        from gptrain.generate import complete
        prompt = render_for_completion([{"role": "user", "content": self.question}], self.tokenizer)
        n_new = min(self.cfg.sample_tokens, self.model.config.block_size - len(prompt))  # what the window leaves
        with self.wrapped.gathered() as model:  # every rank enters (FSDP gathers the weights); rank 0 samples
            if not self.env.is_master:
                return []
            with self.autocast():
                new = complete(model, [prompt] * self.cfg.num_samples, max_new_tokens=n_new,
                               top_k=50, seed=self.cfg.seed, stop_ids=stop_ids(self.tokenizer))
        self.last_samples = [f"User: {self.question} | Assistant: {self.tokenizer.decode(ids)}" for ids in new]
        return self.last_samples


def sft(cfg: TrainConfig, opts: SFTOptions, user_set=frozenset()) -> dict:
    """Run `gptrain sft`: cfg.init_from is the model to fine-tune, cfg.data the conversation source."""
    from gptrain.hf import load_model
    check_run_inputs(cfg, "sft")
    validate(opts)
    source = read_conversations(cfg.data, split=opts.data_split, limit=opts.max_conversations or None)
    convs = source.conversations
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup(cfg.device, cfg.parallel, cfg.dist_timeout)
    try:
        seed_everything(cfg.seed)
        tok = get_tokenizer(chat=True)
        model = widen_to_chat(load_model(cfg.init_from), seed=cfg.seed)
        if "lr" not in user_set:
            lr, embedding_scale = sft_lr(cfg.init_from, model)
            cfg = dataclasses.replace(cfg, lr=lr, embedding_lr_scale=cfg.embedding_lr_scale
                                      if "embedding_lr_scale" in user_set else embedding_scale)
        if "seq_len" not in user_set:
            cfg = dataclasses.replace(cfg, seq_len=min(1024, model.config.block_size))
        if "total_batch_size" not in user_set:
            world = cfg.plan_world_size if cfg.plan and cfg.plan_world_size else env.world_size
            cfg = dataclasses.replace(cfg, total_batch_size=cfg.micro_batch_size * cfg.seq_len * world * 4)
        if "max_steps" in user_set and "epochs" not in user_set:
            cfg = dataclasses.replace(cfg, epochs=0.0)
        if cfg.plan:
            return print_plan(cfg, model.config)

        train_convs, val_convs = split_train_val(convs, opts.val_fraction, cfg.seed)
        train_ex, cut, dropped = encode_conversations(train_convs, cfg.seq_len, tok)
        val_ex, _, _ = encode_conversations(val_convs, cfg.seq_len, tok)
        loader = ConversationLoader(train_ex, cfg.micro_batch_size, cfg.seq_len, rank=env.rank,
                                    world_size=env.world_size, seed=cfg.seed, shuffle=cfg.shuffle, pack=opts.pack)
        rows = len(pack_groups(train_ex, cfg.seq_len, opts.pack))
        if cfg.epochs > 0:
            rows_per_step = cfg.total_batch_size // cfg.seq_len
            cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * rows / rows_per_step)))
        if cfg.max_steps <= 0:
            raise GptrainError(f"--max-steps {cfg.max_steps} must be positive (or pass --epochs)")
        if "warmup_steps" not in user_set:  # a short fine-tune must not spend itself warming up
            cfg = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, max(1, cfg.max_steps // 10)))
        val = None
        if val_ex and cfg.eval_every > 0:
            val = ConversationValLoader(val_ex, cfg.micro_batch_size, cfg.seq_len, rank=env.rank,
                                        world_size=env.world_size, pack=opts.pack)
        trainer = ChatTrainer(cfg, model, loader, val, env=env, tokenizer=tok, question=opts.sample_question)
        learned = sum(int(m[1:].sum()) for _, m in train_ex)
        skipped = f" ({source.skipped:,} without an assistant reply, skipped)" if source.skipped else ""
        note = (f"sft: {len(convs):,} conversations from {source.records:,} records of {cfg.data}{skipped}: "
                f"{len(train_convs):,} train ({rows:,} rows of {cfg.seq_len:,}, {learned:,} assistant tokens; {cut:,} "
                f"cut into pieces, {dropped:,} with no assistant token dropped), {len(val_convs):,} held out; "
                f"model {cfg.init_from}, lr {cfg.lr:g}, {trainer.cfg.max_steps:,} steps")
        record = {"sft": opts, "data": {"source": cfg.data, "conversations": len(convs), "records": source.records,
                                        "skipped_records": source.skipped, "train": len(train_convs),
                                        "val": len(val_convs), "cut": cut, "dropped": dropped,
                                        "train_rows": rows, "assistant_tokens": learned}}
        return run_and_record(trainer, record, note)
    finally:
        distributed.teardown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="source", required=True, metavar="SRC",
                        help="model to fine-tune: HF GPT-2 directory or hub name (local cache), gptrain run or "
                             "checkpoint, llm.c model .bin")
    parser.add_argument("--data", default="oasst-100", metavar="SOURCE",
                        help="conversations: oasst-100 (shipped: 100 OpenAssistant trees, Apache-2.0; the default), "
                             ".jsonl/.jsonl.gz/.json/.parquet (OpenAI messages, OpenAssistant trees, Human/Assistant "
                             "transcripts) or hf:NAME with a messages column")
    add_dataclass_args(parser, TrainConfig, exclude=NOT_FOR_SFT, shown_defaults={
        **SFT_DEFAULTS, "lr": SFT_LR_HELP, "warmup_steps": "20, at most a tenth of the steps",
        "seq_len": "the model's context window, up to 1024",
        "total_batch_size": "4 micro-steps"})
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                        default=argparse.SUPPRESS, help="torch.compile the model (default: on for CUDA, off elsewhere)")
    add_dataclass_args(parser, SFTOptions)
    parser.epilog = ("Defaults are a fine-tuning recipe, not pretraining's: an LR from the model's own (see --lr), "
                     "no weight decay, 2 epochs of the shipped oasst-100 conversations.")


def main(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args, TrainConfig)
    cfg = dataclasses.replace(TrainConfig(), **{**SFT_DEFAULTS, **overrides, "init_from": args.source})
    sft(cfg, SFTOptions(**overrides_from_args(args, SFTOptions)), user_set=frozenset(overrides))
    return 0
