"""Typed configuration: a (nested) dataclass filled from YAML plus ``key.sub=value`` overrides.

Programs describe their settings as dataclasses with defaults. :func:`load_config`
reads an optional YAML file, applies command-line overrides, checks every key
and value against the dataclass annotations *before any work starts*, and calls
each dataclass's optional ``validate()`` hook for semantic checks. Errors are
:class:`ConfigError` with a one-line message that names the offending key, e.g.
``train.lr: expected float, got 'abc'``.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``Optional[...]``,
``X | Y``, ``list[...]``, ``tuple[...]``, ``dict[str, ...]``, ``Literal[...]``,
``Any``, nested dataclasses, and mlo engines: a field annotated ``mlo.Engine`` (any
registered engine) or an engine class or union of them (``mlo.Unrolled | mlo.FiniteDifference``:
those names only) holds an engine. It is written as a name or a mapping
``{name: cg, iterations: 20}`` and parsed once, by ``mlo.engine_from_config``, into the
engine itself; a mapping without ``name``, or with the default's name, keeps the default's
other fields, and a new name starts from that engine's own defaults. Written out
(:func:`config_to_dict`, ``--print-config``, a run's config.yaml) an engine is its
``mlo.engine_to_config`` mapping again, which loads back to an equal engine.
An error about a key carries that key's path in its ``field`` attribute (``None`` for a
file that cannot be read or an override that is not ``KEY=VALUE``).

Why not OmegaConf structured configs or jsonargparse (both tried, OmegaConf 2.3.0/2.4.0,
jsonargparse 4.53): OmegaConf's errors are four lines (key, reference and object types),
2.3 refuses ``Literal`` fields, and an engine field becomes a nested config of its
default's class with no ``name`` tag, so ``--set engines.x.name=cg`` cannot switch the
engine; ``--set data.name=no`` gives a ``str`` field the text ``'False'`` and
``--set train.milestones=5,6`` is refused (both kept as typed here); the tagged union
and the one-line errors would stay here as glue around it.
jsonargparse takes over the command line (``--cfg.train.lr=...`` instead of ``--set``),
its errors are two lines, and an unknown key is "unrecognized arguments" with no
suggestion or list of valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mlo.engines import ENGINES, Engine, from_config as _engine_from_config, to_config as _engine_to_config
from mlo.errors import ConfigError as _MLOConfigError

__all__ = ["ConfigError", "load_config", "config_to_dict", "config_keys", "save_config"]

T = TypeVar("T")

_NONE_WORDS = {"null", "none", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class ConfigError(_MLOConfigError):
    """An unknown key or an invalid value in a configuration; the message names the key."""


class _CliText(str):
    """A value typed on the command line, still unparsed.

    Kept as text until the target field's type is known, so ``--set name=no``
    stays the string ``"no"`` for a ``str`` field instead of becoming YAML's
    boolean ``False``.
    """


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Build ``cls`` from the YAML file at ``path`` (optional) and ``key.sub=value`` overrides.

    Overrides are applied after the file. Unknown keys, ill-typed values and
    failed ``validate()`` hooks raise :class:`ConfigError` before anything else runs.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    raw: dict = {} if path is None else _read_yaml(path)
    for item in overrides:
        keys, value = _parse_override(item)
        depth, engine = _check_override_key(cls, keys)
        if engine and len(keys) > depth + 1 and isinstance(_get_nested(raw, keys[:depth + 1]), str):
            # an engine given by name alone ("engine: cg") gets a field: it becomes {name: cg, field: value}
            _set_nested(raw, keys[:depth + 1], {"name": _get_nested(raw, keys[:depth + 1])})
        if engine and len(keys) == depth + 2 and keys[-1] == "name":
            # a new engine name starts a fresh mapping: the old engine's fields may not fit the new one
            node = _get_nested(raw, keys[:-1])
            if not isinstance(node, dict) or str(node.get("name")) != str(value):
                _set_nested(raw, keys[:-1], {"name": value})
                continue
        _set_nested(raw, keys, value)
    cfg = _build(cls, raw, prefix="")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested ``dict`` of a config dataclass (tuples become lists and engines their
    ``mlo.engine_to_config`` mappings, so YAML/JSON can hold it)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def config_keys(cls: type) -> list[tuple[str, Any]]:
    """Every leaf key of the config dataclass ``cls`` with its default, as ``("data.seed", 0)`` pairs."""
    return list(_flat(config_to_dict(cls()), ""))


def _flat(tree: dict, prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, _join(prefix, key))
        else:
            yield _join(prefix, key), value


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal object."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading


def _read_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {os.fspath(path)}: is a folder; give a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {os.fspath(path)}: cannot read it ({' '.join(str(exc).split())})") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{os.fspath(path)}: invalid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[list[str], _CliText]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, value = item.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {item!r}: empty key segment")
    return keys, _CliText(value.strip())


def _check_override_key(cls: type, keys: list[str]) -> tuple[int, bool]:
    """Fail on an override key that names no field, before it is merged into the raw mapping.

    Returns the index in ``keys`` of an engine or mapping field the key reaches into (its own
    parser checks the keys below) and whether it is an engine, else ``(len(keys), False)``.
    """
    current: Any = cls
    for depth, name in enumerate(keys):
        if not (isinstance(current, type) and dataclasses.is_dataclass(current)):
            parent = ".".join(keys[:depth])
            raise ConfigError(f"unknown key '{'.'.join(keys)}': '{parent}' is a value, not a section",
                              field=".".join(keys))
        fields = _init_fields(current)
        if name not in fields:
            raise ConfigError(_unknown_key_message(".".join(keys[: depth + 1]), list(fields)),
                              field=".".join(keys[: depth + 1]))
        tp = get_type_hints(current)[name]
        if _engine_choices(tp) is not None:
            return depth, True
        if _is_mapping(tp):
            return depth, False
        current = _dataclass_in(tp)
    return len(keys), False


def _engine_choices(tp: Any) -> dict[str, type[Engine]] | None:
    """The engines (by config name) a field annotated ``tp`` may hold, or ``None`` if it holds no engine."""
    args = [a for a in (get_args(tp) if _is_union(tp) else (tp,)) if a is not type(None)]
    if not args or not all(isinstance(a, type) and issubclass(a, Engine) for a in args):
        return None
    return {name: cls for name, cls in ENGINES.items() if issubclass(cls, tuple(args))}


def _dataclass_in(tp: Any) -> Any:
    """The dataclass type inside ``tp`` (``Optional[Cfg]`` -> ``Cfg``), else ``tp`` itself."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        for arg in get_args(tp):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return tp


def _is_mapping(tp: Any) -> bool:
    """``dict[...]``, or a union with one."""
    if get_origin(tp) is dict or tp is dict:
        return True
    return _is_union(tp) and any(_is_mapping(a) for a in get_args(tp))


def _get_nested(raw: dict, keys: list[str]) -> Any:
    node: Any = raw
    for name in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node


def _set_nested(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for name in keys[:-1]:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[keys[-1]] = value


# --------------------------------------------------------------------------- building


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key_message(key: str, valid: list[str]) -> str:
    name = key.rsplit(".", 1)[-1]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    where = f" under '{section}'" if section else ""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}; valid keys{where}: {', '.join(valid)}"


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_show(data)}", field=prefix or None)
    fields = _init_fields(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(_join(prefix, str(key)), list(fields)),
                              field=_join(prefix, str(key)))
    hints = get_type_hints(cls)
    kwargs = {}
    for name, fld in fields.items():
        key = _join(prefix, name)
        tp = hints[name]
        if name in data:
            value = data[name]
            nested = _dataclass_in(tp)
            default = _default_of(fld)
            if isinstance(value, dict) and isinstance(fld.default, Engine):
                base = _engine_to_config(fld.default)
                if "name" not in value or str(value["name"]) == base["name"]:
                    value = {**base, **value}        # same engine: keep the default's other fields
            elif isinstance(value, dict) and dataclasses.is_dataclass(nested) and default is not None:
                # A partial section keeps the field's own defaults for the keys it leaves out (one level:
                # nested sections merge with their own defaults when they are built).
                value = {**config_to_dict(default), **value}
            kwargs[name] = _coerce(value, tp, key)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required value", field=key)
    return cls(**kwargs)


def _default_of(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        value = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        value = fld.default_factory()
    else:
        return None
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _is_union(tp: Any) -> bool:
    origin = get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = str(value) if isinstance(value, _CliText) else value
    return repr(text)


def _yaml_value(text: _CliText) -> Any:
    for number in (int, float):      # YAML 1.1 reads 1e-6 as a string; a number is meant
        try:
            return number(str(text).strip())
        except ValueError:
            pass
    try:
        return yaml.safe_load(str(text))
    except yaml.YAMLError:
        return str(text)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert where it is lossless (``1`` -> ``1.0``)."""
    if tp is Any:
        return _yaml_value(value) if isinstance(value, _CliText) else value
    choices = _engine_choices(tp)
    if choices is not None:
        return _coerce_engine(value, tp, choices, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, _CliText):
            value = _yaml_value(value)
        if isinstance(value, tp):
            return value
        return _build(tp, value, key)
    if _is_union(tp):
        return _coerce_union(value, tp, key)
    origin = get_origin(tp)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, origin, key)
    if origin is dict:
        return _coerce_dict(value, tp, key)
    if tp is bool:
        return _coerce_bool(value, key)
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {_show(value)}", field=key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}", field=key)


def _coerce_engine(value: Any, tp: Any, choices: dict[str, type[Engine]], key: str) -> Engine | None:
    """The engine ``value`` describes, parsed once by mlo (an engine of an allowed class passes as is)."""
    if isinstance(value, _CliText):
        value = _yaml_value(value)
    if value is None and type(None) in get_args(tp):
        return None
    if isinstance(value, Engine) and not isinstance(value, tuple(choices.values())):
        raise ConfigError(f"{key}: expected one of the engines {', '.join(choices)}, got {value!r}", field=key)
    if isinstance(value, dict):
        value = {k: _yaml_value(v) if isinstance(v, _CliText) else v for k, v in value.items()}
    return _engine_from_config(value, where=key, choices=choices)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = get_args(tp)
    allows_none = type(None) in args
    if value is None or (isinstance(value, _CliText) and value.strip().lower() in _NONE_WORDS):
        if allows_none:
            return None
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got null", field=key)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}", field=key)


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    choices = get_args(tp)
    for choice in choices:
        if isinstance(value, _CliText):
            if str(value) == str(choice) or _yaml_value(value) == choice and type(_yaml_value(value)) is type(choice):
                return choice
        elif value == choice and type(value) is type(choice):
            return choice
    raise ConfigError(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {_show(value)}", field=key)


def _coerce_sequence(value: Any, tp: Any, origin: Any, key: str) -> Any:
    if isinstance(value, _CliText):
        parsed = _yaml_value(value)
        if isinstance(parsed, (list, tuple)):
            value = [_CliText(str(v)) if not isinstance(v, (list, dict)) else v for v in parsed]
        elif str(value).strip() == "":
            value = []
        else:
            value = [_CliText(part.strip()) for part in str(value).split(",")]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}", field=key)
    args = get_args(tp)
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if args and len(args) != len(value):
        raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}", field=key)
    item_tps = args or (Any,) * len(value)
    return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_tps)))


def _coerce_dict(value: Any, tp: Any, key: str) -> dict:
    if isinstance(value, _CliText):
        value = _yaml_value(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {_show(value)}", field=key)
    args = get_args(tp)
    key_tp, val_tp = args if args else (Any, Any)
    return {_coerce(k, key_tp, key): _coerce(v, val_tp, _join(key, str(k))) for k, v in value.items()}


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise ConfigError(f"{key}: expected bool, got {_show(value)}", field=key)


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected int, got {_show(value)}", field=key)


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected float, got {_show(value)}", field=key)


# --------------------------------------------------------------------------- validation and output


def _validate(cfg: Any) -> None:
    """Run ``validate()`` on every nested dataclass, innermost first."""
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, (type, Engine)):
                _validate(item)
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook()


def _plain(value: Any) -> Any:
    if isinstance(value, Engine):
        return _engine_to_config(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
