"""Typed dataclass configs mirrored one to one by the command line.

Every stage declares a ``@dataclass`` config whose fields carry their help text in
``field(metadata={"help": ...})``. :func:`add_arguments` turns such a class into
``argparse`` options and :func:`from_namespace` back into an instance, so the CLI
never drifts from the Python API::

    @dataclass
    class PrepareConfig:
        source: str = arg("name of the source", positional=True)
        out: str = arg("output directory", default="data/mix")

Rules: a field marked ``positional=True`` becomes a positional argument; ``bool``
fields become ``--flag/--no-flag``; ``list[...]`` fields take one or more values;
``Optional[T]`` fields default to ``None``; ``arg(..., type=f)`` parses the option's text
with ``f``. Field names map to ``--kebab-case``. A field whose type is itself such a
dataclass (one config included by several commands, e.g. the ensemble's) adds its
options as a group of their own, under their own names, and is rebuilt from them.
A value that another option may imply (``train``'s ``--steps`` under ``--match``) is an
``Optional`` field with default ``None`` meaning "not given", resolved in ``__post_init__``
(the given value, or the implied one, or the documented default), so a conflict between
an explicit value and an implied one can be refused instead of silently overridden.
Validation lives in each config's ``__post_init__`` and raises ``ValueError`` naming
the field, which the CLI prints as a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_MISSING = dataclasses.MISSING


def arg(help: str, default: Any = _MISSING, *, positional: bool = False,
        choices: typing.Sequence[str] | None = None, default_factory: Any = _MISSING,
        short: str | None = None, type: typing.Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with CLI metadata (``help``, ``positional``, ``choices``, ``short``,
    ``type``: the parser of the option's text when the annotation is not one)."""
    metadata = {"help": help, "positional": positional, "choices": choices, "short": short, "type": type}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argparse option per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        meta = f.metadata
        if dataclasses.is_dataclass(tp):  # an included config: its options, as a group
            add_arguments(parser.add_argument_group(meta.get("help") or tp.__name__), tp)
            continue
        help_text = meta.get("help", "")
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        kwargs: dict[str, Any] = {"help": help_text}
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            kwargs["type"] = inner
            kwargs["nargs"] = "+" if (meta.get("positional") or not has_default) else "*"
        else:
            kwargs["type"] = tp
        if meta.get("type") is not None:
            kwargs["type"] = meta["type"]
        if meta.get("positional"):
            if has_default:
                kwargs["nargs"] = kwargs.get("nargs", "?")
                kwargs["default"] = default
            parser.add_argument(f.name, metavar=f.name.upper(), **_plain_help(kwargs))
            continue
        names = ["--" + f.name.replace("_", "-")]
        if meta.get("short"):
            names.insert(0, meta["short"])
        if has_default:
            kwargs["default"] = default
            if kwargs.get("help") and default not in (None, "", [], False):
                kwargs["help"] += f" (default: {default})"
        else:
            kwargs["required"] = True
        parser.add_argument(*names, dest=f.name, **_plain_help(kwargs))


def _plain_help(kwargs: dict[str, Any]) -> dict[str, Any]:
    # argparse %-formats help strings; ours are plain text ("+5% text"), so escape every %
    return {**kwargs, "help": kwargs["help"].replace("%", "%%")} if kwargs.get("help") else kwargs


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """Build ``cls`` from parsed arguments (lists stay lists; included configs rebuilt)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            values[f.name] = from_namespace(tp, ns)
        elif hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (for run metadata)."""
    return dataclasses.asdict(cfg)
