"""One config contract for every job: typed dataclasses that validate in ``__post_init__``
and raise :class:`~oreo_fast.errors.ConfigError` naming the key; built from a JSON/TOML file
and ``key=value`` overrides (``load_config``) or from command-line flags (``add_config_flags``
and ``config_from_args``), both converting strings through the fields' real annotations
(``coerce``). A field's meaning is written once, as the comment beside the field; the flags'
help text is read from there (``field_docs``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io as _text_io
import json
import math
import os
import tokenize
import tomllib
import types
import typing
from pathlib import Path

from oreo_fast.errors import ConfigError
from oreo_fast.io import write_json

# ------------------------------------------------------------------ validation helpers


def reject(config, key: str, why: str):
    """Raise the :class:`ConfigError` of ``key``: its name, why, and the value found."""
    raise ConfigError(f"{key}: {why} (got {getattr(config, key)!r})")


def require_at_least(config, minimum, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if value is not None and not value >= minimum:
            reject(config, key, f"must be >= {minimum}")


def require_finite(config, *keys: str, minimum: float | None = None,
                   positive: bool = False) -> None:
    """Each key a finite number, ``> 0`` when ``positive``, ``>= minimum`` when given."""
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            reject(config, key, "must be a finite number")
        if positive and value <= 0:
            reject(config, key, "must be > 0")
        if minimum is not None and value < minimum:
            reject(config, key, f"must be a finite number >= {minimum}")


def require_choice(config, key: str, choices) -> None:
    if getattr(config, key) not in choices:
        reject(config, key, f"must be one of {tuple(choices)}")


# ------------------------------------------------------------------ types


def _optional_inner(annotation):
    """``X`` for ``X | None`` (None for any other annotation)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(annotation):
            return args[0]
    return None


def coerce(value, annotation, key: str):
    """Convert a parsed value (or a key=value string) to the field's type, strictly."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        return [coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r:.40}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r:.40}") from None
    inner = _optional_inner(annotation)
    if inner is not None:
        return None if value is None else coerce(value, inner, key)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Each field's comment in the class source: the comment on the field's line, else the
    comment lines just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    docs, above, line_field = {}, [], {}
    tokens = tokenize.generate_tokens(_text_io.StringIO(source).readline)
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names \
                and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
            if above:
                docs[tok.string] = " ".join(above)
            above = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            owner = line_field.get(tok.start[0])
            if owner is not None:
                docs[owner] = text
            elif tok.start[1] == 4:
                above.append(text)
        elif tok.type == tokenize.NL and tok.line.strip() == "":
            above = []
    return docs


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """Build a config from an optional JSON/TOML file and ``key=value`` overrides."""
    types = field_types(cls)
    values: dict = {}
    if path:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be an object of key: value")
        for key, value in raw.items():
            if key not in types:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types)}")
            values[key] = coerce(value, types[key], f"{path}: {key}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        key = key.strip()
        if key not in types:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(types)}")
        values[key] = coerce(value, types[key], key)
    return cls(**values)


def save_config(config, path: str | os.PathLike) -> None:
    write_json(path, dataclasses.asdict(config))


# ------------------------------------------------------------------ command-line flags


def add_config_flags(parser: argparse.ArgumentParser, cls, skip=(), helps=None) -> None:
    """One ``--flag`` per field (underscores become dashes), converted by ``coerce`` from the
    field's annotation; fields without a default are required. Help: ``helps`` or the field's
    comment."""
    docs = {**field_docs(cls), **(helps or {})}
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        annotation = types_[f.name]
        text = docs.get(f.name, "")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if default is dataclasses.MISSING:
            parser.add_argument(flag, dest=f.name, required=True, help=text,
                                type=functools.partial(_parse_flag, annotation=annotation,
                                                       key=f.name))
        elif annotation is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=text)
        elif typing.get_origin(annotation) in (list, tuple):
            item = typing.get_args(annotation)[0]
            parser.add_argument(flag, dest=f.name, nargs="+", default=default,
                                type=functools.partial(_parse_flag, annotation=item, key=f.name),
                                help=f"{text} (default: {' '.join(map(str, default))})".strip())
        else:
            parser.add_argument(flag, dest=f.name, default=default,
                                type=functools.partial(_parse_flag, annotation=annotation,
                                                       key=f.name),
                                help=f"{text} (default: {default})".strip())


def _parse_flag(text: str, annotation, key: str):
    inner = _optional_inner(annotation)
    try:
        return coerce(text, inner if inner is not None else annotation, key)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace, cls, **extra):
    """The ``cls`` config from parsed flags (``add_config_flags``), plus ``extra`` fields."""
    types_ = field_types(cls)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name)}
    values.update(extra)
    for name, value in values.items():
        if typing.get_origin(types_[name]) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)
