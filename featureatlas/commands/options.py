"""Options made from settings dataclasses (featureatlas/settings.py): a field is an option whose destination is the
field's name, whose default and help are the field's, and whose type is the field's annotation. The groups that
several commands share (model, corpus, output) are declared here once; each command says which fields it takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MODEL = ("model", "saes", "device", "dtype")
CORPUS = ("corpus", "text_field", "token_field", "split")
OUTPUT = ("out", "overwrite")
SHARED = MODEL + CORPUS + OUTPUT
STORE_HELP = "a .duckdb file written by harvest"
MODEL_CACHE_HELP = ("neither read nor write the cache of converted .gguf models and of logit effects (also "
                    "FEATUREATLAS_NO_MODEL_CACHE=1; docs/embedded-model.md, Model cache)")


def add_settings(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None, *,
                 group: str | None = None, skip: Iterable[str] = (), positional: Iterable[str] = (),
                 defaults: Mapping[str, Any] | None = None, prefix: str = "", help_prefix: str = "") -> None:
    """Add an option for each of `names` (default: every field of `cls` made by setting(), but those in `skip`),
    under the titled `group` if given. `positional` fields are arguments, not flags; `defaults` replaces fields'
    defaults (the demo harvests fewer tokens); `prefix` goes before each destination and flag, `help_prefix` before
    each help text."""
    target = parser.add_argument_group(group) if group else parser
    _add_fields(target, cls, names, skip=skip, positional=positional, defaults=defaults, prefix=prefix,
                help_prefix=help_prefix)


def add_model(parser: argparse.ArgumentParser, cls: type, *, names: Iterable[str] = MODEL, cache: bool = False
              ) -> None:
    """The model group: the model, its dictionaries (--sae), device and dtype, as far as `cls` has them; `cache` adds
    --no-model-cache, for a command that loads a model."""
    group = parser.add_argument_group("model")
    _add_fields(group, cls, [n for n in names if n in _fields(cls)])
    if cache:
        group.add_argument("--no-model-cache", action="store_true", help=MODEL_CACHE_HELP)


def add_corpus(parser: argparse.ArgumentParser, cls: type) -> None:
    """The corpus group: the corpus and how to read it (--text-field, --token-field, --split), as `cls` has them."""
    _add_fields(parser.add_argument_group("corpus"), cls, [n for n in CORPUS if n in _fields(cls)])


def add_output(parser: argparse.ArgumentParser, cls: type) -> None:
    """The output group: --out and --overwrite, as `cls` has them."""
    _add_fields(parser.add_argument_group("output"), cls, [n for n in OUTPUT if n in _fields(cls)])


def settings_from(args: argparse.Namespace, cls: type, **given: Any) -> Any:
    """An instance of `cls` from the parsed options that are its fields (the rest keep their defaults), and `given`."""
    values = {name: getattr(args, name) for name in _fields(cls) if hasattr(args, name)}
    return cls(**(values | given))


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's flag by its destination, which for a generated option is its setting: an error that names a
    setting can name the flag instead. (argparse lists a parser's options only in its `_actions`.)"""
    return {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _add_fields(target: Any, cls: type, names: Iterable[str] | None, *, skip: Iterable[str] = (),
                positional: Iterable[str] = (), defaults: Mapping[str, Any] | None = None, prefix: str = "",
                help_prefix: str = "") -> None:
    """add_settings' work, into a parser or an argument group."""
    fields, hints = _fields(cls), typing.get_type_hints(cls)
    skip, positional, defaults = set(skip), set(positional), defaults or {}
    if names is None:
        names = [n for n, f in fields.items() if "help" in f.metadata and n not in skip]
    for name in names:
        meta = fields[name].metadata
        default = defaults[name] if name in defaults else _default(fields[name])
        kind = _unwrap(hints[name])
        kwargs: dict[str, Any] = {key: meta[key] for key in ("metavar", "choices", "nargs", "const") if key in meta}
        if kind is bool:
            kwargs |= {"action": "store_true"} if default is False else {"type": _on_off, "metavar": "{on,off}"}
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kwargs |= ({} if item is str else {"type": item}) | ({} if name in positional else {"action": "append"})
        elif "parse" in meta:
            kwargs["type"] = _parser_of(meta["parse"])
        elif kind is not str:
            kwargs["type"] = kind
        help_text = _help(help_prefix + meta.get("help", ""), default, None if name in defaults else meta.get("shown"))
        if name in positional:
            target.add_argument(prefix + name, help=help_text, **kwargs)
        else:
            flag = meta.get("flag") or "--" + (prefix + name).replace("_", "-")
            given = {"required": True} if default is dataclasses.MISSING else {"default": default}
            target.add_argument(flag, dest=prefix + name, help=help_text, **kwargs, **given)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _unwrap(hint: Any) -> Any:
    """X for `X | None`; any other annotation as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _help(text: str, default: Any, shown: str | None) -> str:
    """The help text with its default: `shown` where given, else the value itself (none for off switches, None
    and empty lists, whose text says what happens)."""
    says_nothing = default is dataclasses.MISSING or default is None or default is False or default == []
    if shown is None and not says_nothing:
        shown = ("on" if default else "off") if isinstance(default, bool) else str(default)
    text = text.replace("%", "%%")
    if shown is None:
        return text
    suffix = f"(default: {shown})".replace("%", "%%")
    return f"{text} {suffix}" if text else suffix


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: choose on or off")
    return text == "on"


def _parser_of(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` with its ValueError's message as argparse's one line."""
    def converted(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return converted

