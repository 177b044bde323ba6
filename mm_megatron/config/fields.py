"""The one configuration mechanism: dataclass configs from dicts, dotted overrides and CLI flags.

What this file does, for any dataclass config (model, layout, data, trainer, whole job):

- `from_dict(cls, values, where)` builds a config from a nested dict, `apply_overrides(obj,
  values, where)` sets a nested dict on an existing one. Both recurse into nested dataclasses,
  coerce each value to the field's annotated type (`coerce`: YAML's ``1e-3`` is a string to
  PyYAML, ``"null"`` is None for optional fields, ``"false"`` a bool) and reject unknown keys
  with a one-line ValueError naming the dotted key and the valid names.
- `parse_dotted(["a.b=1"], roots)` / `merge_trees` / `set_dotted`: dotted ``key=value``
  overrides as a nested dict (values parsed as YAML), merged in precedence order.
- `field_docs(cls)`: the docstring line(s) under each field (the house style), read from the
  class source, so help texts need no second copy.
- `flag_fields(cls, prefix)`: every field that declares a command-line flag of its own through
  its metadata, ``field(default=..., metadata={"flag": "--lr"})``, with its dotted key, type and
  help text: a new Megatron-style flag is that one edit on the field.

What it does not do: know any particular config or section name, or validate values beyond their
types (each config's own ``validate`` does).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

FLAG = "flag"
"""Field-metadata key holding a field's command-line flag (e.g. ``--lr``)."""

_NONE_STRINGS = ("none", "null")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


# --- coercion ---------------------------------------------------------------------------------


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to the annotated type `hint` (strings from YAML or a CLI included).

    Args:
        value: The raw value.
        hint: The field's resolved annotation (``int``, ``float | None``, a dataclass, ...).
        where: Dotted name of the field, for the error message.

    Raises:
        ValueError: One line naming `where`, the expected type and the value.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in _NONE_STRINGS):
            return None
        for arg in args:
            try:
                return coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: cannot read {value!r} as {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE:
            return True
        if isinstance(value, str) and value.lower() in _FALSE:
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set `values` (nested dicts for nested dataclasses) on dataclass `obj`, coercing types.

    Args:
        obj: A dataclass instance (e.g. `TrainConfig`, `LlavaConfig`).
        values: Field name -> new value; a dict value on a nested dataclass recurses.
        where: Dotted path of `obj`, for error messages ("" for a top-level config).
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(f"unknown key {dotted}; valid: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            apply_overrides(current, value, dotted)
        else:
            setattr(obj, key, coerce(value, hints[key], dotted))


def from_dict(cls: type, values: Any, where: str) -> Any:
    """A `cls` built from its defaults with `values` applied (see `apply_overrides`).

    Args:
        cls: A dataclass whose fields all have defaults.
        values: Nested dict of field values (an instance of `cls` is returned as is).
        where: Dotted name of the config, for error messages.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    obj = cls()
    apply_overrides(obj, values, where)
    return obj


# --- dotted overrides -------------------------------------------------------------------------


def parse_dotted(items: list[str], roots: tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.lm.num_layers=4"]`` -> nested dict (values parsed as YAML).

    Args:
        items: ``key=value`` strings with dotted keys.
        roots: Allowed first components of a key.
    """
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        if key.split(".")[0] not in roots:
            raise ValueError(f"override {item!r}: section must be one of {roots}")
        set_dotted(tree, key, yaml.safe_load(raw) if raw.strip() else "")
    return tree


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``dotted = "a.b.c"`` (creating the dicts on the way)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` onto `base` (new dict; dicts merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


# --- field documentation and flags ------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated field of `cls`.

    Whitespace is collapsed to single spaces; fields without a docstring are absent.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(frozen=True)
class FlagField:
    """A config field reachable through a command-line flag of its own."""

    flag: str
    """The flag, e.g. ``--lr``."""
    key: str
    """The dotted key it sets, e.g. ``train.lr``."""
    hint: Any
    """The field's annotated type."""
    help: str
    """The field's docstring."""

    @property
    def is_switch(self) -> bool:
        """A bool field: the flag takes no value and sets it true."""
        return self.hint is bool

    @property
    def value_type(self) -> type:
        """The type of the flag's value (the non-None member of an optional)."""
        args = [a for a in typing.get_args(self.hint) if a is not type(None)]
        return args[0] if args else self.hint


def flag_fields(cls: type, prefix: str) -> Iterator[FlagField]:
    """Every field of `cls` (nested dataclasses included) whose metadata names a flag.

    Args:
        cls: A dataclass config.
        prefix: Dotted name of `cls` in the job (e.g. ``train``; "" for the job itself).
    """
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], f"{prefix}.{f.name}" if prefix else f.name
        if FLAG in f.metadata:
            yield FlagField(f.metadata[FLAG], key, hint, docs.get(f.name, ""))
        if dataclasses.is_dataclass(hint):
            yield from flag_fields(hint, key)
