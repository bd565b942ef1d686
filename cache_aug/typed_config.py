"""Typed configuration trees: dataclasses <-> plain mappings, YAML files, overrides, field docs.

A configuration is a tree of ``@dataclass(kw_only=True)`` sections. Each field carries an attribute
docstring (the string literal right below it); :func:`field_docs` reads those back so a CLI can show
them without repeating them.

The machinery here (:func:`from_dict`, :func:`to_dict`, :func:`load_config`, :func:`dump_config`,
:func:`field_docs`) is generic: it knows no section, so it works for any dataclass tree (the
library's :class:`cache_aug.config.CacheAugConfig` and the jobs' root that extends it alike).
Every error is a :class:`ConfigError` whose message starts with the dotted path of the offending
field, e.g. ``augmentation.n_latents: must be >= 1, got 0``; sections check their own values with
:func:`require` and :func:`at_least`, naming only the field, and :func:`from_dict` prepends the path.

This module deliberately imports neither torch nor ray, so reading and validating a config stays cheap.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "at_least",
    "dump_config",
    "field_docs",
    "from_dict",
    "load_config",
    "require",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted field path."""


# --------------------------------------------------------------------------- #
# Validation helpers for the sections' __post_init__.
# Messages name only the field; from_dict prepends the section path.
# --------------------------------------------------------------------------- #


def require(ok: bool, name: str, rule: str, value: Any) -> None:
    """Raise ``ConfigError("<name>: <rule>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def at_least(name: str, value: int, low: int) -> None:
    """``require(value >= low, ...)`` with the usual message."""
    require(value >= low, name, f"must be >= {low}", value)


# --------------------------------------------------------------------------- #
# dict -> dataclass tree, with type checks
# --------------------------------------------------------------------------- #


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _show(value: Any) -> str:
    """``int 3`` / ``str 'abc'``: the type and a bounded repr, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\btyping\.", "", str(tp))


def _unknown(cls: type, key: object, names: list[str]) -> str:
    """Why `key` is refused in section `cls`: a key the section's ``moved_keys`` names has moved there."""
    moved = getattr(cls, "moved_keys", {}).get(key)
    return f"moved to {moved}" if moved else f"unknown key (known: {', '.join(names)})"


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in its typed form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return value

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where=where)

    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # plain `X | None`: keep X's precise error
            return _convert(options[0], value, where)
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")

    if origin is Literal:
        # Compare types too: True == 1 and 1.0 == 1 must not match.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(map(repr, args))
        raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")

    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
        (item_tp,) = args or (Any,)
        return [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]

    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
        key_tp, value_tp = args or (Any, Any)
        return {
            _convert(key_tp, k, _join(where, k)): _convert(value_tp, v, _join(where, k))
            for k, v in value.items()
        }

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(tp, type) and origin is None:
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"{where}: unsupported config annotation {tp!r}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` (recursively) from plain mappings, checking types.

    Missing keys take the field defaults; unknown keys, missing required fields,
    wrong types and failed ``__post_init__`` checks raise :class:`ConfigError`
    naming the dotted path of the field. ``where`` is the path of ``data``
    itself (empty at the root).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'config'}: expected a mapping for {cls.__name__}, got {_show(data)}"
        )

    fields = _init_fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(where, key)}: {_unknown(cls, key, names)}")

    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        path = _join(where, f.name)
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing required field")

    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ names the field relative to its own section.
        if not where:
            raise
        raise ConfigError(f"{where}.{e}") from None


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe form of a dataclass tree; ``from_dict(cls, to_dict(x)) == x``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _init_fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- #
# YAML files and command-line overrides
# --------------------------------------------------------------------------- #


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``); plain
    ``1e-4`` would become a string and fail the float check of e.g. a
    learning rate.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _plain(value: Any) -> Any:
    """Deep copy of mappings/lists as dicts/lists, so overrides can edit in place."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _section_type(tp: Any) -> type | None:
    """The dataclass inside annotation ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(found) == 1:
            return found[0]
    return None


def _apply_override(data: dict[str, Any], cls: type, text: str) -> None:
    """Apply one ``dotted.key=value`` override to ``data`` (the raw tree for ``cls``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse override value {raw!r}: {e}") from None

    parts = key.split(".")
    node = data
    section: type | None = cls  # None once we are below the dataclass tree (e.g. in a dict field)
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if section is not None:
            # Check keys here, not only in from_dict, so a typo'd override is named as such.
            hints = typing.get_type_hints(section)
            names = [f.name for f in _init_fields(section)]
            if part not in names:
                raise ConfigError(f"{path}: {_unknown(section, part, names)} (override {text!r})")
            section = _section_type(hints[part])
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{path}: not a section, cannot apply override {text!r}")
        node = child


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    cls: type[T],
    overrides: Sequence[str] = (),
) -> T:
    """Load and validate a config of dataclass ``cls``.

    ``source`` is a YAML file path, an already-parsed mapping, or None for all
    defaults. ``overrides`` are ``dotted.key=value`` strings whose values are
    parsed as YAML (``coprocessor.lora_targets=[q_proj,v_proj]``); they are
    applied before validation.
    """
    if source is None:
        data: Any = {}
    elif isinstance(source, Mapping):
        data = _plain(source)
    else:
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as fh:
                data = _yaml_load(fh)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if data is None:  # empty file
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {_show(data)}")

    if isinstance(overrides, str):  # a lone string would be split into characters
        overrides = [overrides]
    for text in overrides:
        _apply_override(data, cls, text)
    return from_dict(cls, data)


def dump_config(obj: Any) -> str:
    """YAML text for a config; ``load_config`` reads it back to an equal object."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- #
# Attribute docstrings
# --------------------------------------------------------------------------- #


def _class_field_docs(cls: type) -> dict[str, str]:
    """Docstrings written right below annotated assignments in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # e.g. defined in a REPL or built with make_dataclass
        return {}
    tree = ast.parse(source)
    body = next(
        (n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__),
        [],
    )
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Map each init field of dataclass ``cls`` to its attribute docstring ("" if none).

    Docstrings are read from the source with ``ast``, including those of
    fields inherited from dataclass bases.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"field_docs needs a dataclass type, got {cls!r}")
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' docs
        if dataclasses.is_dataclass(klass):
            found.update(_class_field_docs(klass))
    return {f.name: found.get(f.name, "") for f in _init_fields(cls)}
