"""The `gptrain` command. Each subcommand lives in the module that does its work and is imported only when run,
so `gptrain --help` is instant and a missing optional extra only affects the commands that need it.

A command module provides `add_arguments(parser)` and `main(args) -> int | None`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from gptrain import __version__, openmp
from gptrain.allocator import keep_freed_memory
from gptrain.config import CommandParser
from gptrain.errors import GptrainError, disk_full, is_disk_full
from gptrain.output import best_effort_output, let_local_rank0_speak, says_configuration_errors

COMMANDS = {  # name -> (module, one-line description)
    "prepare": ("gptrain.data.prepare", "tokenize a corpus (FineWeb-EDU, hub datasets, local files, shakespeare) into shards"),
    "train": ("gptrain.train.command", "pretrain a GPT (1 CPU to N GPUs via torchrun), with eval, samples and checkpoints"),
    "eval": ("gptrain.eval.cli", "evaluate a model: HellaSwag, lm-evaluation-harness tasks, validation loss"),
    "sample": ("gptrain.generate", "generate text from a model (KV cache, temperature, top-k, top-p)"),
    "sft": ("gptrain.chat.sft", "fine-tune a model on conversations into the user/assistant chat format"),
    "chat": ("gptrain.chat.terminal", "talk to a chat model in the terminal"),
    "serve": ("gptrain.serve.cli", "an OpenAI-compatible API (continuous batching) and a web chat page, on loopback"),
    "export": ("gptrain.hf", "write a Hugging Face transformers directory, or llm.c's model and tokenizer files"),
    "report": ("gptrain.report", "plot a run's losses and HellaSwag against the GPT-2/GPT-3 baselines "
                                 "(and llm.c logs)"),
}


def build_parser(command: str | None = None) -> CommandParser:
    parser = CommandParser(
        prog="gptrain",
        description="Reproduce GPT-2 and GPT-3 Small end to end: prepare, train, evaluate, fine-tune, chat.",
        epilog="Run 'gptrain COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"gptrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, description) in COMMANDS.items():
        if command is not None and name != command:
            continue  # only the top-level help lists the commands
        p = sub.add_parser(name, help=description, description=description)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse (every value checked against its field's range before any work), run, and turn a GptrainError, a
    full disk or Ctrl-C into one line on stderr: exit 2, 2 and 130. Console output is best-effort throughout
    (gptrain/output.py): a reader of stdout that went away never stops the command."""
    with best_effort_output():
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "serve":
        openmp.spin_briefly()  # before the command's module loads torch
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's own parser: its usage, and a suggestion for a mistyped flag
            args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help()
            return 0
        keep_freed_memory()  # every command runs torch; on CPU this makes training steps ~1.8x faster
        return int(args._main(args) or 0)
    except GptrainError as e:
        if says_configuration_errors():
            print(f"gptrain: error: {e}", file=sys.stderr)
        else:
            let_local_rank0_speak()
        return 2
    except OSError as e:  # a full disk met where no caller knew more to say
        if not is_disk_full(e):
            raise
        where = e.filename or os.getcwd()
        print(f"gptrain: error: {disk_full(os.path.dirname(where) or where, None, where)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # a Ctrl-C still pending (a server's second one, re-raised by uvicorn) would interrupt the exit's clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("gptrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
