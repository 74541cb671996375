"""Typed configs on the command line: flags are generated from dataclass fields, so the two cannot drift.

A field `micro_batch_size: int = 16` becomes `--micro-batch-size N`; a bool `compile: bool = True` becomes
`--compile/--no-compile`; `Optional[X]` fields accept `none`. Field metadata `help=` documents the flag.
Only flags the user actually passed override a preset (argparse defaults are SUPPRESS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path


def _base_type(tp):
    """(python type, optional?) for a field annotation such as `int`, `int | None`, `Optional[str]`."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parser_for(tp, optional: bool, name: str):
    def parse(s: str):
        if optional and s.lower() in ("none", "null", ""):
            return None
        if tp is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"--{name} expects true/false, got {s!r}")
        try:
            return tp(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} expects {tp.__name__}, got {s!r}") from None
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (),
                       shown_defaults: dict | None = None) -> None:
    """Add one flag per field of dataclass `cls` (defaults suppressed: see `overrides_from_args`).

    `shown_defaults` replaces the field's default in the help text, for a command whose recipe differs."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name.startswith("_"):
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        default = (shown_defaults or {}).get(f.name, default)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        if tp is bool and not optional:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, dest=f.name, type=_parser_for(tp, optional, flag[2:]), choices=choices,
                                default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` that the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
