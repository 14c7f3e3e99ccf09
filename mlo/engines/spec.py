"""One typed engine specification: a name or a mapping ``{"name": ..., field: value}``.

Applications keep an engine as plain configuration (YAML, ``--set``) and turn it
into an engine here, so every engine option is reachable and the defaults are
the engine dataclasses' own::

    engine_from_config("cg")                                   # CG() with its defaults
    engine_from_config({"name": "cg", "iterations": 20, "tol": 1e-6})
    engine_to_config(CG(iterations=20))  # {"name": "cg", "iterations": 20, "damping": 0.0, "tol": None}
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from ..errors import ConfigError
from .base import Engine
from .finite_difference import FiniteDifference
from .first_order import FirstOrder
from .identity import FOMAML
from .implicit import CG, MINRES, DenseImplicit, Neumann
from .unrolled import Unrolled

ENGINES: dict[str, type[Engine]] = {"first_order": FirstOrder, "unrolled": Unrolled,
                                    "finite_difference": FiniteDifference, "neumann": Neumann, "cg": CG,
                                    "fomaml": FOMAML, "minres": MINRES, "dense_implicit": DenseImplicit}


def from_config(spec: str | Mapping[str, Any] | Engine, where: str = "engine",
                choices: Mapping[str, type[Engine]] | None = None) -> Engine:
    """Build an engine from a name, a ``{"name": ..., **fields}`` mapping, or return an engine as is.

    ``choices`` (default :data:`ENGINES`) are the names accepted. Raises ``ConfigError``
    with one line that starts with the offending setting's path (``where``, ``where.name``
    or ``where.<field>``, also in its ``field`` attribute) for an unknown engine (listing
    the valid names), an unknown field (listing the engine's fields), a value of the wrong
    type, or a value the engine rejects.
    """
    if isinstance(spec, Engine):
        return spec
    choices = ENGINES if choices is None else choices
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected an engine name or a mapping with 'name', got {type(spec).__name__}",
                          field=where)
    fields = dict(spec)
    if "name" not in fields:
        raise ConfigError(f"{where}.name: missing; choose one of {', '.join(choices)}", field=f"{where}.name")
    name = fields.pop("name")
    if not isinstance(name, str) or name not in choices:
        raise ConfigError(f"{where}.name: unknown engine {name!r}; choose one of {', '.join(choices)}",
                          field=f"{where}.name")
    cls = choices[name]
    types_ = _field_types(cls)
    for key, value in fields.items():
        if key not in types_:
            valid = ", ".join(types_) or "none"
            raise ConfigError(f"{where}.{key}: unknown field of engine {name!r}; valid fields: {valid}",
                              field=f"{where}.{key}")
        fields[key] = _coerce(value, types_[key], f"{where}.{key}")
    try:
        return cls(**fields)
    except ConfigError as e:
        key = e.field if e.field in types_ else _rejected_field(cls, fields)
        text = str(e).removeprefix(f"{cls.__name__}.{key}: ") if key else str(e)
        path = f"{where}.{key}" if key else where
        raise ConfigError(f"{path}: {text}", field=path) from None


def _rejected_field(cls: type[Engine], fields: dict[str, Any]) -> str | None:
    """The field the engine's own check rejects: the first, in the engine's field order, whose value
    (with the ones before it) the engine refuses; ``None`` if each alone is accepted."""
    given: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in fields:
            given[f.name] = fields[f.name]
            try:
                cls(**given)
            except ConfigError:
                return f.name
    return None


def to_config(engine: Engine) -> dict[str, Any]:
    """The mapping ``from_config`` turns back into an equal engine (every field, name first)."""
    for name, cls in ENGINES.items():
        if type(engine) is cls:
            return {"name": name, **{f.name: getattr(engine, f.name) for f in dataclasses.fields(cls)}}
    raise ConfigError(f"engine {type(engine).__name__} has no configuration name; "
                      f"configurable engines: {', '.join(ENGINES)}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, tp, where: str):
    """``value`` checked against the field type ``tp`` (int, float, bool, or ``X | None``)."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = len(args) < len(typing.get_args(tp)), args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_describe(tp)}, got None", field=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}", field=where)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected {_describe(tp)}{' or null' if optional else ''}, got {value!r}",
                          field=where)
    if tp is int:
        if isinstance(value, float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}", field=where)
        return value
    return float(value)


def _describe(tp) -> str:
    return "an integer" if tp is int else "a number"
