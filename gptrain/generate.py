"""Text generation: the engine's public names, the one-call `complete`, and the `sample` command.

The engine itself is split by job: sampling.py (SamplingParams, logits filtering, penalties, the per-row
state, TextStream), engine.py (Engine, the KV-cache slot pool and its batched decode step, Generation), and
scheduler.py (continuous batching on a thread for a server: Scheduler, Request, Event, QueueFull). All of them
import from here.

Context window: `context="error"` (default) refuses up front when a prompt plus `max_new_tokens` could exceed
the model's `block_size`. `context="slide"` keeps going: when a row's window is full, it keeps its last
`block_size // 2` tokens, which are re-encoded (positions restart at 0), and generation continues from there.
Both paths (cache and no cache) slide at the same moments, so they agree even across a slide.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace

import torch

from gptrain.engine import Engine, Generation, SlotPool, Step
from gptrain.errors import GptrainError
from gptrain.sampling import SamplingParams, Sequence, TextStream, sample_from_logits
from gptrain.scheduler import Event, QueueFull, Request, Scheduler

__all__ = ["Engine", "Event", "Generation", "QueueFull", "Request", "SamplingParams", "Scheduler", "Sequence",
           "SlotPool", "Step", "TextStream", "complete", "sample_from_logits"]


def complete(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_ids: list[int] | None = None, use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt (stop tokens excluded): the one-call form the trainer uses for samples."""
    gen = Engine(model).generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, use_cache=use_cache,
                                 stop_ids=tuple(stop_ids) if stop_ids is not None else None)
    for _ in gen:
        pass
    return gen.ids


# --- the `sample` command -------------------------------------------------------------------------------------

@dataclass
class SampleConfig:
    num_samples: int = field(default=1, metadata={"help": "samples to generate, as one batch"})
    echo: bool = field(default=False, metadata={"help": "print each sample as the prompt followed by its "
                                                         "continuation (off: the continuation alone, for pipes)"})
    kv_cache: bool = field(default=True, metadata={"help": "use the KV cache (--no-kv-cache: full forward per token)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})


SAMPLE_SEPARATOR = "\n\n---\n\n"  # between samples on stdout


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptrainError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptrainError(f"--device {name} asked for CUDA, which this machine lacks; use --device cpu")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gptrain.config import add_dataclass_args
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="HF GPT-2 directory or hub name (local cache), gptrain run dir or checkpoint, llm.c "
                             "model .bin")
    parser.add_argument("--prompt", default="", help="text to continue ('' = unconditional; '-' = read stdin)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop a sample at this string (repeatable)")
    add_dataclass_args(parser, SamplingParams, exclude=("stop", "stop_ids"))
    add_dataclass_args(parser, SampleConfig)


def main(args: argparse.Namespace) -> int:
    from gptrain.config import overrides_from_args
    from gptrain.hf import load_model
    given = overrides_from_args(args, SamplingParams)
    params = SamplingParams(**{**given, "stop": tuple(args.stop)})
    cfg = SampleConfig(**overrides_from_args(args, SampleConfig))
    if cfg.num_samples < 1:
        raise GptrainError(f"--num-samples {cfg.num_samples} must be at least 1")
    params.validate()
    model = load_model(args.model).to(resolve_device(cfg.device)).eval()
    engine = Engine(model, compile=cfg.compile)
    if engine.tokenizer is None:
        raise GptrainError(f"model {args.model} has a vocabulary of {model.config.vocab_size} tokens, which no "
                           "gptrain tokenizer reads")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = engine.tokenizer.encode(text) or [engine.eot]
    params = fit_to_window(params, len(prompt), model.config.block_size, "max_new_tokens" in given)
    gen = engine.generate([prompt] * cfg.num_samples, params, use_cache=cfg.kv_cache)
    _print_in_order(gen, cfg.num_samples, text if cfg.echo else "")
    print(f"gptrain sample: {cfg.num_samples} sample(s), prompt {len(prompt)} tokens, {gen.new_tokens} new "
          f"tokens in {gen.seconds:.2f}s ({gen.new_tokens / max(gen.seconds, 1e-9):.1f} tokens/s, "
          f"{'KV cache' if cfg.kv_cache else 'no cache'}{', compile time included' if cfg.compile else ''}, "
          f"{engine.device})",
          file=sys.stderr)
    return 0


def fit_to_window(params: SamplingParams, prompt_len: int, block: int, explicit: bool) -> SamplingParams:
    """The sample's settings with a default max_new_tokens capped to what the window leaves after the prompt
    (noted on stderr); a --max-new-tokens the user gave that does not fit is an error naming the flags."""
    room = block - prompt_len
    if params.context == "slide" or params.max_new_tokens <= room:
        return params
    if explicit or room < 1:
        fix = (f"lower --max-new-tokens to at most {room}, " if room >= 1 else "shorten the prompt, ")
        raise GptrainError(f"the prompt of {prompt_len} tokens + --max-new-tokens {params.max_new_tokens} exceeds "
                           f"the model's context window of {block} tokens; {fix}or pass --context slide to keep "
                           "going past the window")
    print(f"gptrain sample: max_new_tokens capped at {room}: the model's {block}-token window less the "
          f"{prompt_len}-token prompt (--context slide goes on past it)", file=sys.stderr)
    return replace(params, max_new_tokens=room)


def _print_in_order(gen: Generation, n: int, prompt: str = "") -> None:
    """Stream sample 0 as it comes; later samples (generated in the same batch) follow in order, each after
    `prompt` (--echo's)."""
    out, current, pending = sys.stdout, 0, [prompt] * n
    for step in gen:
        for b, piece in enumerate(step.text):
            pending[b] += piece
        while current < n:
            out.write(pending[current])
            pending[current] = ""
            if gen.finish_reasons[current] is None:
                break
            current += 1
            out.write(SAMPLE_SEPARATOR if current < n else "\n")
        out.flush()
