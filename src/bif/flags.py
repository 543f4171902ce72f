"""The :class:`~bif.config.BIFConfig` fields as command-line flags, and their text values.

``bif demo``, ``bif run`` and ``bif bench`` get one ``--flag`` per field (:func:`add_config_flags`),
generated from the fields and their ``help`` metadata, never listed by hand; a ``bif run``
configuration file's ``[bif]`` table reads its strings with the same converters
(:func:`value_parser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

from bif.config import BIFConfig

# Words meaning None for an optional field (``--batch-size full`` reads naturally).
_NONE_WORDS = ("none", "full")


def value_parser(name: str, tp: Any) -> tuple[Any, str]:
    """A string -> value converter and a metavar for a field typed as a union of int, float, str,
    None and ``Literal`` choices (e.g. ``int | None``, ``float | Literal["auto"]``)."""
    members = (
        typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType, typing.Union) else (tp,)
    )
    literals: list[Any] = []
    scalars: list[type] = []
    allow_none = False
    for m in members:
        if m is type(None):
            allow_none = True
        elif typing.get_origin(m) is Literal:
            literals += typing.get_args(m)
        elif m in (int, float, str):
            scalars.append(m)
        else:
            raise TypeError(f"no CLI parser for BIFConfig.{name}: {tp}")
    words = [str(v) for v in literals] + (list(_NONE_WORDS) if allow_none else [])
    options = [t.__name__.upper() for t in scalars] + words
    metavar = options[0] if len(options) == 1 else "{" + ",".join(options) + "}"

    def parse(text: str) -> Any:
        t = text.strip()
        for v in literals:
            if t == str(v):
                return v
        if allow_none and t.lower() in _NONE_WORDS:
            return None
        for conv in scalars:
            try:
                return conv(t)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"expected one of {metavar}, got {text!r}")

    return parse, metavar


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per :class:`BIFConfig` field (generated, never listed by hand).

    Unset flags are absent from the parsed namespace (``argparse.SUPPRESS``), so the library
    default applies and ``--batch-size none`` (a real ``None``) stays distinguishable from "unset".
    A field typed ``bool`` becomes ``--flag/--no-flag``, a pure ``Literal`` a choice, and unions
    of numbers, ``None`` and literals (``int | None``, ``float | Literal["auto"]``) a converter.
    """
    group = parser.add_argument_group("BIF hyperparameters (unset: the library default)")
    hints = typing.get_type_hints(BIFConfig)
    for f in dataclasses.fields(BIFConfig):
        tp = hints[f.name]
        default = "none" if f.default is None else f.default
        text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kw.update(choices=list(typing.get_args(tp)), type=str)
        else:
            kw["type"], kw["metavar"] = value_parser(f.name, tp)
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters given on the command line, by :class:`BIFConfig` field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(BIFConfig) if f.name in args}
