"""The `eval` command: `gptrain eval hellaswag | lm-eval | val --model SRC ...`, each result printed beside the
published baselines (gptrain/eval/baselines.py) and optionally written as JSON."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gptrain.bits_per_byte import ByteCounter, bits_per_byte
from gptrain.errors import GptrainError
from gptrain.eval import baselines
from gptrain.train.config import recorded_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    def common(p: argparse.ArgumentParser, batch_size: int | None, batch_help: str) -> None:
        """batch_size None: the command states its own default in batch_help."""
        p.add_argument("--model", required=True, metavar="SRC",
                       help="gptrain run or checkpoint directory, HF GPT-2 directory, llm.c model .bin, or hub name in "
                            "the local HF cache")
        p.add_argument("--batch-size", type=int, default=batch_size, metavar="N", ge=1, le=1 << 16,
                       help=f"{batch_help} (default: {batch_size})" if batch_size else batch_help)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        p.add_argument("--json", metavar="OUT", help="also write the result to this JSON file")

    p = sub.add_parser("hellaswag", help="HellaSwag validation, scored as the lecture does (acc, acc_norm)",
                       description="HellaSwag validation (10,042 examples), rendered and scored as the lecture does; "
                       "downloaded once into $GPTRAIN_CACHE (default ~/.cache/gptrain) and verified.")
    common(p, 16, "examples per forward pass (4 rows each)")
    p.add_argument("--data", metavar="PATH", help="read examples from this .jsonl / .jsonl.gz instead of the cache")
    p.add_argument("--limit", type=int, metavar="N", ge=1, help="score only the first N examples")
    p.add_argument("--autocast", choices=("bfloat16", "float16"),
                   help="run the forward pass under autocast in this dtype (default: the model's own dtype)")
    p.set_defaults(_run=run_hellaswag)

    p = sub.add_parser("lm-eval", help="tasks of EleutherAI's lm-evaluation-harness",
                       description="Run lm-evaluation-harness tasks on a gptrain model (any SRC, raw checkpoints "
                       "included). Offline: put task YAMLs with `dataset_path: json` and local `data_files` in a "
                       "directory and pass it as --include-path.")
    common(p, 32, "sequences per forward pass")
    p.add_argument("--tasks", required=True, help="comma-separated task, group or tag names (e.g. hellaswag,arc_easy)")
    p.add_argument("--include-path", metavar="DIR", help="directory of extra task YAMLs")
    p.add_argument("--limit", type=int, metavar="N", ge=1, help="documents per task (for quick checks)")
    p.set_defaults(_run=run_lm_eval)

    p = sub.add_parser("val", help="validation loss on prepared shards (gptrain prepare)",
                       description="Mean next-token loss over the first --val-tokens validation tokens of a "
                       "prepared data directory, as the training loop measures it.")
    common(p, None, "sequences per forward pass (default: the run's --micro-batch-size when SRC is a gptrain run, so "
                    "the batches are its in-loop evaluation's; else 8)")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (manifest.json + shards; default: the "
                   "one a gptrain run trained on, as its config.json records)")
    p.add_argument("--seq-len", type=int, metavar="T", ge=1,
                   help="tokens per sequence (default: the run's --seq-len when SRC is a gptrain run, else the model's "
                        "context window)")
    p.add_argument("--val-tokens", type=int, metavar="N", ge=1,
                   help="validation tokens to use (default: those the run's in-loop evaluation read, its --val-tokens "
                        "in whole batches of all its processes, when SRC is a gptrain run; else 10485760, the "
                        "lecture's 20 x 64 x 1024 x 8)")
    p.add_argument("--autocast", choices=("bfloat16", "float16"),
                   help="run the forward pass under autocast in this dtype, as training with --dtype bfloat16 "
                        "evaluates (default: bfloat16 for a gptrain run trained with --dtype bfloat16, so the number "
                        "is its in-loop val_loss; else the model's own dtype)")
    p.set_defaults(_run=run_val)


def main(args: argparse.Namespace) -> int:
    return args._run(args)


def _load(args):
    from gptrain.generate import resolve_device
    from gptrain.hf import load_model
    device = resolve_device(args.device)
    return load_model(args.model).to(device).eval(), device


def _write_json(path: str | None, obj) -> None:
    if path:
        from gptrain.config import write_json_atomic
        write_json_atomic(path, obj)
        print(f"wrote {path}", file=sys.stderr)


def run_hellaswag(args) -> int:
    from gptrain.eval import hellaswag
    examples = hellaswag.load_examples(args.data, limit=args.limit, progress=True)
    model, device = _load(args)
    t0 = time.perf_counter()
    res = hellaswag.evaluate(model, examples, batch_size=args.batch_size, device=device, progress=True,
                             autocast=getattr(torch, args.autocast) if args.autocast else None)
    seconds = time.perf_counter() - t0
    source = args.data or "the HellaSwag validation set"
    print(f"HellaSwag: {res['n']} examples from {source}, {seconds:.1f}s ({res['n'] / seconds:.1f} examples/s on {device})")
    print(baselines.table("completion-style scoring (lecture), full validation set for the baselines",
                          {f"{args.model}": res, **baselines.HELLASWAG}, ["acc", "acc_norm"]))
    _write_json(args.json, res)
    return 0


def run_lm_eval(args) -> int:
    from gptrain.eval import harness
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise GptrainError("--tasks is empty; give comma-separated task names such as hellaswag,arc_easy")
    model, device = _load(args)
    out = harness.evaluate(model, tasks, include_path=args.include_path, limit=args.limit,
                           batch_size=args.batch_size, device=str(device))
    summary = {}
    for task, metrics in out["results"].items():
        values = {k.removesuffix(",none"): v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"}
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        summary[task] = {**values, **({"n": n} if n is not None else {})}
        metric_names = [k for k in values if k != "n"]
        if not metric_names:
            continue
        rows = {args.model: values, **baselines.HARNESS_TASKS.get(task, {})}
        print(baselines.table(f"{task} ({n if n is not None else '?'} documents, lm-eval)", rows, metric_names))
        print()
    _write_json(args.json, summary)
    return 0


@torch.no_grad()
def run_val(args) -> int:
    from gptrain.data.loader import ValLoader, check_tokenizer, load_manifest
    from gptrain.devices import attention_kernels
    from gptrain.tokenizer import tokenizer_for_vocab
    record = recorded_run(args.model)
    run = record.get("train", {})
    data = args.data or _recorded_data(args.model, run.get("data"))
    if run.get("threads"):  # the loop's thread count: CPU sums may depend on it
        torch.set_num_threads(run["threads"])
    model, device = _load(args)
    if run and device.type == "cuda":  # the trainer's matmul precision
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    T = args.seq_len or run.get("seq_len") or model.config.block_size
    if not 0 < T <= model.config.block_size:
        raise GptrainError(f"--seq-len {T} must be between 1 and the model's context window {model.config.block_size}")
    B = args.batch_size or run.get("micro_batch_size") or 8
    budget = args.val_tokens or run.get("val_tokens") or 10_485_760
    if not args.val_tokens and run.get("val_tokens"):  # the loop's: whole rounds of every process's micro-batch
        per_round = run["micro_batch_size"] * T * record.get("world_size", 1)
        held = load_manifest(data)["totals"]["val"]["tokens"] - 1
        budget = min(held, budget) // per_round * per_round or budget  # none whole: ValLoader says why
    val = ValLoader(data, B, T, max_tokens=budget, batch_flag="--batch-size", skip_hint=None)
    tok = tokenizer_for_vocab(model.config.vocab_size)
    check_tokenizer(val.manifest, tok)
    text_bytes = ByteCounter(tok.token_bytes)
    total, count, nbytes = 0.0, 0, 0
    autocast = args.autocast or ("bfloat16" if run.get("dtype") == "bfloat16" else None)
    dtype = getattr(torch, autocast or "bfloat16")
    with attention_kernels(device.type, T):  # the kernel the loop's eager evaluation takes
        for x, y in val.batches():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
                _, loss = model(x.to(device), y.to(device))
            n = int((y != -1).sum())
            total += loss.item() * n
            count += n
            nbytes += int(text_bytes(y))
    res = {"val_loss": total / count, "val_bpb": bits_per_byte(total, nbytes), "tokens": count, "bytes": nbytes}
    print(f"validation loss over {count:,} tokens of {data} (B={B}, T={T}"
          f"{f', {autocast} autocast' if autocast else ''})")
    if baselines.val_loss_comparable(val.manifest.get("source")):
        print(baselines.table("FineWeb-EDU validation loss", {args.model: res, **baselines.VAL_LOSS}, ["val_loss"]))
    bpb = "n/a (the targets stand for no text)" if res["val_bpb"] is None else f"{res['val_bpb']:.4f}"
    print(f"{args.model}: val_loss {res['val_loss']:.4f}, bits per byte {bpb} ({nbytes:,} bytes of text)")
    _write_json(args.json, res)
    return 0


def _recorded_data(model: str, recorded: str | None) -> str:
    """The data directory a gptrain run was trained on: `eval val`'s default --data, said on stderr."""
    if not recorded:
        raise GptrainError(f"eval val needs --data DIR (a prepared data directory): --model {model} records no "
                           "training data (only a gptrain training run does)")
    if not Path(recorded).is_dir():
        raise GptrainError(f"eval val needs --data DIR: --model {model} was trained on --data {recorded}, which is "
                           "not a prepared data directory here (moved, relative to another directory, or an sft "
                           "run's conversations); pass the prepared directory")
    print(f"eval val: --data {recorded} (the data --model {model} was trained on)", file=sys.stderr)
    return recorded
