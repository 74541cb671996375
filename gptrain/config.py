"""Typed configs on the command line: flags, help and validation come from the dataclass fields, so they cannot drift.

A field `micro_batch_size: int = _f(64, "sequences per pass", ge=1)` becomes `--micro-batch-size N`; a bool
`compile: bool = True` becomes `--compile/--no-compile`; `Optional[X]` fields accept `none`. Field metadata:
`help` documents the flag; `ge`/`gt`/`le`/`lt` bound a number (inclusive/exclusive, as pydantic's), `choices`
lists the allowed values, floats must be finite unless `allow_inf=True`; `runtime=True` marks a setting that
changes how a run executes, not what it trains (a changed runtime field never stops a resume). The bounds show
in `--help` and are checked when the flag is parsed, before any work, with a one-line `GptrainError` naming the
flag; `validate(obj)` checks a whole instance (presets, the Python API) the same way. Only flags the user
actually passed override a preset (argparse defaults are SUPPRESS).

`CommandParser` is every command's parser: no prefix abbreviations, "did you mean" for a mistyped flag, a
short usage line, range keywords on plain options, and help that shows a preset's values
(`gptrain train --preset tiny --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import operator
import os
import re
import sys
import typing
from pathlib import Path

from gptrain.errors import RETRY_AFTER_FREEING, GptrainError, disk_full, is_disk_full
from gptrain.output import let_local_rank0_speak, says_configuration_errors

BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))
RANGE_KEYS = ("ge", "gt", "le", "lt", "allow_inf")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def _base_type(tp):
    """(python type, optional?) for a field annotation such as `int`, `int | None`, `Optional[str]`."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def describe_range(meta: typing.Mapping) -> str:
    """'>= 1', '> 0 and <= 1', or '' when `meta` bounds nothing."""
    return " and ".join(f"{sym} {meta[key]:g}" if isinstance(meta[key], float) else f"{sym} {meta[key]}"
                        for key, sym, _ in BOUNDS if meta.get(key) is not None)


def check_value(flag: str, value, meta: typing.Mapping) -> None:
    """Raise a one-line GptrainError when `value` breaks the field metadata `meta` (choices, finiteness, bounds)."""
    if value is None or isinstance(value, bool):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise GptrainError(f"{flag} {value!r} is not one of the choices: "
                           f"{', '.join(str(c) for c in choices if c is not None)}")
    if not isinstance(value, (int, float)):
        return
    rng = describe_range(meta)
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not meta.get("allow_inf"))):
        raise GptrainError(f"{flag} {value} is not a finite number; give one {rng}" if rng else
                           f"{flag} {value} is not a finite number; give a finite one")
    for key, _, ok in BOUNDS:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise GptrainError(f"{flag} {value:g} is out of range: it must be {rng}" if isinstance(value, float)
                               else f"{flag} {value} is out of range: it must be {rng}")


def validate(obj) -> None:
    """Check every field of dataclass instance `obj` against its metadata (see `check_value`)."""
    for f in dataclasses.fields(obj):
        if not f.name.startswith("_"):
            check_value(flag_name(f.name), getattr(obj, f.name), f.metadata)


def runtime_fields(cls, *, numerics: bool | None = None) -> frozenset[str]:
    """The fields of `cls` marked `runtime=True`: how a run executes, not what it is. numerics=True/False: only those
    that do / do not change floating-point results (marked `numerics=True`)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime")
                     and (numerics is None or bool(f.metadata.get("numerics")) == numerics))


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parser_for(tp, optional: bool, flag: str, meta: typing.Mapping):
    """The argparse `type` of a flag: parse the string, then check it; both failures are one-line GptrainErrors."""
    def parse(s: str):
        if optional and s.lower() in ("none", "null", ""):
            return None
        if tp is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise GptrainError(f"{flag} expects true/false, got {s!r}")
        try:
            value = tp(s)
        except ValueError:
            kind = {int: "a whole number", float: "a number"}.get(tp, tp.__name__)
            raise GptrainError(f"{flag} expects {kind}, got {s!r}") from None
        check_value(flag, value, meta)
        return value
    parse.numeric = tp if tp in (int, float) else None  # for the CLI fuzz test: which flags take numbers
    return parse


def _help(text: str, default, meta: typing.Mapping) -> str:
    rng = describe_range(meta)
    # an empty default (a required value) or one the text itself states is not repeated as "default: "
    shown = default not in ("", None) or (default is None and "default:" not in text)
    tail = "; ".join(([f"default: {default}"] if shown else []) + ([rng] if rng else []))
    return (f"{text} ({tail})" if text and tail else text or tail).replace("%", "%%")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (),
                       shown_defaults: dict | None = None) -> None:
    """Add one flag per field of dataclass `cls` (defaults suppressed: see `overrides_from_args`); a field whose
    metadata says `required` is a required flag (usage shows it so; the dataclass keeps a default for Python callers).

    `shown_defaults` replaces the field's default in the help text, for a command whose recipe differs."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name.startswith("_"):
            continue
        tp, optional = _base_type(hints[f.name])
        flag = flag_name(f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        default = (shown_defaults or {}).get(f.name, default)
        if tp is bool and not optional:
            action = parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(str(c).lower() for c in choices) + "}" if choices else f.name.upper()
            action = parser.add_argument(flag, dest=f.name, type=_parser_for(tp, optional, flag, f.metadata),
                                         default=argparse.SUPPRESS, metavar=metavar,
                                         required=bool(f.metadata.get("required")))
        action.field_help, action.field_meta = f.metadata.get("help", ""), f.metadata
        action.help = _help(action.field_help, default, f.metadata)


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` that the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


class CommandParser(argparse.ArgumentParser):
    """argparse with gptrain's conventions (module docstring). `add_argument` also takes `ge/gt/le/lt/allow_inf`
    for a plain numeric option; `presets` = (flag, {name: {field: value}}) makes --help show that preset's
    values as the defaults when the flag is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # argparse takes "-1" for a value but "-inf", "-1e-3" for an unknown flag; every number is a value here
        self._negative_number_matcher = _NEGATIVE_NUMBER
        self.presets: tuple[str, dict] | None = None
        self.set_defaults(_parser=self)  # the innermost parser that parsed, for its error messages

    def add_argument(self, *args, **kwargs):
        meta = {k: kwargs.pop(k) for k in RANGE_KEYS if k in kwargs}
        if meta:
            tp, flag = kwargs.get("type", int), max(args, key=len)
            kwargs["type"] = _parser_for(tp, False, flag, meta)
            rng = describe_range(meta)
            kwargs["help"] = f"{kwargs.get('help', '')} ({rng})".strip() if rng else kwargs.get("help")
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(): a typo beside a missing flag
        if self.presets is not None and args is not None:
            flag, table = self.presets
            for i, a in enumerate(args):
                name = a.split("=", 1)[1] if a.startswith(flag + "=") else (
                    args[i + 1] if a == flag and i + 1 < len(args) else None)
                if name in table:
                    self.show_defaults(table[name])
                    self.epilog = f"The defaults shown are {flag} {name}'s values."
        return super().parse_known_args(args, namespace)

    def show_defaults(self, values: dict) -> None:
        """Show `values` as the defaults in --help (for flags generated from dataclass fields)."""
        for action in self._actions:
            if hasattr(action, "field_help") and action.dest in values:
                action.help = _help(action.field_help, values[action.dest], action.field_meta)

    def format_usage(self) -> str:
        """One short line (the full list is --help's): positionals and required options only."""
        parts = []
        for a in self._actions:
            if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
                continue
            if not a.option_strings:
                parts.append(a.metavar or a.dest.upper())
            elif a.required:
                parts.append(f"{a.option_strings[-1]} {a.metavar or a.dest.upper()}")
        return f"usage: {self.prog} {' '.join(parts + ['[OPTIONS]'])}   ({self.prog} --help lists them)\n"

    def _did_you_mean(self, args: list[str]) -> str:
        """' (did you mean --out?)' for the arguments in `args` that look like a mistyped flag of this parser."""
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        hints = []
        for arg in args:
            name = arg.split("=", 1)[0]
            guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if arg.startswith("--") else []
            hints += [(arg, guess[0])] if guess and name not in known else []
        if len(hints) == 1:
            return f" (did you mean {hints[0][1]}?)"
        return " (did you mean " + ", ".join(f"{g} for {a}" for a, g in hints) + "?)" if hints else ""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            args = message.split(": ", 1)[1].split()
            message = "unrecognized arguments: " + " ".join(args) + self._did_you_mean(args)
        elif message.startswith("the following arguments are required"):
            # argparse stops at the missing flag before it reports unknown ones: `prepare x --ot data/x` would
            # only say --out is required, not that --ot is the typo that left it out
            known = {s for a in self._actions for s in a.option_strings}
            unknown = [a for a in getattr(self, "_argv", []) if a.startswith("--") and a.split("=", 1)[0] not in known]
            if hint := self._did_you_mean(unknown):
                message = f"unrecognized arguments: {' '.join(unknown)}{hint}; {message}"
        if not says_configuration_errors():  # under torchrun: every rank finds it, local rank 0 says it
            let_local_rank0_speak()
            self.exit(2)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be one: a file, or below a file."""
    p = Path(path)
    while True:
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == Path(path) else f"is below {p}, which is a file"
                raise GptrainError(f"{flag} {path} {what}, not a directory; choose another {flag}")
            if not os.access(p, os.W_OK):
                raise GptrainError(f"{flag} {path}: {p} is not writable; choose another {flag}")
            return
        if p == p.parent:
            return
        p = p.parent


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
    write_atomic(path, [(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n").encode()], str(path))


def write_atomic(path: str | os.PathLike, parts, what: str, how_to_continue: str = RETRY_AFTER_FREEING) -> str:
    """Write the byte strings `parts` crash-safely (temp file, fsync, rename, fsync of the directory) and return
    the sha256 of what was written. A full disk removes the temp file and raises the one-line DiskFullError about
    `what` and `how_to_continue`; the file's previous version, if any, is untouched."""
    path = Path(path)
    parts = list(parts)
    digest = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
                digest.update(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            needed = sum(len(memoryview(part).cast("B")) for part in parts)
            raise disk_full(path.parent, needed, what, how_to_continue) from None
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


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
