"""``--flags`` from a config dataclass: help, choices and type from each field's declaration
(:func:`tiltlm.config.option`) and annotation: ``bool`` (``--x`` / ``--no-x``), ``int``, ``float``,
``str``, ``Optional[T]``, ``Literal[...]`` (the choices) and ``list[T]`` (one or more values).

One rule for presets (``--quick``): defaults < preset < flags given. So that the flags given can be told
from the defaults, the defaults stay out of the namespace (``argparse.SUPPRESS``) unless asked for.
"""

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Literal, Union

from tiltlm.config import expectation


def flag_type(annotation: Any, name: str) -> tuple[Any, tuple, bool]:
    """``(argparse type, choices, takes a list)`` of a field's annotation; TypeError for anything else."""
    if typing.get_origin(annotation) in (Union, types.UnionType):  # Optional[T]
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return flag_type(inner[0], name)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (str,)
        return flag_type(item, name)[0], (), True
    if annotation in (bool, int, float, str):
        return annotation, (), False
    raise TypeError(f"option {name}: no command-line form for the type {annotation!r}")


def help_text(f, required: bool = False) -> str:
    """The field's meaning, then its default and range."""
    default = f.default if f.default is not MISSING and not required else None
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    extras = [] if default in (None, "") else [f"default {shown}"]
    if not f.metadata.get("choices") and expectation(f.metadata):  # argparse lists the choices itself
        extras.append(expectation(f.metadata))
    text = f.metadata.get("help", "") + (f" ({'; '.join(extras)})" if extras else "")
    return text.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] = (), skip: tuple[str, ...] = (),
                required: tuple[str, ...] = (), fill_defaults: bool = False) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (or of the fields named in ``only``)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if (only and f.name not in only) or f.name in skip:
            continue
        kind, choices, many = flag_type(hints[f.name], f.name)
        choices = tuple(f.metadata.get("choices") or choices) or None
        flag = "--" + f.name.replace("_", "-")
        common = dict(help=help_text(f, f.name in required), required=f.name in required,
                      default=f.default if fill_defaults else argparse.SUPPRESS)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(flag, type=kind, choices=choices, nargs="+" if many else None,
                                metavar=None if choices else f.name.upper(), **common)


def add_preset(parser: argparse.ArgumentParser, preset: dict[str, Any]) -> None:
    parser.add_argument("--quick", action="store_true", help="a much smaller run (tests, a first look): "
                        + ", ".join(f"{k}={v}" for k, v in preset.items()) + "; options given explicitly win")


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` present in ``args``: with defaults left out, the ones given."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def from_args(cls: type, args: argparse.Namespace, preset: dict[str, Any] | None = None) -> Any:
    """An instance of ``cls``: its defaults, then ``preset``, then the options given on the command line."""
    return cls(**{**(preset or {}), **given(args, cls)})
